"""Hostile clients against the real daemons: every bad input gets a clear 4xx,
changes nothing (for gradesvc: nothing is published on the stream), logs no
traceback, and leaves the process serving."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, List, Tuple

import pytest

from harness.backends import Backend, write_servers
from harness.broker import read_stream
from harness.daemon import TWISTD, assert_no_logged_errors
from harness.gateway import Gateway
from harness.net import basic, free_port, http, metric, wait_until
from harness.replica import GradeReplica

pytestmark = pytest.mark.integration

AUTH = basic("admin", "admin")


def raw(port: int, data: bytes, read: bool = True, timeout: float = 5.0) -> bytes:
    """Send raw bytes; return what the server answered before closing (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and b"Connection: close" not in b"".join(chunks):
                    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
                    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")]
                    if length and len(body) >= length[0]:
                        break
        except socket.timeout:
            pass
        return b"".join(chunks)


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


@pytest.fixture
def replica(replicas: Callable[..., GradeReplica]) -> GradeReplica:
    return replicas("hostile").wait_ready()


BAD_WRITES: List[Tuple[bytes, int]] = [
    (b'{"\\udc80": 1}', 400),
    (b'{"user_id": "\\udc80", "spp": 1}', 400),
    (b'{"user_id": "ok", "spp": 1, "\\ud800": 2}', 400),
    (b"[" * 10000 + b"]" * 10000, 400),
    (b'{"user_id": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    (b'{"user_id": "1", "spp": NaN}', 400),
    (b'{"user_id": "1", "spp": 1e999}', 400),
    (b'{"user_id": "1", "spp": 9223372036854775808}', 400),
    (b'{"user_id": "1", "spp": -9223372036854775809}', 400),
    (b'{"user_id": "1", "spp": ' + b"1" * 10000 + b"}", 400),
    (b'{"user_id": "1", "spp": 1.5}', 400),
    (b'{"user_id": "1", "spp": true}', 400),
    (b'{"user_id": "1", "spp": "1"}', 400),
    (b'{"user_id": "1", "spp": null}', 400),
    (b'{"user_id": "", "spp": 1}', 400),
    (b'{"user_id": "1", "admin": 1}', 400),
    (b'["user_id"]', 400),
    (b"\xff\xfe{}", 400),
    (b"", 400),
    (json.dumps({"user_id": "1", "pad": "x" * 70_000}).encode(), 413),
    # Arrays: one bad element refuses the whole array (the good ones before it are not published either).
    (b'[{"user_id": "a1", "spp": 1}, {"user_id": "a2", "spp": "1"}]', 400),
    (b'[{"user_id": "a1", "spp": 1}, [{"user_id": "a2"}]]', 400),
    (b"[]", 400),
    (json.dumps([{"user_id": "a"}] * 10_001).encode(), 400),
    (b"[" + b'{"user_id": "a1", "spp": 1},' * 40_000 + b"{}]", 413),
    (b"\n\t " + json.dumps({"user_id": "1", "pad": "x" * 70_000}).encode(), 413),
]


def test_bad_writes_answer_4xx_and_publish_nothing(replica: GradeReplica, stream: str) -> None:
    for body, code in BAD_WRITES:
        got, _, answer = http("POST", replica.write_url + "/set", body, AUTH)
        assert (got, set(json.loads(answer))) == (code, {"Error"}), body[:60]
    for path in ("/set/x", "//set", "/set/", "/"):
        got, _, _ = http("POST", replica.write_url + path, b'{"user_id": "p", "spp": 1}', AUTH)
        assert got == 404, path
    assert http("GET", replica.write_url + "/set", None, AUTH)[0] == 405
    assert http("POST", replica.write_url + "/set", b'{"user_id": "p", "spp": 1}')[0] == 401
    assert http("POST", replica.write_url + "/set", b'{"user_id": "p", "spp": 1}', basic("admin", "x"))[0] == 401
    assert replica.set({"user_id": "last", "spp": 1})[0] == 200
    # Only the replica's sync marker and the one good write are in the stream.
    messages = read_stream(stream, 10, timeout=3)
    assert [p.type for _, p, _ in messages] == ["sync-marker", "write"]
    assert replica.get("p")[0] == 404 and replica.metric("gradesvc_users") == 1


def test_bad_paths_and_targets_on_the_read_port(replica: GradeReplica) -> None:
    replica.set({"user_id": "1", "spp": 1})
    for path in ("/get/x?user_id=1", "//get?user_id=1", "/backup/x", "//backup", "/ready/", "/metrics/x"):
        code, _, body = http("GET", replica.read_url + path)
        assert (code, json.loads(body)) == (404, {"Error": "no such path"}), path
    for target in (b"get?user_id=1", b"http://elsewhere/get?user_id=1", b"%2Fget", b"/get#x"):
        answer = raw(replica.get_port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status(answer) == 404, target
    # twisted.web answers the asterisk-form itself: only OPTIONS may use it.
    assert status(raw(replica.get_port, b"GET * HTTP/1.1\r\nHost: x\r\n\r\n")) == 405
    assert http("GET", replica.read_url + "/get?user_id=%ff")[0] == 400
    assert http("GET", replica.read_url + "/get?user_id=1&other=x")[0] == 200  # unknown arguments are ignored
    for bad in ("x", "-1", "1.0", "99999999999999999999", "1&min_offset=2"):
        assert http("GET", replica.read_url + "/get?user_id=1&min_offset=" + bad)[0] == 400, bad
    assert http("POST", replica.read_url + "/get?user_id=1")[0] == 405


def test_limits_are_enforced_before_the_body_is_read(replica: GradeReplica) -> None:
    # 200 MB announced, nothing sent: the answer comes at once, from the headers alone.
    head = b"POST /set HTTP/1.1\r\nHost: x\r\nContent-Length: 200000000\r\n\r\n"
    started = time.monotonic()
    answer = raw(replica.set_port, head)
    assert status(answer) == 401 and b"WWW-Authenticate: Basic" in answer
    answer = raw(replica.set_port, head.replace(b"Host: x", b"Host: x\r\n" + AUTH_HEADER))
    assert status(answer) == 413
    chunked = b"POST /set HTTP/1.1\r\nHost: x\r\n" + AUTH_HEADER + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = raw(replica.set_port, chunked + (b"4000\r\n" + b"x" * 0x4000 + b"\r\n") * 5)
    assert status(answer) == 413
    assert time.monotonic() - started < 5
    big = b"GET /get?user_id=1 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 20000 + b"\r\n\r\n"
    assert status(raw(replica.get_port, big)) == 431
    many = b"GET /get HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n"
    assert status(raw(replica.get_port, many)) == 431
    assert replica.alive() and replica.metric("gradesvc_users") == 0


AUTH_HEADER = b"Authorization: " + AUTH["Authorization"].encode()


def test_clients_that_vanish_mid_request(replica: GradeReplica) -> None:
    for data in (
        b"POST /set HTTP/1.1\r\nHost: x\r\n",  # mid-headers
        b"POST /set HTTP/1.1\r\nHost: x\r\n" + AUTH_HEADER + b"\r\nContent-Length: 40\r\n\r\n{\"user_id\"",
        b"GET /backup HTTP/1.1\r\nHost: x\r\n\r\n",  # gone before reading the answer
    ):
        port = replica.get_port if b"backup" in data else replica.set_port
        raw(port, data, read=False)
    for i in range(50):
        assert replica.set({"user_id": f"u{i}", "spp": i})[0] == 200
    # A backup client that reads a little, then goes away.
    with socket.create_connection(("127.0.0.1", replica.get_port)) as s:
        s.sendall(b"GET /backup HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(100)
    wait_until(lambda: replica.get("u1")[0] == 200, 10, "the replica serving on")
    assert replica.alive()
    assert_no_logged_errors([replica])


@pytest.fixture
def lb(tmp_path: Path) -> Iterator[Tuple[Gateway, Backend]]:
    backend = Backend("one")
    write_servers(tmp_path / "servers.yaml", [backend])
    gateway = Gateway(tmp_path)
    gateway.env["LBSVC_MAX_BODY"] = "1000"
    gateway.start().wait_ready()
    yield gateway, backend
    gateway.stop()
    backend.stop()
    assert_no_logged_errors([gateway])


BAD_CREATES: List[Tuple[bytes, int]] = [
    (b'{"name": "bob\\n"}', 400),
    (b'{"name": "bob\\u0000"}', 400),
    (b'{"name": "\\udc80"}', 400),
    (b'{"\\udc80": "x"}', 400),
    (b'{"name": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
    (b'{"name": "x", "capacity": 5}', 400),
    (b'{"name": "' + b"x" * 65 + b'"}', 400),
    (b'{"name": "sp ace"}', 400),
    (b"[]", 400),
    (b"\xff", 400),
    (json.dumps({"name": "x" * 20_000}).encode(), 413),
]

BAD_CHANGES = [
    {"rate_per_sec": 1e-309}, {"rate_per_sec": 1e-300}, {"rate_per_sec": 0}, {"rate_per_sec": 0.0009},
    {"rate_per_sec": 1_000_001}, {"rate_per_sec": True}, {"rate_per_sec": "1"}, {"rate_per_sec": None},
    {"capacity": 0}, {"capacity": 1_000_000_001}, {"capacity": 2.5}, {"capacity": True}, {"capacity": -1},
    {}, {"other": 1},
]


def test_gateway_refuses_bad_input_and_stays_correct(lb: Tuple[Gateway, Backend]) -> None:
    gateway, backend = lb
    key = gateway.create("good")
    for body, code in BAD_CREATES:
        got, headers, answer = gateway.call("POST", "/user/create", raw=body)
        assert (got, set(json.loads(answer))) == (code, {"Error", "request_id"}), body[:40]
        assert json.loads(answer)["request_id"] == headers["x-request-id"]
    for change in BAD_CHANGES:
        got, _, answer = gateway.call("POST", "/user/tokens/change", change, key=key)
        assert got == 400, change
    for body in (b"NaN", b'{"rate_per_sec": NaN}', b'{"rate_per_sec": 1e999}'):
        assert gateway.call("POST", "/user/tokens/change", raw=body, key=key)[0] == 400
    profile = json.loads(gateway.call("GET", "/user/tokens/profile", key=key)[2])
    assert (profile["capacity"], profile["rate_per_sec"]) == (5, 1)
    assert gateway.call("GET", "/user/nothing")[0] == 404 and gateway.call("GET", "/user/")[0] == 404
    assert gateway.call("GET", "/user/create")[0] == 405
    assert gateway.call("POST", "/user/tokens/change", {"rate_per_sec": 0.001}, key=key)[0] == 200
    for _ in range(5):
        assert gateway.call("GET", "/x", key=key)[0] == 200
    code, headers, _ = gateway.call("GET", "/x", key=key)
    assert code == 429 and headers["retry-after"] == "1000"  # a whole number of seconds, small
    assert metric(f"http://127.0.0.1:{gateway.admin_port}/metrics", "lbsvc_users") == 1


def test_gateway_checks_key_and_size_before_reading_the_body(lb: Tuple[Gateway, Backend]) -> None:
    gateway, backend = lb
    key = gateway.create("uploader")
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 200000000\r\n"
    assert status(raw(gateway.port, head + b"\r\n")) == 401
    assert status(raw(gateway.port, head + b"Authorization: " + key.encode() + b"\r\n\r\n")) == 413
    small = b"POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: " + key.encode() + b"\r\nContent-Length: 1001\r\n\r\n"
    assert status(raw(gateway.port, small + b"x" * 1001)) == 413
    assert [s for s in backend.seen if s["_path"] != "/health"] == []  # nothing reached the backend
    assert gateway.call("POST", "/upload", key=key, raw=b"x" * 1000)[0] == 200
    assert [s["_body"] for s in backend.seen if s["_path"] == "/upload"] == ["x" * 1000]


def test_locked_database_is_503_within_two_seconds(lb: Tuple[Gateway, Backend], tmp_path: Path) -> None:
    gateway, _ = lb
    lock = sqlite3.connect(str(tmp_path / "users.sqlite3"), timeout=0)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        code, headers, body = gateway.call("POST", "/user/create", {"name": "blocked"})
        assert time.monotonic() - started < 2.0
        assert code == 503 and headers["retry-after"] == "1" and "Error" in json.loads(body)
    finally:
        lock.rollback()
        lock.close()
    wait_until(lambda: gateway.call("POST", "/user/create", {"name": "after"})[0] == 201, 5, "writes again")


def test_database_deleted_while_running_is_loud(lb: Tuple[Gateway, Backend], tmp_path: Path) -> None:
    gateway, _ = lb
    (tmp_path / "users.sqlite3").unlink()
    code, _, body = gateway.call("POST", "/user/create", {"name": "vanishing"})
    assert code == 503 and "deleted" in json.loads(body)["Error"]
    ready = f"http://127.0.0.1:{gateway.admin_port}/ready"
    wait_until(lambda: http("GET", ready)[0] == 503, 5, "/ready to say so")
    assert "deleted" in json.loads(http("GET", ready)[2])["problems"]["database"]
    assert "was deleted while running" in gateway.log()


def test_a_database_that_cannot_be_opened_stops_lbsvc(tmp_path: Path) -> None:
    write_servers(tmp_path / "servers.yaml", [])
    (tmp_path / "servers.yaml").write_text('servers:\n  - {name: a, url: "http://127.0.0.1:1"}\n')
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "--logfile=-", "lbsvc", "--servers", str(tmp_path / "servers.yaml"),
         "--database", str(tmp_path / "no-such-dir" / "users.sqlite3"),
         "--endpoint", f"tcp:{free_port()}:interface=127.0.0.1",
         "--admin-endpoint", f"tcp:{free_port()}:interface=127.0.0.1"],
        capture_output=True, text=True, timeout=30, cwd=str(tmp_path),
    )
    assert result.returncode != 0
    last = (result.stderr or result.stdout).strip().splitlines()[-1]
    assert last.startswith("lbsvc: cannot open the user database")



def glued_port_target(backend_port: int, wanted: int) -> bytes:
    """Digits that, glued onto ``backend_port`` as the old gateway did, wrap around to ``wanted``."""
    for width in range(5, 9):  # digits d of this many places: backend_port * 10**width + d = wanted (mod 2**16)
        d = (wanted - backend_port * 10**width) % 65536
        while d < 10 ** (width - 1):
            d += 65536
        if d < 10**width:
            assert int(f"{backend_port}{d}") % 65536 == wanted
            return b"%d/secret" % d
    raise AssertionError("no such digits")


def test_no_request_target_reaches_anything_but_a_configured_backend(lb: Tuple[Gateway, Backend]) -> None:
    gateway, backend = lb
    key = gateway.create("prober").encode()
    bystander = socket.create_server(("127.0.0.1", 0))
    bystander.settimeout(0.2)
    port = bystander.getsockname()[1]
    # twisted.web answers the asterisk-form itself (405: only OPTIONS may use it).
    assert status(raw(gateway.port, b"GET * HTTP/1.1\r\nHost: x\r\nAuthorization: " + key + b"\r\n\r\n")) == 405
    targets = [b":%d/" % port, b"%d/" % port, b"@127.0.0.1:%d/" % port, b"0/",
               glued_port_target(backend.port, port), b"127.0.0.1:%d" % port, b"x/y", b"/a#b", b"/\xff"]
    try:
        for target in targets:
            answer = raw(gateway.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + key + b"\r\n\r\n")
            assert status(answer) == 400, (target, answer[:200])
        for target in (b"//127.0.0.1:%d/x" % port, b"http://127.0.0.1:%d/y" % port):
            answer = raw(gateway.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + key + b"\r\n\r\n")
            assert status(answer) in (200, 429), (target, answer[:200])  # the configured backend answered
        with pytest.raises(socket.timeout):
            bystander.accept()  # nothing ever connected to the unconfigured listener
    finally:
        bystander.close()
    ready = json.loads(http("GET", f"http://127.0.0.1:{gateway.admin_port}/ready")[2])
    assert ready["backends"] == {"one": True}  # no client's bad request took the backend out
    paths = [s["_path"] for s in backend.seen if s["_path"] != "/health"]
    # (Python's http.server folds a leading "//" into "/": what matters is who got it.)
    assert [p.lstrip("/") for p in paths] == [f"127.0.0.1:{port}/x", "y"]
