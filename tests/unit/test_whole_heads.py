"""The one-pass parse of a request head that arrives whole (issue #32) against Twisted's line-by-line one.

:meth:`svckit.channel.GuardedChannel.dataReceived` takes a head that
arrives alone in one read in one pass and leaves everything unusual to
``HTTPChannel``'s line-by-line parse.  The same bytes sent in one read and
sent a byte at a time (always line by line) must give the same answer, the
same headers to the handler and the same refusals, whatever the head holds:
odd and invalid names, folded lines, bare CR and LF, NUL, bodies, too many
headers, malformed request lines.  And :class:`svckit.knownheaders.KnownHeaders`
answers every lookup exactly as ``Headers`` does.
"""

from __future__ import annotations

import json
from typing import Any, List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import server
from twisted.web.http_headers import Headers

from svckit import channel as channel_module
from svckit.accesslog import AccessLog
from svckit.knownheaders import KNOWN_NAMES, KnownHeaders, add_all, known, set_one
from svckit.metrics import new_registry
from svckit.responses import JSONResponse, Response
from svckit.site import make_site
from svckit.web import Route, Router


def echo(request: server.Request) -> Response:
    """What the handler saw of the head."""
    return JSONResponse({
        "method": request.method.decode("latin-1"),
        "uri": request.uri.decode("latin-1"),
        "version": request.clientproto.decode("latin-1"),
        "headers": [[name.decode("latin-1"), [v.decode("latin-1") for v in values]]
                    for name, values in request.requestHeaders.getAllRawHeaders()],
        "host": (request.getHeader(b"host") or b"").decode("latin-1"),
    })


def exchange(chunks: List[bytes]) -> Tuple[bytes, bool]:
    """What a fresh connection writes back for ``chunks`` (Date lines dropped), and whether it closed."""
    routes = {b"/e": Route("e", {b"GET": echo, b"POST": echo}, max_body=100)}
    router = Router(routes, registry=new_registry(), prefix="t", max_body=100)
    site = make_site(router, AccessLog("off", Clock()))
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    for chunk in chunks:
        if transport.disconnecting:  # a real transport reads nothing more once closing
            break
        channel.dataReceived(chunk)
    written = b"\r\n".join(line for line in transport.value().split(b"\r\n") if not line.startswith(b"Date: "))
    return written, bool(transport.disconnecting)


names = st.sampled_from([b"Host", b"host", b"HOST", b"X-Api-Key", b"x-api-key", b"Accept", b"Content-Length",
                         b"content-length", b"Transfer-Encoding", b"X Bad", b"X\x00", b"", b"\xe9t\xe9", b"Te",
                         b"Authorization", b"X-Very-" + b"Long" * 10])
values = st.sampled_from([b"1", b" spaced \t", b"", b"a\rb", b"a\nb", b"nul\x00", b"chunked", b"0", b"5",
                          b"caf\xc3\xa9", b"x" * 50])
lines = st.one_of(
    st.tuples(names, values).map(lambda nv: nv[0] + b": " + nv[1]),
    st.sampled_from([b" folded", b"\tfolded", b"no colon", b":empty name", b"X-Colon:a:b"]),
)
request_lines = st.sampled_from([b"GET /e HTTP/1.1", b"GET /e?x=1 HTTP/1.0", b"POST /e HTTP/1.1", b"GET /e",
                                 b"GET  /e HTTP/1.1", b"get /e HTTP/1.1", b"GET /e HTTP/2.0", b"", b"GET /\x7fe HTTP/1.1",
                                 b"GET /other HTTP/1.1", b"G@T /e HTTP/1.1"])


@settings(max_examples=400, deadline=None)
@given(first=request_lines, header_lines=st.lists(lines, max_size=6), body=st.sampled_from([b"", b"{}", b"ab"]))
def test_one_read_or_a_byte_at_a_time_the_same_answer(first: bytes, header_lines: List[bytes], body: bytes) -> None:
    data = b"\r\n".join([first] + header_lines) + b"\r\n\r\n" + body
    whole = exchange([data])
    trickled = exchange([data[i:i + 1] for i in range(len(data))])
    assert whole == trickled, data


