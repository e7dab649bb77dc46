"""The gateway on the wire, in memory: a real channel in front, scripted backends behind.

The gateway is built by the daemon's own builder (:func:`lbsvc.testing.memory_gateway`).
The client side is a :class:`GuardedChannel` on a ``StringTransport``; behind
it, :class:`lbsvc.testing.ScriptedBackends` records which addresses were
dialled and what was sent, and plays the backend's answer byte by byte.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from lbsvc.backends import servers as config
from lbsvc.proxying.retries import RetryBudget
from lbsvc.testing import ScriptedBackends, memory_gateway
from lbsvc.users.index import User, hash_key
from svckit.accesslog import AccessLog
from svckit.channel import GuardedChannel
from svckit.metrics import new_registry, sample_value
from svckit.requestbody import HIGH_WATER
from svckit.testing import response
from tests.conftest import LoggedErrors

A, B = (b"10.0.0.1", 8001), (b"10.0.0.2", 8002)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Backend: yes\r\n\r\nhi"


class World:
    """A gateway built as the daemon builds it, with two scripted backends; ``modes`` scripts how each connects."""

    def __init__(self, modes: Optional[Dict[Tuple[bytes, int], str]] = None, capacity: int = 100,
                 tries: int = 2) -> None:
        self.backends = ScriptedBackends(modes)
        self.modes = self.backends.modes
        self.dialled = self.backends.dialled
        self.upstreams = self.backends.connections
        self.clock = Clock()
        servers = config.parse({
            "servers": [{"name": "a", "url": "http://10.0.0.1:8001"}, {"name": "b", "url": "http://10.0.0.2:8002"}],
            "timeouts": {"response": 5, "body": 2},
            "retries": {"tries": tries},
        })
        gateway = memory_gateway(servers, self.backends, self.clock, max_body=1 << 20)
        gateway.users.index.remember(User("alice", hash_key("k-1"), capacity, 1.0))
        self.pool = gateway.backends
        self.upstream = gateway.upstream
        self.site = gateway.site()
        self.sent = self.backends.sent
        self.answer = self.backends.answer

    def client(self) -> Tuple[GuardedChannel, StringTransport]:
        channel: GuardedChannel = self.site.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 4321))
        channel.makeConnection(transport)
        return channel, transport

    def send(self, raw: bytes) -> Tuple[GuardedChannel, StringTransport]:
        channel, transport = self.client()
        channel.dataReceived(raw)
        return channel, transport


def get(target: bytes = b"/", extra: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: gw.example\r\nAuthorization: k-1\r\n" + extra + b"\r\n"


def response_or_none(transport: StringTransport) -> Optional[Tuple[int, bytes, bytes]]:
    return response(transport) if transport.value() else None


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size, _, body = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return out
        out, body = out + body[:n], body[n + 2:]


def test_headers_per_rfc_9110_both_ways() -> None:
    world = World()
    _, client = world.send(
        b"POST /x?y=1 HTTP/1.1\r\nHost: gw.example\r\nAuthorization: k-1\r\nConnection: keep-alive, X-Drop\r\n"
        b"X-Drop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Keep: 2\r\nX-Forwarded-For: 203.0.113.9\r\n"
        b"Content-Length: 7\r\n\r\npayload")
    sent = world.sent()
    head, _, body = sent.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /x?y=1 HTTP/1.1" and body == b"payload"
    names = {line.split(b":")[0].lower() for line in lines[1:]}
    assert {b"authorization", b"x-drop", b"keep-alive", b"te", b"connection"}.isdisjoint(names)
    assert b"Host: 10.0.0.1:8001" in lines and b"X-Keep: 2" in lines and b"Content-Length: 7" in lines
    assert b"X-Forwarded-For: 203.0.113.9, 192.0.2.7" in lines
    assert b"X-Forwarded-Host: gw.example" in lines and b"X-Forwarded-Proto: http" in lines
    assert b"Via: 1.1 lbsvc" in lines
    world.answer(b"HTTP/1.1 201 Made\r\nConnection: X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n"
                 b"Via: 1.0 origin\r\nContent-Length: 3\r\n\r\nyes")
    code, out, body = response(client)
    assert (code, body) == (201, b"yes")
    assert b"X-Secret" not in out and b"Keep-Alive" not in out
    assert b"Content-Type" not in out  # nothing invented
    assert b"Via: 1.0 origin, 1.1 lbsvc" in out and b"Content-Length: 3" in out


def test_the_answer_carries_one_date_and_one_server_the_gateways() -> None:
    world = World()
    _, client = world.send(get())
    world.answer(b"HTTP/1.1 200 OK\r\nServer: origin/1.0\r\nDate: Mon, 01 Jan 2001 00:00:00 GMT\r\n"
                 b"Content-Length: 2\r\n\r\nhi")
    code, head, body = response(client)
    assert (code, body) == (200, b"hi")
    assert len(header_values(head, b"date")) == 1 and header_values(head, b"date") != [b"Mon, 01 Jan 2001 00:00:00 GMT"]
    assert len(header_values(head, b"server")) == 1 and b"origin" not in header_values(head, b"server")[0]


def test_connections_are_reused() -> None:
    world = World()
    for _ in range(3):
        _, client = world.send(get())
        world.answer(OK)
        assert response(client)[0] == 200
    assert len(world.upstreams) == 2  # round robin over a and b, each connection used again
    assert world.upstream.idle == 2


def test_chunked_answer_is_relayed() -> None:
    world = World()
    _, client = world.send(get())
    for piece in (b"HTTP/1.1 200 OK\r\nTransfer-", b"Encoding: chunked\r\n\r\n5\r\nhel", b"lo\r\n",
                  b"6;ext=1\r\n world\r\n0\r\n", b"X-Trailer: t\r\n\r\n"):
        world.answer(piece)
    code, head, body = response(client)
    assert code == 200 and b"Transfer-Encoding: chunked" in head
    assert dechunk(body) == b"hello world"
    assert world.upstream.idle == 1


def test_request_body_is_streamed_before_it_is_complete() -> None:
    world = World()
    channel, client = world.client()
    channel.dataReceived(b"PUT /up HTTP/1.1\r\nHost: gw\r\nAuthorization: k-1\r\nContent-Length: 10\r\n\r\nfirst")
    assert world.sent().endswith(b"\r\n\r\nfirst")  # upstream before the rest arrived
    channel.dataReceived(b"-last")
    assert world.sent().endswith(b"\r\n\r\nfirst-last")
    world.answer(OK)
    assert response(client)[0] == 200 and not client.disconnecting


def test_chunked_request_body_goes_upstream_chunked() -> None:
    world = World()
    channel, client = world.client()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: gw\r\nAuthorization: k-1\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n")
    channel.dataReceived(b"2\r\nde\r\n0\r\n\r\n")
    sent = world.sent()
    assert b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n" in sent
    world.answer(OK)
    assert response(client)[0] == 200


def test_a_slow_backend_pauses_the_client() -> None:
    world = World()
    channel, client = world.client()
    channel.dataReceived(b"PUT / HTTP/1.1\r\nHost: gw\r\nAuthorization: k-1\r\nContent-Length: 400000\r\n\r\n")
    upstream = world.upstreams[-1][2]
    upstream.producer.pauseProducing()  # the backend's socket buffer is full
    for _ in range(HIGH_WATER // 8192 + 2):
        channel.dataReceived(b"x" * 8192)
    assert client.producerState == "paused"
    held = len(upstream.value())
    upstream.producer.resumeProducing()
    assert client.producerState == "producing" and len(upstream.value()) > held


def test_answer_before_the_body_closes_the_connection() -> None:
    world = World()
    channel, client = world.client()
    channel.dataReceived(b"PUT / HTTP/1.1\r\nHost: gw\r\nAuthorization: k-1\r\nContent-Length: 100\r\n\r\nabc")
    world.answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    code, head, _ = response(client)
    assert code == 403 and b"Connection: close" in head and client.disconnecting
    channel.dataReceived(b"GET /smuggled HTTP/1.1\r\nHost: gw\r\nAuthorization: k-1\r\n\r\n" + b"z" * 50)
    assert len(world.upstreams) == 1 and b"smuggled" not in world.sent()


def test_refused_connection_moves_on_and_marks_down() -> None:
    world = World({A: "refuse"})
    _, client = world.send(get())
    world.answer(OK)
    assert response(client)[0] == 200
    assert world.dialled == [A, B] and not world.pool.backends[0].healthy


def test_no_healthy_backend_is_503() -> None:
    world = World({A: "refuse", B: "refuse"})
    _, client = world.send(get())
    code, _, body = response(client)
    assert (code, body) == (503, b"No available servers")


def test_response_timeout_is_504_and_takes_the_backend_out() -> None:
    world = World(tries=1)  # one attempt: what the client gets from one bad backend
    _, client = world.send(get())
    world.clock.advance(5.1)
    code, _, body = response(client)
    assert (code, body) == (504, b"Gateway timeout")
    assert [b.healthy for b in world.pool.backends] == [False, True]
    assert world.upstreams[0][2].disconnecting


def test_a_stalled_response_body_is_cut_off_and_the_backend_taken_out() -> None:
    world = World()
    _, client = world.send(get())
    world.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart")
    world.clock.advance(1.5)
    world.answer(b"more")  # resets the idle timer
    world.clock.advance(1.5)
    assert not client.disconnecting
    world.clock.advance(0.6)
    assert client.disconnecting and world.upstreams[0][2].disconnecting
    assert not world.pool.backends[0].healthy


def test_a_client_that_stalls_its_body_gets_408_and_the_backend_stays() -> None:
    world = World()
    channel, client = world.client()
    channel.dataReceived(b"PUT / HTTP/1.1\r\nHost: gw\r\nAuthorization: k-1\r\nContent-Length: 100\r\n\r\nabc")
    world.clock.advance(2.1)
    world.clock.advance(2.1)
    code, head, _ = response(client)
    assert code == 408 and b"Connection: close" in head
    assert all(b.healthy for b in world.pool.backends)


def test_malformed_answer_is_502_and_takes_the_backend_out() -> None:
    world = World(tries=1)  # one attempt: what the client gets from one bad backend
    _, client = world.send(get())
    world.answer(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")
    assert response(client)[0] == 502 and not world.pool.backends[0].healthy


def test_a_client_leaving_drops_the_upstream_connection(logged_errors: LoggedErrors) -> None:
    world = World()
    channel, _ = world.send(get())
    world.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart")
    channel.connectionLost(error.ConnectionLost())
    world.answer(b"rest", index=0)
    assert world.upstreams[0][2].disconnecting and world.upstream.idle == 0
    assert all(b.healthy for b in world.pool.backends)


def test_a_stale_pooled_connection_is_retried_on_a_new_one() -> None:
    world = World({B: "refuse"})
    for _ in range(2):  # the second request reuses a's connection
        _, client = world.send(get())
        world.answer(OK)
    _, client = world.send(get())
    world.upstreams[0][1].connectionLost(Failure(error.ConnectionDone()))  # the backend had closed it
    world.answer(OK)
    assert response(client)[0] == 200 and len(world.upstreams) == 2 and world.pool.backends[0].healthy


def test_head_answer_has_no_body() -> None:
    world = World()
    _, client = world.send(get().replace(b"GET", b"HEAD", 1))
    world.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    code, head, body = response(client)
    assert code == 200 and b"Content-Length: 1000" in head and body == b""
    assert world.upstream.idle == 1
    world.send(get())  # to b
    _, client = world.send(get())  # back to a, on the same connection
    world.answer(OK, index=0)  # not mistaken for the body of the HEAD answer
    assert response(client)[2] == b"hi" and len(world.upstreams) == 2


CONFIGURED = {A, B}
targets = st.one_of(
    st.binary(max_size=60).filter(lambda t: b"\r" not in t and b"\n" not in t and b" " not in t),
    st.builds(lambda a, b: a + b, st.sampled_from([b"", b"/", b"//", b":", b"@", b"?", b"http://", b"HTTPS://x",
                                                   b"64371", b"0", b"[::1]", b"%2F", b"\\", b"*"]),
              st.binary(max_size=30).filter(lambda t: b"\r" not in t and b"\n" not in t and b" " not in t)),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(target=targets)
@example(target=b"64371/secret")
@example(target=b":8079/")
@example(target=b"0/")
@example(target=b"@evil:1/x")
@example(target=b"//evil:1/x")
@example(target=b"http://evil:1/x?y")
def test_only_configured_backends_are_ever_dialled(target: bytes) -> None:
    """Whatever the request-target, what is dialled is a configured backend and what
    is sent is origin-form; anything else was refused with 400 before a backend, or
    answered by the gateway's own user API (a path under /user/, never proxied)."""
    world = World()
    _, client = world.send(get(target))
    assert set(world.dialled) <= CONFIGURED
    if world.dialled:
        line = world.sent().split(b"\r\n", 1)[0]
        assert line.startswith(b"GET /") and line.endswith(b" HTTP/1.1")
    elif client.value():
        code = response(client)[0]
        assert 400 <= code < 500 or (code < 300 and b"/user/" in target), code


