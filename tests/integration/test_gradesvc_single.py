"""One real gradesvc replica against the real broker (contract 2.2, 2.3)."""

from __future__ import annotations

import gzip
import json
from typing import Callable

import pytest

from gradesvc.stream.messages import WriteMessage
from harness.broker import read_stream
from harness.net import basic, free_port, http, wait_until
from harness.replica import GradeReplica

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stream_protocol")]

FULL = {"user_id": "1", "postpaid_limit": 254, "spp": 2321, "shipping_fee": 20, "return_fee": 29}


@pytest.fixture
def replica(replicas: Callable[..., GradeReplica]) -> GradeReplica:
    return replicas("solo").wait_ready()


def test_appendix_examples(replica: GradeReplica, stream: str) -> None:
    assert replica.set(FULL) == (200, {"Result": "OK"})
    assert replica.get("1") == (200, {"Result": FULL})
    code, headers, body = http("GET", replica.read_url + "/backup")
    assert code == 200 and headers["content-type"] == "application/gzip"
    assert "attachment; filename=" in headers["content-disposition"]
    lines = gzip.decompress(body).decode().split("\n")
    assert lines[0].endswith("Z") and lines[0][:4].isdigit()
    assert lines[1].startswith("stream_offset,")
    assert lines[2:4] == ["stream_vhost,/", f"stream_name,{stream}"]
    assert lines[4].startswith("anchor_sha256,") and len(lines[4]) == len("anchor_sha256,") + 64
    assert lines[5].startswith("user_id,postpaid_limit,spp,shipping_fee,return_fee")
    assert lines[6].startswith("1,254,2321,20,29,")
    assert http("GET", replica.read_url + "/") [2] == b"Server solo answer"


def test_partial_writes_zero_and_update(replica: GradeReplica) -> None:
    assert replica.set({"user_id": "p", "postpaid_limit": 10})[0] == 200
    assert replica.set({"user_id": "p", "spp": 5, "return_fee": 3})[0] == 200
    assert replica.get("p")[1]["Result"] == {"user_id": "p", "postpaid_limit": 10, "spp": 5, "shipping_fee": 0, "return_fee": 3}
    assert replica.set({"user_id": "p", "postpaid_limit": 0})[0] == 200
    assert replica.set({"user_id": "p", "return_fee": 99})[0] == 200
    assert replica.get("p")[1]["Result"] == {"user_id": "p", "postpaid_limit": 0, "spp": 5, "shipping_fee": 0, "return_fee": 99}


@pytest.mark.parametrize("user_id", ["with space", "com,ma", 'quo"te', "ünïcødé 名前", "new\nline"])
def test_awkward_user_ids(replica: GradeReplica, user_id: str) -> None:
    assert replica.set({"user_id": user_id, "spp": 7})[0] == 200
    grade = {"user_id": user_id, "postpaid_limit": 0, "spp": 7, "shipping_fee": 0, "return_fee": 0}
    assert replica.get(user_id) == (200, {"Result": grade})


def test_every_error_stores_nothing(replica: GradeReplica) -> None:
    bad = [
        (b"{oops", 400), (b"[]", 400), (b"null", 400),
        (json.dumps({"user_id": "e", "spp": 1.5}).encode(), 400),
        (json.dumps({"user_id": "e", "spp": "1"}).encode(), 400),
        (json.dumps({"user_id": "e", "spp": None}).encode(), 400),
        (json.dumps({"user_id": "e", "spp": True}).encode(), 400),
        (json.dumps({"user_id": "e", "spp": 2**63}).encode(), 400),
        (json.dumps({"user_id": "e", "nope": 1}).encode(), 400),
        (json.dumps({"spp": 1}).encode(), 400),
        (json.dumps({"user_id": "e", "pad": "x" * (64 * 1024)}).encode(), 413),
    ]
    for body, code in bad:
        got, out = replica.set(body)
        assert got == code, body[:60]
        assert set(out) == {"Error"}
    for auth in (("admin", "nope"), ("x", "admin")):
        assert replica.set({"user_id": "e", "spp": 1}, auth=auth)[0] == 401
    code, headers, _ = http("POST", replica.write_url + "/set", b'{"user_id":"e"}')
    assert code == 401 and headers["www-authenticate"].startswith("Basic")
    code, headers, _ = http("GET", replica.write_url + "/set", headers=basic("admin", "admin"))
    assert code == 405
    code, _, _ = http("PUT", replica.write_url + "/set", b"{}", headers=basic("admin", "admin"))
    assert code == 405
    assert replica.get("e")[0] == 404
    assert http("GET", replica.read_url + "/get")[0] == 400
    assert http("GET", replica.read_url + "/get?user_id=")[0] == 400
    assert http("DELETE", replica.read_url + "/get?user_id=1")[0] == 405
    assert replica.metric("gradesvc_users") == 0


def test_write_is_published_on_the_stream(replica: GradeReplica, stream: str, stream_protocol: str) -> None:
    assert replica.set({"user_id": "s", "spp": 1, "return_fee": 0})[0] == 200
    messages = [m for m in read_stream(stream, 2) if m[1].type == "write"]  # the kind, whichever protocol wrote it
    assert len(messages) == 1
    offset, properties, body = messages[0]
    assert replica.ready()["stream_protocol"] == stream_protocol
    if stream_protocol == "amqp":  # the stream protocol carries the kind alone: the body says the rest
        assert properties.app_id == "solo" and properties.delivery_mode == 2
        assert properties.content_type == "application/json" and properties.message_id
    message = WriteMessage.decode(body)
    assert (message.replica, message.write.user_id, dict(message.write.patch)) == ("solo", "s", {"spp": 1, "return_fee": 0})


def test_broker_unreachable(replicas: Callable[..., GradeReplica]) -> None:
    dead = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F?stream_port={free_port()}"
    replica = replicas("lonely", amqp_url=dead)
    wait_until(lambda: http("GET", replica.read_url + "/health")[0] == 200, what="/health")
    ready = json.loads(http("GET", replica.read_url + "/ready")[2])
    assert ready["ready"] is False and ready["broker_connected"] is False
    code, out = replica.set({"user_id": "z", "spp": 1})
    assert code == 503 and "Error" in out
    assert replica.get("z")[0] == 503


def test_refuses_to_start_without_credentials(tmp_path, stream: str) -> None:  # type: ignore[no-untyped-def]
    replica = GradeReplica(tmp_path, stream, "nocreds", extra_env={"GRADESVC_ADMIN_PASSWORD": ""})
    replica.start()
    assert replica.process is not None
    replica.process.wait(30)  # exits (its status differs between Twisted releases)
    assert "needs credentials" in replica.log()
    with pytest.raises(OSError):
        http("GET", replica.read_url + "/health", timeout=2)


@pytest.mark.parametrize("setting", ["-", "file", "off"])
def test_access_log_setting(replicas: Callable[..., GradeReplica], tmp_path, setting: str) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "access.log"
    value = str(target) if setting == "file" else setting
    replica = replicas(f"log-{setting}", extra_env={"GRADESVC_ACCESS_LOG": value}).wait_ready()
    assert replica.get("nobody-here")[0] == 404
    line = '"GET /get?user_id=nobody-here HTTP/1.1" 404'
    if setting == "file":
        wait_until(lambda: target.exists() and line in target.read_text(), 10, "access log line")
        assert line not in replica.log()
    elif setting == "-":
        wait_until(lambda: line in replica.log(), 10, "access log line in the main log")
    else:
        # /ready answered since, so a logged /get would be in the log by now
        assert replica.ready()["phase"] == "ready"
        assert "GET /ready" not in replica.log() and line not in replica.log()