def test_a_plain_get_takes_the_one_pass_and_its_handler_sees_every_header() -> None:
    assert channel_module.WHOLE_HEADS  # this Twisted has what the one pass reuses
    data = b"GET /e?q=1 HTTP/1.1\r\nhost: gw\r\nX-A: 1\r\nx-a: 2\r\nAccept:  */* \r\n\r\n"
    calls: List[Any] = []
    original = channel_module.GuardedChannel._whole_head

    def spy(self: Any, got: bytes) -> bool:
        calls.append(original(self, got))
        return bool(calls[-1])

    channel_module.GuardedChannel._whole_head = spy  # type: ignore[method-assign]
    try:
        written, closed = exchange([data, data])
    finally:
        channel_module.GuardedChannel._whole_head = original  # type: ignore[method-assign]
    assert calls == [True, True] and not closed
    head, rest = written.split(b"\r\n\r\n", 1)
    length = int(next(line for line in head.split(b"\r\n") if line.startswith(b"Content-Length: "))[16:])
    first = json.loads(rest[:length])
    assert first == {"method": "GET", "uri": "/e?q=1", "version": "HTTP/1.1", "host": "gw",
                     "headers": [["Host", ["gw"]], ["X-A", ["1", "2"]], ["Accept", ["*/*"]]]}


def test_pipelined_heads_and_bodies_go_line_by_line() -> None:
    get = b"GET /e HTTP/1.1\r\nHost: a\r\n\r\n"
    post = b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}"
    for data in (get + get, post, get + post, post + get):
        written, closed = exchange([data])
        assert written.count(b"HTTP/1.1 200 OK") == data.count(b"HTTP/1.1\r\n") and not closed, written


header_names = st.one_of(st.sampled_from([b"Host", b"host", b"X-Api-Key", b"Content-Md5", b"content-md5", b"Te",
                                          "Host", "x-api-key", b"Never-Seen-Before", b"X Bad"]),
                         st.binary(max_size=8))


@given(stored=st.lists(st.tuples(st.sampled_from([b"Host", b"X-Api-Key", b"Content-MD5", b"TE"]),
                                 st.binary(max_size=5)), max_size=5),
       asked=st.lists(header_names, max_size=5))
def test_known_headers_answer_as_headers_do(stored: List[Tuple[bytes, bytes]], asked: List[Any]) -> None:
    plain, fast = Headers(), known(Headers())
    for name, value in stored:
        plain.addRawHeader(name, value)
        fast.addRawHeader(name, value)
    for name in asked:
        for headers in (plain, fast):
            try:
                Headers.getRawHeaders(headers, name)  # canonicalised once, as Twisted's Request would have
            except Exception:
                pass
        for call in ("get", "get with default", "has"):
            outcome = []
            for headers in (plain, fast):
                try:
                    if call == "has":
                        outcome.append(("value", headers.hasHeader(name)))
                    else:
                        outcome.append(("value", headers.getRawHeaders(name, *(["none"] if "default" in call else []))))
                except Exception as e:
                    outcome.append(("raised", type(e)))
            assert outcome[0] == outcome[1], (name, outcome)
    assert type(fast) is KnownHeaders and KNOWN_NAMES


@given(pairs=st.lists(st.tuples(header_names, st.one_of(st.binary(max_size=6), st.sampled_from([b"a\rb", b"a\nb",
                                                                                               b"", b"x\r\n"]))),
                      max_size=6),
       one=st.tuples(header_names, st.binary(max_size=6)))
def test_known_headers_add_and_set_as_headers_do(pairs: List[Tuple[Any, bytes]], one: Tuple[Any, bytes]) -> None:
    """``add_all`` and ``set_one`` leave exactly what ``addRawHeader`` and ``setRawHeaders`` would, or refuse
    as they refuse (a name Twisted has not seen, one it cannot encode, a value with CR or LF among them)."""
    outcome = []
    for fast in (False, True):
        headers = Headers()
        try:
            if fast:
                add_all(headers, pairs)
                set_one(headers, *one)
            else:
                for name, value in pairs:
                    headers.addRawHeader(name, value)
                headers.setRawHeaders(one[0], [one[1]])
            outcome.append(("headers", list(headers.getAllRawHeaders())))
        except Exception as e:
            outcome.append(("raised", type(e)))
    assert outcome[0] == outcome[1], (pairs, one, outcome)