def test_a_malformed_chunk_mid_body_drops_the_upstream_request() -> None:
    world = World()
    channel, client = world.client()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: gw\r\nAuthorization: k-1\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n")
    assert world.sent().endswith(b"3\r\nabc\r\n")  # already on its way
    channel.dataReceived(b"zz\r\nnot a chunk\r\n")
    assert client.value().startswith(b"HTTP/1.1 400") and client.disconnecting
    channel.connectionLost(error.ConnectionDone())
    assert world.upstreams[0][2].disconnecting and world.upstream.idle == 0
    assert all(b.healthy for b in world.pool.backends)  # the client's fault


def test_garbage_chunk_size_before_any_body_byte_is_502_not_the_backends_head() -> None:
    world = World(tries=1)  # one attempt: what the client gets from one bad backend
    _, client = world.send(get())
    world.answer(b"HTTP/1.1 200 OK\r\nX-From-Backend: 1\r\nTransfer-Encoding: chunked\r\n\r\nzz-not-hex\r\n")
    code, head, body = response(client)
    assert (code, body) == (502, b"Bad gateway")
    assert b"X-From-Backend" not in head and b"chunked" not in head.lower()
    assert not world.pool.backends[0].healthy  # a warning line, no traceback (the fixture checks)


def test_garbage_chunk_size_after_body_bytes_cuts_the_client_quietly() -> None:
    world = World()
    _, client = world.send(get())
    world.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    world.answer(b"zz-not-hex\r\n")
    code, _, body = response(client)
    assert code == 200 and client.disconnecting  # the client sees an unfinished chunked body
    assert b"0\r\n\r\n" not in body and b"internal error" not in body


