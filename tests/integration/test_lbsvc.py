"""The real lbsvc process in front of real HTTP backends on loopback (contract 3)."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from harness.backends import Backend, write_servers
from harness.daemon import assert_no_logged_errors
from harness.gateway import Gateway
from harness.net import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def backends() -> Iterator[List[Backend]]:
    started = [Backend("one"), Backend("two")]
    yield started
    for b in started:
        b.stop()


@pytest.fixture
def gateway(tmp_path: Path, backends: List[Backend], user_database: str) -> Iterator[Gateway]:
    write_servers(tmp_path / "servers.yaml", backends)
    gw = Gateway(tmp_path, user_database).start().wait_ready()  # type: ignore[attr-defined]
    yield gw
    gw.stop()
    assert_no_logged_errors([gw])


def test_user_flow_round_robin_and_429(gateway: Gateway, backends: List[Backend]) -> None:
    code, _, body = gateway.call("POST", "/user/create", {"name": "user1"})
    created = json.loads(body)
    assert code == 201 and set(created) == {"name", "capacity", "rate_per_sec", "api_key"}
    assert (created["capacity"], created["rate_per_sec"]) == (5, 1)
    key = created["api_key"]
    code, _, body = gateway.call("GET", "/user/tokens/profile", key=key)
    assert json.loads(body) == {"name": "user1", "capacity": 5, "rate_per_sec": 1, "current_capacity": 5}
    calls = [gateway.call("GET", "/", key=key) for _ in range(5)]
    answers = [body.decode() for _, _, body in calls]
    assert sorted(set(answers)) == ["Server one answer", "Server two answer"]
    assert all(answers[i] != answers[i + 1] for i in range(4))
    assert [headers["ratelimit"].split(";")[1] for _, headers, _ in calls] == ["r=4", "r=3", "r=2", "r=1", "r=0"]
    assert all(headers["ratelimit-policy"] == '"default";q=5;w=5' for _, headers, _ in calls)
    code, headers, body = gateway.call("GET", "/", key=key)
    assert code == 429 and json.loads(body)["request_id"] == headers["x-request-id"]
    assert headers["retry-after"] == "1" and headers["ratelimit"] == '"default";r=0;t=1'
    limited_at = time.monotonic()
    wait_until(lambda: gateway.call("GET", "/", key=key)[0] == 200, 5, "a token after a second")
    assert time.monotonic() - limited_at > 0.5


def test_concurrent_requests_admit_exactly_capacity(gateway: Gateway) -> None:
    key = gateway.create("burst")
    gateway.call("POST", "/user/tokens/change", {"rate_per_sec": 0.001}, key=key)
    codes: List[int] = []
    lock = threading.Lock()

    def one() -> None:
        code = gateway.call("GET", "/x", key=key)[0]
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] * 5 + [429] * 15


def test_change_and_profile(gateway: Gateway) -> None:
    key = gateway.create("changer")
    gateway.call("GET", "/", key=key)
    code, _, body = gateway.call("POST", "/user/tokens/change", {"capacity": 10, "rate_per_sec": 2}, key=key)
    assert code == 200
    changed = json.loads(body)
    assert (changed["capacity"], changed["rate_per_sec"]) == (10, 2) and changed["current_capacity"] >= 4
    code, _, body = gateway.call("POST", "/user/tokens/change", {"capacity": 1}, key=key)
    assert json.loads(body)["current_capacity"] == 1  # capped at once
    assert json.loads(gateway.call("GET", "/user/tokens/profile", key=f"Bearer {key}")[2])["capacity"] == 1


def test_bad_input(gateway: Gateway) -> None:
    key = gateway.create("valid")
    cases = [
        ("POST", "/user/create", None, b"{bad", None, 400),
        ("POST", "/user/create", {"name": ""}, None, None, 400),
        ("POST", "/user/create", {"name": "x" * 65}, None, None, 400),
        ("POST", "/user/create", {"name": "bad name"}, None, None, 400),
        ("POST", "/user/create", {"name": 5}, None, None, 400),
        ("POST", "/user/create", {}, None, None, 400),
        ("POST", "/user/create", {"name": "valid"}, None, None, 409),
        ("GET", "/user/create", None, None, None, 405),
        ("GET", "/user/tokens/profile", None, None, None, 401),
        ("GET", "/user/tokens/profile", None, None, "not-a-key", 401),
        ("POST", "/user/tokens/change", {"capacity": 2}, None, None, 401),
        ("POST", "/user/tokens/change", {"capacity": 0}, None, key, 400),
        ("POST", "/user/tokens/change", {"capacity": 1.5}, None, key, 400),
        ("POST", "/user/tokens/change", {"capacity": True}, None, key, 400),
        ("POST", "/user/tokens/change", {"rate_per_sec": 0}, None, key, 400),
        ("POST", "/user/tokens/change", {"rate_per_sec": "1"}, None, key, 400),
        ("POST", "/user/tokens/change", {}, None, key, 400),
        ("POST", "/user/tokens/change", {"burst": 1}, None, key, 400),
        ("GET", "/user/nothing", None, None, key, 404),
        ("GET", "/anything", None, None, None, 401),
    ]
    for method, path, body, raw, auth, expected in cases:
        code, _, out = gateway.call(method, path, body, key=auth, raw=raw)
        assert code == expected, (method, path, body, out)
        assert "Error" in json.loads(out)
    profile = json.loads(gateway.call("GET", "/user/tokens/profile", key=key)[2])
    assert (profile["capacity"], profile["rate_per_sec"]) == (5, 1)


def test_failover_and_all_down(gateway: Gateway, backends: List[Backend]) -> None:
    key = gateway.create("failover")
    gateway.call("POST", "/user/tokens/change", {"capacity": 100, "rate_per_sec": 100}, key=key)
    backends[0].stop()
    answers = [gateway.call("GET", "/", key=key) for _ in range(6)]
    assert all(code == 200 and body == b"Server two answer" for code, _, body in answers)
    backends[1].stop()
    code, headers, body = gateway.call("GET", "/", key=key)
    assert (code, body) == (503, b"No available servers\nrequest id: %s\n" % headers["x-request-id"].encode())
    backends[0].start()
    wait_until(lambda: gateway.call("GET", "/", key=key)[2] == b"Server one answer", 10, "backend one back")


def test_forwarded_headers_and_no_key_upstream(gateway: Gateway, backends: List[Backend]) -> None:
    key = gateway.create("headers")
    code, _, _ = gateway.call("PUT", "/some/path?q=1", raw=b"hello", key=key)
    assert code == 200
    seen = [s for b in backends for s in b.seen if s["_path"] == "/some/path?q=1"][0]
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http" and seen["x-forwarded-host"].startswith("127.0.0.1")
    assert "authorization" not in seen and seen["_body"] == "hello"


def test_restart_keeps_users_and_limits(tmp_path: Path, gateway: Gateway) -> None:
    key = gateway.create("durable")
    gateway.call("POST", "/user/tokens/change", {"capacity": 7, "rate_per_sec": 3}, key=key)
    gateway.stop()
    gateway.start()
    gateway.wait_ready()
    code, _, body = gateway.call("GET", "/user/tokens/profile", key=key)
    assert code == 200 and json.loads(body)["capacity"] == 7 and json.loads(body)["rate_per_sec"] == 3
    assert gateway.call("GET", "/", key=key)[0] == 200


def test_sighup_adds_a_backend(tmp_path: Path, gateway: Gateway, backends: List[Backend]) -> None:
    key = gateway.create("reload")
    gateway.call("POST", "/user/tokens/change", {"capacity": 100, "rate_per_sec": 100}, key=key)
    third = Backend("three")
    try:
        write_servers(tmp_path / "servers.yaml", backends + [third])
        gateway.signal(signal.SIGHUP)
        wait_until(lambda: gateway.call("GET", "/", key=key)[2] == b"Server three answer", 10, "traffic on the new backend")
        (tmp_path / "servers.yaml").write_text("algorithm: nonsense\n")
        gateway.signal(signal.SIGHUP)
        wait_until(lambda: "Reload refused" in gateway.log(), 10, "refused reload")
        assert gateway.call("GET", "/", key=key)[0] == 200
    finally:
        third.stop()


def test_request_ids_end_to_end_and_the_json_access_log(tmp_path: Path, backends: List[Backend]) -> None:
    write_servers(tmp_path / "servers.yaml", backends[:1])
    gateway = Gateway(tmp_path)
    gateway.env.update({"LBSVC_ACCESS_LOG": str(tmp_path / "access.json"), "LBSVC_ACCESS_LOG_FORMAT": "json"})
    gateway.start().wait_ready()
    try:
        key = gateway.create("traced")
        trace = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "a=1,b=2"}
        code, headers, _ = gateway.call("GET", "/kept", key=key, headers={"X-Request-Id": "client-id.1", **trace})
        assert code == 200 and headers["x-request-id"] == "client-id.1"
        seen = backends[0].seen[-1]
        assert seen["_path"] == "/kept" and seen["x-request-id"] == "client-id.1"
        assert (seen["traceparent"], seen["tracestate"]) == (trace["traceparent"], trace["tracestate"])
        code, headers, _ = gateway.call("GET", "/made", key=key, headers={"X-Request-Id": "not safe!"})
        made = headers["x-request-id"]
        assert code == 200 and made != "not safe!" and backends[0].seen[-1]["x-request-id"] == made
        path = tmp_path / "access.json"
        wait_until(lambda: path.exists() and len(path.read_text().splitlines()) >= 3, 5, "the access log flushed")
        lines = {entry["target"]: entry for entry in map(json.loads, path.read_text().splitlines())}
        assert lines["/kept"]["request_id"] == "client-id.1" and lines["/made"]["request_id"] == made
        assert (lines["/kept"]["user"], lines["/kept"]["backend"], lines["/kept"]["status"]) == ("traced", "one", 200)
        assert lines["/kept"]["upstream_ms"] >= 0 and lines["/kept"]["duration_ms"] >= lines["/kept"]["upstream_ms"]
        assert lines["/user/create"]["status"] == 201 and "user" not in lines["/user/create"]
    finally:
        gateway.stop()
    assert_no_logged_errors([gateway])
