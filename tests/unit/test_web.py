"""svckit's web layer on the wire, in memory: a real HTTPChannel on a StringTransport.

Every stage a client can leave at, every refusal made before a body is read,
and every error path.  The ``logged_errors`` fixture fails a test that logs an
error it does not expect.
"""

from __future__ import annotations

import io
import json
import string
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.test.requesthelper import DummyRequest

from svckit.accesslog import AccessLog
from svckit.channel import GuardedChannel
from svckit.metrics import new_registry, sample_value
from svckit.requestid import new_request_id, safe_request_id
from svckit.responses import STREAMED, HTTPError, JSONResponse, Response
from svckit.site import make_site
from svckit.testing import response
from svckit.web import Route, Router, read_json, read_json_value
from tests.conftest import LoggedErrors

SAFE_ID_CHARS = string.ascii_letters + string.digits + "._:-"


def deny_without_token(request: server.Request) -> None:
    if request.requestHeaders.getRawHeaders(b"x-token") != [b"secret"]:
        raise HTTPError(401, "no token")


class App:
    """A router with one route of each kind, recording what its handlers saw."""

    def __init__(self) -> None:
        self.calls: List[str] = []
        self.pending: Optional[defer.Deferred[Any]] = None
        self.registry = new_registry()
        self.clock = Clock()
        self.router = Router(
            {
                b"/sync": Route("sync", {b"GET": self.sync, b"POST": self.echo}, max_body=100),
                b"/async": Route("async", {b"GET": self.wait}),
                b"/boom": Route("boom", {b"GET": self.boom}),
                b"/aboom": Route("aboom", {b"GET": self.aboom}),
                b"/stream": Route("stream", {b"GET": self.stream}),
                b"/guarded": Route("guarded", {b"POST": self.echo}, max_body=100, guard=deny_without_token),
                b"/bulk": Route("bulk", {b"POST": self.echo_any}, max_body=100, max_array_body=1000),
            },
            registry=self.registry, prefix="t", max_body=10,
        )
        self.access = AccessLog("off", self.clock)
        self.site = make_site(self.router, self.access)

    def sync(self, request: server.Request) -> Response:
        self.calls.append("sync")
        return JSONResponse({"ok": True})

    def echo(self, request: server.Request) -> Response:
        self.calls.append("echo")
        return JSONResponse(read_json(request))

    def echo_any(self, request: server.Request) -> Response:
        self.calls.append("echo_any")
        return JSONResponse({"got": read_json_value(request)})

    async def wait(self, request: server.Request) -> Response:
        self.calls.append("wait")
        self.pending = defer.Deferred()
        await self.pending
        return JSONResponse({"waited": True})

    def boom(self, request: server.Request) -> Response:
        raise ZeroDivisionError("sync bug")

    async def aboom(self, request: server.Request) -> Response:
        raise KeyError("async bug")

    async def stream(self, request: server.Request) -> Response:
        request.setHeader(b"content-type", b"text/plain")
        request.write(b"part one;")
        self.pending = defer.Deferred()
        await self.pending
        request.write(b"part two")
        return STREAMED

    def connect(self) -> Tuple[GuardedChannel, StringTransport]:
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def count(self, route: str, code: int) -> float:
        return sample_value(self.registry, "t_http_requests_total", {"route": route, "code": str(code)})


@pytest.fixture
def app() -> App:
    return App()


def test_a_plain_answer_keeps_the_connection(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"GET /sync HTTP/1.1\r\nHost: x\r\n\r\n")
    code, head, body = response(transport)
    assert (code, json.loads(body)) == (200, {"ok": True})
    assert b"Content-Length: 11" in head and not transport.disconnecting
    assert app.count("sync", 200) == 1


@pytest.mark.parametrize("target", [b"/sync/", b"//sync", b"/sync/x", b"/Sync", b"/sync%2F", b"/"])
def test_only_exact_paths(app: App, target: bytes) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    code, _, body = response(transport)
    assert (code, json.loads(body)) == (404, {"Error": "no such path"})
    assert app.calls == [] and app.count("unmatched", 404) == 1


def test_wrong_method_is_405_with_allow(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"DELETE /sync HTTP/1.1\r\nHost: x\r\n\r\n")
    code, head, _ = response(transport)
    assert code == 405 and b"Allow: GET, POST" in head