def test_a_stalled_body_before_any_byte_was_sent_is_504() -> None:
    world = World()
    _, client = world.send(get())
    world.answer(b"HTTP/1.1 200 OK\r\nX-From-Backend: 1\r\nContent-Length: 10\r\n\r\n")
    world.clock.advance(2.2)
    code, head, body = response(client)
    assert (code, body) == (504, b"Gateway timeout") and b"X-From-Backend" not in head


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",  # framed with bare LF throughout
    b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok",  # one bare LF in the head
])
def test_a_backend_framing_with_bare_lf_is_502_at_once(answer: bytes) -> None:
    world = World(tries=1)  # one attempt: what the client gets from one bad backend
    _, client = world.send(get())
    world.answer(answer)
    assert response(client)[0] == 502 and not world.pool.backends[0].healthy


def test_headers_the_client_names_in_connection_are_dropped_before_ours_are_added() -> None:
    world = World()
    world.send(get(extra=b"Connection: X-Forwarded-For, Via\r\nX-Forwarded-For: 6.6.6.6\r\nVia: 1.0 spoof\r\n"))
    lines = world.sent().split(b"\r\n\r\n")[0].split(b"\r\n")
    assert b"X-Forwarded-For: 192.0.2.7" in lines and b"Via: 1.1 lbsvc" in lines
    assert not any(b"6.6.6.6" in line or b"spoof" in line for line in lines)


