"""The upstream HTTP/1.1 client on a StringTransport: framing, reuse, and every malformed answer."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from lbsvc.proxying.upstream import BadResponse, IResponseSink, StaleConnection, UpstreamConnection
from svckit.requestbody import HIGH_WATER, BodyBrokenOff, RequestBody


@implementer(IResponseSink)
class Sink:
    def __init__(self) -> None:
        self.heads: List[Tuple[int, bytes, List[Tuple[bytes, bytes]], Optional[int], bool]] = []
        self.body = b""

    def head(self, code: int, phrase: bytes, headers: List[Tuple[bytes, bytes]], length: Optional[int],
             body: bool) -> None:
        self.heads.append((code, phrase, headers, length, body))

    def data(self, chunk: bytes) -> None:
        self.body += chunk


class Pool:
    def __init__(self) -> None:
        self.released: List[UpstreamConnection] = []

    def release(self, connection: UpstreamConnection) -> None:
        self.released.append(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        pass


def connection() -> Tuple[UpstreamConnection, StringTransport, Pool]:
    pool = Pool()
    conn = UpstreamConnection(pool, (b"h", 1))  # type: ignore[arg-type]
    transport = StringTransport()
    conn.makeConnection(transport)
    return conn, transport, pool


def exchange(raw: List[bytes], head_only: bool = False) -> Tuple[Sink, List[Any], Pool, StringTransport]:
    conn, transport, pool = connection()
    sink = Sink()
    outcome: List[Any] = []
    conn.request(b"GET / HTTP/1.1\r\nHost: h\r\n", None, sink, head_only).addBoth(outcome.append)
    for piece in raw:
        conn.dataReceived(piece)
    return sink, outcome, pool, transport


def test_request_head_and_content_length_body() -> None:
    conn, transport, _ = connection()
    body = RequestBody(5, lambda: None, lambda: None)
    conn.request(b"PUT /x HTTP/1.1\r\nHost: h\r\n", body, Sink())
    body.feed(b"he")
    body.feed(b"llo")
    body.finish()
    assert transport.value() == b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"


def test_unknown_length_body_is_chunked() -> None:
    conn, transport, _ = connection()
    body = RequestBody(None, lambda: None, lambda: None)
    conn.request(b"POST / HTTP/1.1\r\n", body, Sink())
    body.feed(b"abc")
    body.finish()
    assert transport.value() == b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
       chunk=st.integers(min_value=1, max_value=64))
def test_chunked_answer_survives_any_split(body: bytes, cuts: List[int], chunk: int) -> None:
    encoded = b"".join(b"%x;x=y\r\n%s\r\n" % (len(body[i:i + chunk]), body[i:i + chunk])
                       for i in range(0, len(body), chunk))
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + encoded + b"0\r\nT: 1\r\n\r\n"
    points = sorted({c for c in cuts if c < len(raw)} | {0, len(raw)})
    sink, outcome, pool, _ = exchange([raw[a:b] for a, b in zip(points, points[1:])])
    assert outcome == [None] and sink.body == body and len(pool.released) == 1


def test_content_length_answer_and_reuse() -> None:
    sink, outcome, pool, _ = exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nA: 1\r\n\r\nhel", b"lo"])
    assert outcome == [None] and sink.body == b"hello" and pool.released
    assert sink.heads == [(200, b"OK", [(b"Content-Length", b"5"), (b"A", b"1")], 5, True)]


def test_answer_until_close() -> None:
    conn, transport, pool = connection()
    sink, outcome = Sink(), []
    conn.request(b"GET / HTTP/1.1\r\n", None, sink).addBoth(outcome.append)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nall of")
    conn.dataReceived(b" it")
    assert outcome == []
    conn.connectionLost(Failure(error.ConnectionDone()))
    assert outcome == [None] and sink.body == b"all of it" and pool.released == []


@pytest.mark.parametrize("raw, length", [
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", 0),
    (b"HTTP/1.1 304 Not Modified\r\n\r\n", None),
])
def test_interim_and_bodiless_answers(raw: bytes, length: Optional[int]) -> None:
    sink, outcome, pool, _ = exchange([raw])
    assert outcome == [None] and len(sink.heads) == 1 and sink.heads[0][3:] == (length, False)
    assert pool.released


def test_head_answer_has_no_body_whatever_its_length() -> None:
    sink, outcome, pool, _ = exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"], head_only=True)
    assert outcome == [None] and sink.heads[0][3:] == (99, False) and pool.released


def test_connection_close_is_not_reused() -> None:
    sink, outcome, pool, transport = exchange([b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"])
    assert outcome == [None] and pool.released == [] and transport.disconnecting


@pytest.mark.parametrize("raw", [
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000,
])
def test_malformed_answers(raw: bytes) -> None:
    sink, outcome, pool, transport = exchange([raw])
    assert len(outcome) == 1 and isinstance(outcome[0], Failure) and outcome[0].check(BadResponse)
    assert transport.disconnecting and pool.released == []


def test_cut_off_answer_is_bad() -> None:
    conn, _, _ = connection()
    outcome: List[Any] = []
    conn.request(b"GET / HTTP/1.1\r\n", None, Sink()).addBoth(outcome.append)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    conn.connectionLost(Failure(error.ConnectionLost()))
    assert outcome[0].check(BadResponse)


def test_reused_connection_closed_before_answering_is_stale() -> None:
    conn, _, _ = connection()
    conn.request(b"GET / HTTP/1.1\r\n", None, Sink())
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    outcome: List[Any] = []
    conn.request(b"GET / HTTP/1.1\r\n", None, Sink()).addBoth(outcome.append)
    conn.connectionLost(Failure(error.ConnectionDone()))
    assert outcome[0].check(StaleConnection)


def test_cancel_stops_delivery_and_aborts() -> None:
    conn, transport, pool = connection()
    sink, outcome = Sink(), []
    d = conn.request(b"GET / HTTP/1.1\r\n", None, sink)
    d.addBoth(outcome.append)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    d.cancel()
    conn.dataReceived(b"defghij")
    assert outcome[0].check(defer.CancelledError) and sink.body == b"abc" and pool.released == []


def test_request_body_holds_then_pauses_the_client() -> None:
    calls: List[str] = []
    body = RequestBody(None, lambda: calls.append("pause"), lambda: calls.append("resume"))
    body.feed(b"x" * HIGH_WATER)
    assert calls == []
    body.feed(b"x")
    assert calls == ["pause"]
    written: List[bytes] = []

    class Consumer:
        def write(self, data: bytes) -> None:
            written.append(data)

        def registerProducer(self, producer: Any, streaming: bool) -> None:
            pass

        def unregisterProducer(self) -> None:
            pass

    done: List[Any] = []
    body.startProducing(Consumer()).addBoth(done.append)
    assert calls == ["pause", "resume"] and sum(map(len, written)) == HIGH_WATER + 1
    body.pauseProducing()
    body.feed(b"y")
    body.finish()
    assert done == []
    body.resumeProducing()
    assert done == [None] and written[-1] == b"y"


def test_request_body_broken_off() -> None:
    body = RequestBody(10, lambda: None, lambda: None)
    body.feed(b"abc")
    body.break_off()

    class Consumer:
        def write(self, data: bytes) -> None:
            raise AssertionError("nothing is written after the client left")

        def registerProducer(self, producer: Any, streaming: bool) -> None:
            pass

        def unregisterProducer(self) -> None:
            pass

    outcome: List[Any] = []
    body.startProducing(Consumer()).addBoth(outcome.append)
    assert outcome[0].check(BodyBrokenOff)
    with pytest.raises(RuntimeError):
        body.startProducing(Consumer())
