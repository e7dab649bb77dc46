"""gradesvc's resources over real HTTP parsing in memory (treq's StubTreq)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gradesvc.api.backup import Backup
from gradesvc.api.read import ReadAPI, read_router
from gradesvc.state.identity import Anchor
from gradesvc.state.phase import Phase
from gradesvc.stream.messages import Write, WriteMessage
from gradesvc.testing import MemoryBroker, memory_replica
from svckit.accesslog import AccessLog
from svckit.metrics import new_registry
from svckit.site import make_site
from tests.unit.fired import fired

STREAM = MemoryBroker.stream_id


class Replica:
    """A replica built by the daemon's own builder, in memory; its two routers behind StubTreq."""

    def __init__(self, path: Path, ready: bool = True) -> None:
        self.broker = MemoryBroker()
        self.clock = Clock()
        built = memory_replica(path, self.broker, self.clock, write_timeout=5.0, read_wait=2.0)
        self.store, self.status, self.registry, self.progress = built.store, built.status, built.registry, built.progress
        self.status.phase = Phase.READY if ready else Phase.STARTING
        self.status.connected = True
        self.consumer = built.consumer
        self.read = StubTreq(built.reads)
        self.write = StubTreq(built.writes)

    def set(self, body: Any, auth: Optional[Tuple[str, str]] = ("admin", "s3cret"), **kw: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.write.post("http://w/set", data=data, auth=auth, **kw)

    def metric(self, name: str, **labels: str) -> float:
        _, data = call(self.read, self.read.get("http://r/metrics"))
        for family in text_string_to_metric_families(data.decode()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0


def answered(d: defer.Deferred[Any]) -> bool:
    """Whether ``d`` has a result (a chained Deferred that still waits counts as not)."""
    out: List[Any] = []
    d.addBoth(lambda result: out.append(result) or result)
    return bool(out)


def call(replica_treq: StubTreq, d: defer.Deferred[Any]) -> tuple:
    response = fired(d)
    body = fired(response.content())
    replica_treq.flush()
    return response, body


@pytest.fixture
def replica(tmp_path: Path) -> Replica:
    return Replica(tmp_path)


def test_set_then_get_and_partial_merge(replica: Replica) -> None:
    first = {"user_id": "1", "postpaid_limit": 254, "spp": 2321, "shipping_fee": 20, "return_fee": 29}
    r, body = call(replica.write, replica.set(first))
    assert (r.code, json.loads(body)) == (200, {"Result": "OK"})
    call(replica.write, replica.set({"user_id": "1", "return_fee": 0}))
    r, body = call(replica.read, replica.read.get("http://r/get", params={"user_id": "1"}))
    assert r.code == 200
    assert json.loads(body) == {"Result": {**first, "return_fee": 0}}
    assert [m.write.patch for m in replica.broker.published] == [
        {"postpaid_limit": 254, "spp": 2321, "shipping_fee": 20, "return_fee": 29},
        {"return_fee": 0},
    ]


@pytest.mark.parametrize(
    "body, code",
    [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b'"text"', 400),
        ({"user_id": ""}, 400),
        ({"user_id": "1", "spp": 1.0}, 400),
        ({"user_id": "1", "spp": False}, 400),
        ({"user_id": "1", "extra": 1}, 400),
        ({"user_id": "1", "spp": 2**63}, 400),
        (b"\xff\xfe", 400),
        (json.dumps({"user_id": "1", "pad": "x" * 70000}).encode(), 413),
        (b'{"\\udc80": 1}', 400),
        (b'{"user_id": "\\udc80", "spp": 1}', 400),
        (b'{"user_id": "a\\ud800b", "spp": 1}', 400),
        (b"[" * 10000 + b"]" * 10000, 400),
        (b'{"user_id": "1", "x": ' + b"[" * 100 + b"]" * 100 + b"}", 400),
        (b'{"user_id": "1", "spp": NaN}', 400),
        (b'{"user_id": "1", "spp": 1e400}', 400),
        (b'{"user_id": "1", "spp": ' + b"9" * 5000 + b"}", 400),
        (b'{"user_id": "1", "spp": -9223372036854775809}', 400),
        (b'{"user_id": "1", "spp": null}', 400),
        (b'{"user_id": 1, "spp": 1}', 400),
        (b"", 400),
    ],
)
def test_bad_writes_store_nothing(replica: Replica, body: Any, code: int) -> None:
    r, data = call(replica.write, replica.set(body))
    assert r.code == code, data
    assert r.headers.getRawHeaders("content-type") == ["application/json"]
    assert set(json.loads(data)) == {"Error"}
    assert len(replica.store) == 0 and replica.broker.published == []


@pytest.mark.parametrize(
    "body, code, says",
    [
        ([], 400, "1 to 10000 elements"),
        ([{"user_id": "1"}] * 10_001, 400, "1 to 10000 elements"),
        ([{"user_id": "1", "spp": 1}, {"user_id": "2", "spp": 1.5}], 400, "element 1: spp must be an integer"),
        ([{"user_id": "1"}, 7], 400, "element 1: not a JSON object"),
        ([{"user_id": "1"}, [{"user_id": "2"}]], 400, "element 1: not a JSON object"),
        ([{"user_id": "1"}, {"user_id": "2", "extra": 1}], 400, "element 1: unknown field"),
        ([{"user_id": ""}], 400, "element 0: user_id"),
        ([{"user_id": "1", "spp": 2**63}], 400, "element 0: spp is outside"),
        (b"[" + b'{"user_id": "1", "spp": 1},' * 40_000 + b"{}]", 413, "larger than"),  # over the array limit
        (b"   " + json.dumps({"user_id": "1", "pad": "x" * 70_000}).encode(), 413, "larger than"),  # an object: 64 KiB
    ],
)
def test_a_bad_array_is_refused_whole_naming_the_element(replica: Replica, body: Any, code: int, says: str) -> None:
    r, data = call(replica.write, replica.set(body))
    assert r.code == code, data
    assert says in json.loads(data)["Error"]
    assert len(replica.store) == 0 and replica.broker.published == []


def test_an_array_is_one_message_applied_at_once_merging_in_order(replica: Replica) -> None:
    body = [{"user_id": "1", "spp": 1, "return_fee": 5}, {"user_id": "2", "spp": 2}, {"user_id": "1", "spp": 3}]
    r, data = call(replica.write, replica.set(body))
    assert (r.code, json.loads(data)) == (200, {"Result": "OK"})
    assert r.headers.getRawHeaders("x-stream-offset") == ["0"]  # one message: its one (last) record
    [batch] = replica.broker.published
    assert [w.user_id for w in batch.writes] == ["1", "2", "1"]  # type: ignore[union-attr]
    assert replica.store.values("1") == (0, 3, 0, 5) and replica.store.values("2") == (0, 2, 0, 0)
    assert replica.store.get("1").offsets == (-1, 0, -1, 0)  # type: ignore[union-attr]
    assert replica.metric("gradesvc_stream_messages_applied_total") == 3
    r, _ = call(replica.write, replica.set([{"user_id": "9"}] * 10_000))  # the most an array holds
    assert r.code == 200 and len(replica.broker.published) == 2


def test_a_write_whose_stream_is_deleted_is_not_written(replica: Replica) -> None:
    replica.broker.deleted = True
    r, data = call(replica.write, replica.set({"user_id": "1", "spp": 1}))
    assert r.code == 503 and json.loads(data)["Error"].startswith("not written")
    replica.broker.deleted = False
    replica.broker.stalled = True  # confirmed, not yet applied; then the stream is found deleted and declared anew
    waiting = replica.set([{"user_id": "1"}, {"user_id": "2"}])
    replica.write.flush()
    assert not answered(waiting)
    for hook in replica.broker.on_stream_recreated:
        hook()
    replica.write.flush()
    r, data = call(replica.write, waiting)
    assert r.code == 503 and json.loads(data)["Error"].startswith("not written")


@pytest.mark.parametrize("auth", [None, ("admin", "wrong"), ("root", "s3cret"), ("", "")])
def test_credentials(replica: Replica, auth: Any) -> None:
    r, data = call(replica.write, replica.set({"user_id": "1", "spp": 1}, auth=auth))
    assert r.code == 401
    assert r.headers.getRawHeaders("www-authenticate") == ['Basic realm="gradesvc"']
    assert "Error" in json.loads(data)
    assert len(replica.store) == 0


def test_malformed_authorization_header(replica: Replica) -> None:
    for header in (b"Basic !!!notbase64", b"Bearer abc", b"Basic " + b"YWRtaW4="):
        d = replica.write.post("http://w/set", data=b"{}", headers={b"Authorization": header})
        r, data = call(replica.write, d)
        assert r.code == 401, header


@pytest.mark.parametrize("path", ["/set/x", "//set", "/set/", "/SET", "/set%00", "/"])
def test_only_the_exact_write_path_exists(replica: Replica, path: str) -> None:
    d = replica.write.post("http://w" + path, data=b'{"user_id": "1", "spp": 1}', auth=("admin", "s3cret"))
    r, data = call(replica.write, d)
    assert r.code == 404 and json.loads(data) == {"Error": "no such path"}
    assert len(replica.store) == 0 and replica.broker.published == []


@pytest.mark.parametrize("path", ["/get/x", "//get", "/get/", "/backup/x", "//backup", "/ready/", "/nope"])
def test_only_exact_read_paths_exist(replica: Replica, path: str) -> None:
    r, data = call(replica.read, replica.read.get("http://r" + path, params={"user_id": "1"}))
    assert r.code == 404 and json.loads(data) == {"Error": "no such path"}


def test_extreme_values_at_the_bounds_are_stored(replica: Replica) -> None:
    body = {"user_id": "\U0001f600" * 10, "postpaid_limit": -(2**63), "spp": 2**63 - 1, "return_fee": 0}
    r, data = call(replica.write, replica.set(body))
    assert r.code == 200, data
    r, data = call(replica.read, replica.read.get("http://r/get", params={"user_id": body["user_id"]}))
    assert json.loads(data)["Result"] == {**body, "shipping_fee": 0}


def test_get_with_a_bad_user_id(replica: Replica) -> None:
    r, data = call(replica.read, replica.read.get(b"http://r/get?user_id=%ff%fe"))
    assert r.code == 400 and "UTF-8" in json.loads(data)["Error"]
    r, data = call(replica.read, replica.read.get(b"http://r/get?user_id=1&user_id=2"))
    assert r.code == 400


def test_wrong_method_and_unknown_path(replica: Replica) -> None:
    r, data = call(replica.write, replica.write.get("http://w/set", auth=("admin", "s3cret")))
    assert r.code == 405 and r.headers.getRawHeaders("allow") == ["POST"]
    r, data = call(replica.write, replica.write.post("http://w/nope", auth=("admin", "s3cret")))
    assert r.code == 404 and "Error" in json.loads(data)
    r, _ = call(replica.read, replica.read.post("http://r/get?user_id=1"))
    assert r.code == 405


def test_broker_down_is_503_and_nothing_applied(replica: Replica) -> None:
    replica.broker.down = True
    r, data = call(replica.write, replica.set({"user_id": "1", "spp": 1}))
    assert r.code == 503 and "broker" in json.loads(data)["Error"]
    assert len(replica.store) == 0


def test_get_errors(replica: Replica) -> None:
    for params, code in (({}, 400), ({"user_id": ""}, 400), ({"user_id": "ghost"}, 404)):
        r, data = call(replica.read, replica.read.get("http://r/get", params=params))
        assert r.code == code and "Error" in json.loads(data)


def test_not_ready_replica_refuses_reads_writes_and_backups(tmp_path: Path) -> None:
    replica = Replica(tmp_path, ready=False)
    replica.store.apply_patch("1", {"spp": 1}, 1)
    for treq, d in (
        (replica.read, replica.read.get("http://r/get", params={"user_id": "1"})),
        (replica.read, replica.read.get("http://r/backup")),
        (replica.write, replica.set({"user_id": "1", "spp": 2})),
    ):
        r, _ = call(treq, d)
        assert r.code == 503 and r.headers.getRawHeaders("retry-after") == ["1"]
    r, data = call(replica.read, replica.read.get("http://r/ready"))
    assert r.code == 503 and json.loads(data)["phase"] == "starting"


def test_banner_health_ready_metrics(replica: Replica) -> None:
    r, data = call(replica.read, replica.read.get("http://r/"))
    assert (r.code, data) == (200, b"Server r1 answer")
    r, data = call(replica.read, replica.read.get("http://r/health"))
    assert r.code == 200
    r, data = call(replica.read, replica.read.get("http://r/ready"))
    assert r.code == 200 and json.loads(data)["ready"] is True
    call(replica.write, replica.set({"user_id": "1", "spp": 1}))
    call(replica.write, replica.set({"user_id": "1", "spp": "x"}))
    assert replica.metric("gradesvc_write_http_requests_total", route="set", code="200") == 1
    assert replica.metric("gradesvc_write_http_requests_total", route="set", code="400") == 1
    assert replica.metric("gradesvc_users") == 1


def test_backup_client_gone_midway_stops_the_producer(tmp_path: Path) -> None:
    replica = Replica(tmp_path)
    for i in range(5000):
        replica.store.apply_patch(str(i), {"spp": i}, 1)
    clock = Clock()
    coop = Cooperator(scheduler=lambda work: clock.callLater(0, work))
    replica.consumer.applier.loaded(Anchor(1, "ef" * 32))
    backup = Backup(replica.store, replica.status, STREAM, replica.consumer.applier.anchor, new_registry(), "r1",
                    lambda: 1000.0, coop)
    router = read_router(ReadAPI(replica.store, replica.status, replica.progress, "r1"), backup, new_registry())
    channel = make_site(router, AccessLog("off", clock)).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"GET /backup HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(0)
    clock.advance(0)
    sent = len(transport.value())
    assert transport.value().startswith(b"HTTP/1.1 200") and sent > 0
    channel.connectionLost(Failure(net_error.ConnectionLost()))
    for _ in range(10):
        clock.advance(0)
    assert len(transport.value()) == sent  # nothing more produced or written
    assert not clock.getDelayedCalls()


def test_a_write_answers_with_its_stream_offset_once_applied_here(replica: Replica) -> None:
    r, _ = call(replica.write, replica.set({"user_id": "1", "spp": 1}))
    assert r.code == 200 and r.headers.getRawHeaders("x-stream-offset") == ["0"]
    r, _ = call(replica.write, replica.set({"user_id": "1", "return_fee": 2}))
    assert r.headers.getRawHeaders("x-stream-offset") == ["1"]
    assert replica.store.get("1").offsets == (-1, 0, -1, 1)  # type: ignore[union-attr]


def test_a_confirmed_write_not_applied_in_time_is_503_durable(replica: Replica) -> None:
    replica.broker.stalled = True
    d = replica.set({"user_id": "1", "spp": 1})
    replica.write.flush()
    assert not answered(d)
    replica.clock.advance(5)
    replica.write.flush()
    r, data = call(replica.write, d)
    assert r.code == 503 and "durable" in json.loads(data)["Error"]
    assert r.headers.getRawHeaders("retry-after") == ["1"]
    assert replica.progress.waiting == 0


def test_min_offset_waits_for_the_offset_then_answers(replica: Replica) -> None:
    call(replica.write, replica.set({"user_id": "1", "spp": 1}))
    r, data = call(replica.read, replica.read.get("http://r/get", params={"user_id": "1", "min_offset": "0"}))
    assert r.code == 200 and json.loads(data)["Result"]["spp"] == 1
    d = replica.read.get("http://r/get", params={"user_id": "1", "min_offset": "1"})
    replica.read.flush()
    assert not answered(d)
    other = WriteMessage("r2", "x", 0, Write("1", {"spp": 2}))
    replica.consumer.applier.handle(1, "write", other.encode())
    replica.progress.advanced()
    replica.read.flush()
    r, data = call(replica.read, d)
    assert r.code == 200 and json.loads(data)["Result"]["spp"] == 2
    d = replica.read.get("http://r/get", params={"user_id": "1", "min_offset": "7"})
    replica.read.flush()
    replica.clock.advance(2)
    replica.read.flush()
    r, data = call(replica.read, d)
    assert r.code == 503 and r.headers.getRawHeaders("retry-after") == ["1"]


@pytest.mark.parametrize("value", ["-1", "x", "1.5", "9223372036854775808", "1e3", "٣", " 1"])
def test_bad_min_offset_is_400(replica: Replica, value: str) -> None:
    r, data = call(replica.read, replica.read.get("http://r/get", params={"user_id": "1", "min_offset": value}))
    assert r.code == 400 and "min_offset" in json.loads(data)["Error"]