def backend_resets(world: World, index: int = 0) -> None:
    world.upstreams[index][1].connectionLost(Failure(error.ConnectionLost("reset by peer")))


def test_a_reset_before_any_answer_is_retried_on_the_next_backend() -> None:
    world = World()
    _, client = world.send(get())
    backend_resets(world)
    assert len(world.upstreams) == 2 and world.upstreams[1][0] == B  # sent again, to b
    assert world.sent(1).startswith(b"GET / HTTP/1.1")
    world.answer(OK)
    code, _, body = response(client)
    assert code == 200 and not world.pool.backends[0].healthy and world.pool.backends[1].healthy


def test_no_answer_in_time_is_retried_and_a_malformed_head_too() -> None:
    world = World()
    _, client = world.send(get())
    world.clock.advance(5.1)  # a: no answer within timeouts.response
    assert len(world.upstreams) == 2 and response_or_none(client) is None
    world.answer(b"HTTP/1.1 200 OK\r\nX-Bad: 1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")  # b: breaks
    code, head, body = response(client)
    assert (code, body) == (502, b"Bad gateway")  # two tries in all: no third
    assert b"X-Bad" not in head


def test_a_post_is_never_sent_twice() -> None:
    world = World()
    _, client = world.send(b"POST / HTTP/1.1\r\nHost: gw\r\nAuthorization: k-1\r\nContent-Length: 0\r\n\r\n")
    backend_resets(world)
    assert len(world.upstreams) == 1 and response(client)[0] == 502


