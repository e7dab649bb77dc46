"""RFC 9110's header rules for a proxy (section 7.6), both ways.

Hop-by-hop headers and every header named in ``Connection`` are removed,
``Via`` is added, ``X-Forwarded-*`` and ``X-Request-Id`` are set, nothing else
is invented; the API key never goes upstream.  :func:`upstream_head` writes the
request head for a backend; :data:`NOT_RELAYED` and :func:`connection_named`
are what the relay (:mod:`lbsvc.proxying.relay`) drops from an answer.
"""

from __future__ import annotations

from typing import Any, Set

from twisted.web import server

from lbsvc.proxying.target import origin_target
from svckit.requestid import request_id

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
NOT_FORWARDED = HOP_BY_HOP | {b"authorization", b"host", b"content-length", b"expect", b"x-request-id",
                              b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"via"}
NOT_RELAYED = HOP_BY_HOP | {b"content-length", b"via", b"x-request-id", b"ratelimit", b"ratelimit-policy", b"server",
                            b"date"}
"""The gateway's own request id, limits, ``Server`` and ``Date`` replace a backend's (as nginx does: an answer
carrying two ``Date`` fields is malformed)."""
GATEWAY_HEADERS = (b"server", b"date", b"x-request-id", b"ratelimit", b"ratelimit-policy")
"""What the gateway puts on every answer, proxied or its own."""
VIA_NAME = b"lbsvc"


def connection_named(values: Any) -> Set[bytes]:
    """Header names listed in ``Connection`` header values (lower case)."""
    named: Set[bytes] = set()
    for value in values or ():
        named.update(v.strip().lower() for v in value.split(b","))
    return named


def via(request: server.Request) -> bytes:
    """This hop, as RFC 9110 section 7.6.3 writes it: ``1.1 lbsvc``."""
    version = request.clientproto.rpartition(b"/")[2] or b"1.1"
    return version + b" " + VIA_NAME


def upstream_head(request: server.Request, host: bytes) -> bytes:
    """The request line and headers to send to the backend at ``host``.

    Without the framing header (``Content-Length`` or chunked) and the blank
    line, which the upstream connection adds.
    """
    path, query = origin_target(request.uri)
    lines = [request.method, b" ", path, b"?" + query if query else b"", b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    headers = request.requestHeaders
    named = connection_named(headers.getRawHeaders(b"connection"))
    drop = NOT_FORWARDED | named
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in drop:
            for value in values:
                lines += (name, b": ", value, b"\r\n")
    client = request.getClientAddress()
    client_ip = getattr(client, "host", "unknown").encode("latin-1")
    # A header the client named in its own Connection is hop-by-hop: dropped, not extended.
    prior = None if b"x-forwarded-for" in named else headers.getRawHeaders(b"x-forwarded-for")
    lines += (b"X-Forwarded-For: ", b", ".join([*prior, client_ip]) if prior else client_ip, b"\r\n")
    original_host = headers.getRawHeaders(b"host")
    if original_host:
        lines += (b"X-Forwarded-Host: ", original_host[0], b"\r\n")
    lines.append(b"X-Forwarded-Proto: https\r\n" if request.isSecure() else b"X-Forwarded-Proto: http\r\n")
    vias = () if b"via" in named else headers.getRawHeaders(b"via", ())
    lines += (b"Via: ", b", ".join([*vias, via(request)]), b"\r\nX-Request-Id: ", request_id(request), b"\r\n")
    return b"".join(lines)