def test_head_is_get_without_a_body(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"HEAD /sync HTTP/1.1\r\nHost: x\r\n\r\n")
    code, head, body = response(transport)
    assert (code, body) == (200, b"")


def test_content_length_over_the_limit_is_413_before_the_body(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"POST /sync HTTP/1.1\r\nHost: x\r\nContent-Length: 200000000\r\n\r\n")
    code, head, body = response(transport)
    assert (code, json.loads(body)) == (413, {"Error": "body larger than 100 bytes"})
    assert b"Connection: close" in head and transport.disconnecting
    channel.dataReceived(b"x" * 100_000)  # whatever else arrives is dropped, not stored
    assert app.calls == [] and app.count("sync", 413) == 1
    assert transport.value().count(b"HTTP/1.1") == 1


def test_expect_continue_is_not_answered_for_a_refused_body(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"POST /sync HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n\r\n")
    assert b"100 Continue" not in transport.value()
    assert response(transport)[0] == 413


def test_a_chunked_body_is_refused_once_it_passes_the_limit(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"POST /sync HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(b"32\r\n" + b"x" * 50 + b"\r\n")
    assert transport.value() == b""
    channel.dataReceived(b"40\r\n" + b"x" * 64 + b"\r\n0\r\n\r\n")
    code, _, body = response(transport)
    assert code == 413 and transport.disconnecting
    assert app.calls == []


def test_a_chunked_body_within_the_limit_is_handled(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"POST /sync HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"7\r\n{\"a\":1}\r\n0\r\n\r\n")
    code, _, body = response(transport)
    assert (code, json.loads(body)) == (200, {"a": 1})


@pytest.mark.parametrize("body, code", [
    (b"  [" + b"1," * 400 + b"1]", 200),  # an array may pass the object limit, up to its own
    (b"[" + b"1," * 600 + b"1]", 413),  # not past its own
    (b' {"a": "' + b"x" * 200 + b'"}', 413),  # anything else keeps the object limit
])
def test_an_array_limit_is_decided_by_the_first_byte(app: App, body: bytes, code: int) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"POST /bulk HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert response(transport)[0] == code
    assert app.calls == (["echo_any"] if code == 200 else [])


def test_an_object_over_its_limit_is_refused_at_its_first_chunk_not_after_the_array_limit(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"POST /bulk HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n")  # within either limit
    assert transport.value() == b""
    channel.dataReceived(b'{"a": "' + b"x" * 150)  # an object, already past 100 bytes: refused now
    code, _, _ = response(transport)
    assert code == 413 and transport.disconnecting and app.calls == []
    channel, transport = app.connect()
    channel.dataReceived(b"POST /bulk HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")  # past both
    assert response(transport)[0] == 413


def test_no_credentials_is_401_before_a_large_body(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"POST /guarded HTTP/1.1\r\nHost: x\r\nContent-Length: 200000000\r\n\r\n")
    code, _, body = response(transport)
    assert (code, json.loads(body)) == (401, {"Error": "no token"})
    assert transport.disconnecting and app.calls == []


def test_no_credentials_without_a_body_keeps_the_connection(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"POST /guarded HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert response(transport)[0] == 401 and not transport.disconnecting
    transport.clear()
    channel.dataReceived(b"POST /guarded HTTP/1.1\r\nHost: x\r\nX-Token: secret\r\nContent-Length: 2\r\n\r\n{}")
    assert response(transport)[:1] == (200,) and app.calls == ["echo"]


@pytest.mark.parametrize("head, code", [
    (b"GET /sync HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n", 431),
    (b"GET /sync HTTP/1.1\r\n" + b"X-Big: " + b"y" * 20000 + b"\r\n\r\n", 431),
    (b"GET /sync HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"y" * 900) for i in range(40)) + b"\r\n", 431),
    (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 414),
])
def test_oversize_heads(app: App, head: bytes, code: int) -> None:
    channel, transport = app.connect()
    channel.dataReceived(head)
    got, _, body = response(transport)
    assert got == code and "Error" in json.loads(body)
    assert transport.disconnecting and app.calls == []


def test_a_head_trickled_line_by_line_meets_its_deadline(app: App) -> None:
    """The idle timeout resets on every line; the head as a whole has HEAD_TIMEOUT seconds."""
    channel, transport = app.connect()
    now = [1000.0]
    channel.clock = lambda: now[0]  # type: ignore[method-assign]
    channel.dataReceived(b"GET /sync HTTP/1.1\r\n")
    for i in range(3):  # a line every 10 s: each within the idle timeout, 30 s in all
        now[0] += 10
        channel.dataReceived(b"X-Slow-%d: 1\r\n" % i)
    assert transport.value() == b""
    now[0] += 0.5
    channel.dataReceived(b"X-Late: 1\r\n")
    code, head, body = response(transport)
    assert code == 408 and b"Connection: close" in head and transport.disconnecting
    assert app.calls == [] and "within 30s" in json.loads(body)["Error"]


def test_each_request_of_a_connection_gets_its_own_head_deadline(app: App) -> None:
    channel, transport = app.connect()
    now = [0.0]
    channel.clock = lambda: now[0]  # type: ignore[method-assign]
    for _ in range(3):
        now[0] += 25  # long gaps between requests are the idle timeout's business
        channel.dataReceived(b"GET /sync HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 200") == 3 and not transport.disconnecting


def test_malformed_request_line_is_400(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"GARBAGE\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400")


def test_client_gone_while_sending_the_body(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"POST /sync HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"a\":")
    channel.connectionLost(Failure(error.ConnectionDone()))
    assert app.calls == [] and transport.value() == b""


def test_client_gone_while_the_handler_waits(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"GET /async HTTP/1.1\r\nHost: x\r\n\r\n")
    assert app.calls == ["wait"] and app.pending is not None
    pending = app.pending
    channel.connectionLost(Failure(error.ConnectionLost()))
    assert pending.called  # cancelled: the handler stopped waiting
    assert transport.value() == b""
    assert app.count("async", 499) == 1


def test_client_gone_midway_through_a_streamed_answer(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"part one;" in transport.value()
    pending = app.pending
    channel.connectionLost(Failure(error.ConnectionLost()))
    assert pending is not None and pending.called
    assert b"part two" not in transport.value()
    assert app.count("stream", 499) == 1


def test_streamed_answer_is_finished_by_the_router(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert app.pending is not None
    app.pending.callback(None)
    data = transport.value()
    assert b"part one;" in data and b"part two" in data and data.endswith(b"0\r\n\r\n")
    assert app.count("stream", 200) == 1


def test_async_answer_after_waiting(app: App) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"GET /async HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value() == b""
    assert app.pending is not None
    app.pending.callback(None)
    assert response(transport)[0] == 200


@pytest.mark.parametrize("path, kind", [(b"/boom", ZeroDivisionError), (b"/aboom", KeyError)])
def test_unexpected_errors_are_500_and_logged_once(app: App, logged_errors: LoggedErrors, path: bytes,
                                                    kind: type) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    code, _, body = response(transport)
    assert (code, json.loads(body)) == (500, {"Error": "internal error"})
    logged = logged_errors.flush(kind)
    assert len(logged) == 1 and logged[0]["uri"] == path.decode()


def test_an_error_after_the_client_left_is_logged_not_written(app: App, logged_errors: LoggedErrors) -> None:
    channel, transport = app.connect()
    channel.dataReceived(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert app.pending is not None
    pending = app.pending
    request = channel.requests[0]
    request._disconnected = True  # gone, but the handler's Deferred not yet cancelled
    pending.errback(RuntimeError("late bug"))
    assert len(logged_errors.flush(RuntimeError)) == 1
    assert b"500" not in transport.value()


def test_a_router_admits_requests_that_bypassed_the_channel(app: App) -> None:
    request = DummyRequest([b"guarded"])
    request.path = b"/guarded"
    request.method = b"POST"
    request.content = io.BytesIO(b"{}")
    body = app.router.render(request)
    assert request.responseCode == 401 and json.loads(body) == {"Error": "no token"}
    request = DummyRequest([b"sync"])
    request.path = b"/sync"
    request.method = b"POST"
    request.content = io.BytesIO(b"x" * 101)
    app.router.render(request)
    assert request.responseCode == 413
    assert app.calls == []


def test_access_log_buffers_and_flushes_once_a_second(tmp_path: Path) -> None:
    app = App()
    path = tmp_path / "access.log"
    app.site.access_log = log = AccessLog(str(path), app.clock)
    log.startService()
    channel, transport = app.connect()
    for _ in range(3):
        channel.dataReceived(b"GET /sync HTTP/1.1\r\nHost: x\r\nUser-Agent: t\"q\r\n\r\n")
    channel.dataReceived(b"POST /sync HTTP/1.1\r\nHost: x\r\nContent-Length: 999\r\n\r\n")
    assert path.read_text() == "" and log.buffered == 4
    app.clock.advance(1.0)
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and log.buffered == 0
    assert lines[0].endswith('"GET /sync HTTP/1.1" 200 11 "-" "t\\x22q"')
    assert '"POST /sync HTTP/1.1" 413' in lines[3]
    log.stopService()


def test_a_guard_that_breaks_is_500_before_the_body(app: App, logged_errors: LoggedErrors) -> None:
    def broken(request: server.Request) -> None:
        raise KeyError("bug in a guard")

    app.router.routes[b"/broken"] = Route("broken", {b"POST": app.echo}, guard=broken)
    channel, transport = app.connect()
    channel.dataReceived(b"POST /broken HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    code, _, body = response(transport)
    assert (code, json.loads(body)) == (500, {"Error": "internal error"}) and app.calls == []
    assert len(logged_errors.flush(KeyError)) == 1


@given(st.binary(max_size=140))
def test_only_short_safe_request_ids_are_kept(value: bytes) -> None:
    safe = 0 < len(value) <= 128 and all(chr(c) in SAFE_ID_CHARS for c in value)
    assert (safe_request_id([value]) == value) is safe
    assert safe_request_id([value, value]) is None and safe_request_id(None) is None


def test_made_request_ids_are_unique_and_safe() -> None:
    made = {new_request_id() for _ in range(1000)}
    assert len(made) == 1000 and all(safe_request_id([m]) == m for m in made)


def test_json_access_log_is_one_valid_object_a_line_whatever_the_request(tmp_path: Path) -> None:
    app = App()
    path = tmp_path / "access.json"
    app.site.access_log = log = AccessLog(str(path), app.clock, "json")
    log.startService()
    app.clock.advance(1_764_000_000.25)
    channel, transport = app.connect()
    channel.dataReceived(b"GET /sync HTTP/1.1\r\nHost: x\r\nUser-Agent: t\"q\\\xff\r\nX-Request-Id: from-the-client\r\n\r\n")
    channel, transport = app.connect()
    channel.dataReceived(b"GET /n%C3%A9\"\\x HTTP/1.1\r\nHost: x\r\nReferer: r\r\n\r\n")
    channel, transport = app.connect()
    channel.dataReceived(b"POST /sync HTTP/1.1\r\nHost: x\r\nContent-Length: 999\r\n\r\n")
    app.clock.advance(1.0)
    raw = path.read_bytes()
    assert raw.isascii()
    first, second, third = (json.loads(line) for line in raw.splitlines())
    assert first["time"] == "2025-11-24T16:00:00.250Z" and first["request_id"] == "from-the-client"
    assert first["method"] == "GET" and first["target"] == "/sync" and first["protocol"] == "HTTP/1.1"
    assert first["status"] == 200 and first["bytes"] == 11 and first["duration_ms"] == 0.0
    assert first["user_agent"] == "t\"q\\\xff" and first["referer"] is None
    assert first["client"] == "192.168.1.1"  # StringTransport's peer
    assert second["target"] == "/n%C3%A9\"\\x" and second["status"] == 404 and second["referer"] == "r"
    assert second["request_id"] != first["request_id"]
    assert third["status"] == 413 and third["method"] == "POST"
    log.stopService()


def test_log_fields_join_the_json_line_and_the_user_the_combined_one(tmp_path: Path) -> None:
    clock = Clock()
    lines = []
    for format in ("json", "combined"):
        path = tmp_path / f"access.{format}"
        log = AccessLog(str(path), clock, format)
        log.startService()
        request = DummyRequest([b"x"])
        request.uri = request.path = b"/x"
        request.code, request.sentLength = 200, 0
        request.log_fields = {"user": "al ice\"", "backend": "a", "upstream_ms": 1.5, "n": None}
        log.record(request)
        log.stopService()
        lines.append(path.read_text().rstrip("\n"))
    fields = json.loads(lines[0])
    assert (fields["user"], fields["backend"], fields["upstream_ms"], fields["n"]) == ("al ice\"", "a", 1.5, None)
    assert ' - al ice\\x22 [' in lines[1]


def test_an_unknown_access_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="combined, json"):
        AccessLog("-", Clock(), "xml")