def test_a_request_whose_body_went_up_is_not_retried() -> None:
    world = World()
    _, client = world.send(b"PUT / HTTP/1.1\r\nHost: gw\r\nAuthorization: k-1\r\nContent-Length: 3\r\n\r\nabc")
    assert world.sent().endswith(b"abc")
    backend_resets(world)
    assert len(world.upstreams) == 1 and response(client)[0] == 502


def test_once_the_answer_reached_the_client_nothing_is_retried() -> None:
    world = World()
    _, client = world.send(get())
    world.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart")
    backend_resets(world)
    assert len(world.upstreams) == 1 and client.disconnecting


def test_the_retry_budget_stops_retry_storms() -> None:
    registry = new_registry()
    budget = RetryBudget(registry)
    settings = config.Retries(tries=3, timeout=10.0, budget=0.2)
    budget.active, budget.retrying = 10, 3  # 3 retrying of 10: over 20% and at the minimum of 3
    assert not budget.allows(settings, b"GET", None, 1, 0.0, retrying=False)
    assert budget.allows(settings, b"GET", None, 2, 0.0, retrying=True)  # one already retrying goes on
    budget.active = 20  # 3 of 20 is under 20% of 20 = 4
    assert budget.allows(settings, b"GET", None, 1, 0.0, retrying=False)
    assert not budget.allows(settings, b"GET", None, 3, 0.0, retrying=True)  # tries used up
    assert not budget.allows(settings, b"GET", None, 1, 10.5, retrying=False)  # past the timeout
    assert sample_value(registry, "lbsvc_upstream_retries_total", {"verdict": "budget"}) == 1
    assert sample_value(registry, "lbsvc_upstream_retries_total", {"verdict": "exhausted"}) == 2


def header_values(head: bytes, name: bytes) -> List[bytes]:
    """Every value of header ``name`` in a raw head."""
    prefix = name.lower() + b":"
    return [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(prefix)]


def test_a_safe_request_id_goes_upstream_and_back_unchanged() -> None:
    world = World()
    _, client = world.send(get(extra=b"X-Request-Id: abc.DEF_1:2-3\r\ntraceparent: 00-abc-01\r\ntracestate: a=1\r\n"))
    sent = world.sent().partition(b"\r\n\r\n")[0]
    assert header_values(sent, b"x-request-id") == [b"abc.DEF_1:2-3"]
    assert header_values(sent, b"traceparent") == [b"00-abc-01"] and header_values(sent, b"tracestate") == [b"a=1"]
    world.answer(b"HTTP/1.1 200 OK\r\nX-Request-Id: the-backends-own\r\nContent-Length: 2\r\n\r\nhi")
    code, head, _ = response(client)
    assert code == 200 and header_values(head, b"x-request-id") == [b"abc.DEF_1:2-3"]


@pytest.mark.parametrize("given", [
    b"X-Request-Id: " + b"a" * 129 + b"\r\n",  # too long
    b"X-Request-Id: has space\r\n",
    b"X-Request-Id: semi;colon\r\n",
    b"X-Request-Id: \xc3\xa9\r\n",  # not ASCII
    b"X-Request-Id: one\r\nX-Request-Id: two\r\n",  # two values: neither is the id
])
def test_an_unsafe_request_id_is_replaced_by_one_of_ours(given: bytes) -> None:
    world = World()
    _, client = world.send(get(extra=given))
    sent = world.sent().partition(b"\r\n\r\n")[0]
    [made] = header_values(sent, b"x-request-id")
    assert made not in given and len(made) <= 128
    world.answer(OK)
    assert header_values(response(client)[1], b"x-request-id") == [made]


def test_every_request_gets_its_own_id_and_error_bodies_carry_it() -> None:
    world = World({A: "refuse", B: "refuse"})
    _, first = world.send(get())
    _, second = world.send(get())
    ids = [header_values(response(c)[1], b"x-request-id")[0] for c in (first, second)]
    assert ids[0] != ids[1]  # response() checked that each 503 body names its id
    _, unknown = world.send(b"GET / HTTP/1.1\r\nHost: gw\r\nAuthorization: nope\r\n\r\n")
    code, head, body = response(unknown)
    assert code == 401 and json.loads(body)["request_id"] == header_values(head, b"x-request-id")[0].decode()


def test_ratelimit_headers_on_every_proxied_answer_and_on_429() -> None:
    world = World(capacity=2)  # 2 tokens, 1 per second: refilled from empty in 2 s
    _, client = world.send(get())
    world.answer(b"HTTP/1.1 200 OK\r\nRateLimit: \"backend\";r=99;t=1\r\nContent-Length: 2\r\n\r\nhi")
    code, head, _ = response(client)
    assert code == 200
    assert header_values(head, b"ratelimit-policy") == [b'"default";q=2;w=2']
    assert header_values(head, b"ratelimit") == [b'"default";r=1;t=1']  # the backend's own is not relayed
    _, client = world.send(get())
    world.answer(OK)
    assert header_values(response(client)[1], b"ratelimit") == [b'"default";r=0;t=1']
    _, client = world.send(get())
    code, head, body = response(client)
    assert code == 429 and json.loads(body)["Error"] == "rate limit exceeded"
    assert header_values(head, b"ratelimit") == [b'"default";r=0;t=1'] and header_values(head, b"retry-after") == [b"1"]
    assert header_values(head, b"ratelimit-policy") == [b'"default";q=2;w=2']


def test_a_retried_answer_keeps_the_gateways_headers_and_drops_the_failed_backends() -> None:
    world = World()
    _, client = world.send(get(extra=b"X-Request-Id: keep-me\r\n"))
    world.answer(b"HTTP/1.1 200 OK\r\nX-From-A: 1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")  # a: breaks
    world.answer(OK)  # b answers
    code, head, body = response(client)
    assert (code, body) == (200, b"hi") and b"X-From-A" not in head
    assert header_values(head, b"x-request-id") == [b"keep-me"] and len(header_values(head, b"ratelimit")) == 1


def test_the_json_access_log_names_the_user_the_backend_and_the_request_id(tmp_path: Any) -> None:
    world = World()
    path = tmp_path / "access.json"
    world.site.access_log = log = AccessLog(str(path), world.clock, "json")
    log.startService()
    _, client = world.send(get())
    world.clock.advance(0.25)
    world.answer(OK)
    head = response(client)[1]
    _, twice = world.send(get(extra=b"Authorization: unknown\r\n"))  # two keys: refused, no user
    assert response(twice)[0] == 400 and len(world.upstreams) == 1
    log.flush()
    proxied, refused = (json.loads(line) for line in path.read_text().splitlines())
    assert proxied["request_id"] == header_values(head, b"x-request-id")[0].decode()
    assert (proxied["user"], proxied["backend"], proxied["status"]) == ("alice", "a", 200)
    assert proxied["upstream_ms"] == 250.0 and proxied["duration_ms"] == 250.0
    assert refused["status"] == 400 and "user" not in refused and "backend" not in refused
    log.stopService()
