"""The HTTP/1.1 connection: a head that is too large, too long or too slow is refused, not read.

:class:`GuardedChannel` answers a header block that is too large (or has too
many headers) with 431, a request line that is too long with 414, a head
that takes longer than :data:`HEAD_TIMEOUT` with 408, instead of Twisted's
bare ``400``/close, and times out idle connections (the site's timeout).
:meth:`GuardedChannel.refuse` is how a request refused before its body
(:mod:`svckit.guardedrequest`) is answered: at once, the body never read, the
connection closed after the answer.

A request head that arrives whole in one read, with nothing after it (the
usual ``GET``), is parsed in one pass (:meth:`GuardedChannel.dataReceived`)
rather than line by line; anything unusual in it goes the line-by-line way,
so every refusal is decided where it always was.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional, Protocol

from twisted.web import http, server
from twisted.web.iweb import INonQueuedRequestFactory

from svckit.headblock import HeadHeaders
from svckit.knownheaders import KNOWN_NAMES, add_parsed
from svckit.requestid import request_id
from svckit.responses import PHRASES, HTTPError, dumps
from svckit.web import Router

HEAD_TIMEOUT = 30.0
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 * 1024

_parse_request_line: Any = getattr(http, "_parseRequestLine", None)
_name_encoder: Any = getattr(http, "_nameEncoder", None)  # KNOWN_NAMES: with its cache
_InvalidHeaderName: Any = getattr(http, "InvalidHeaderName", ValueError)
WHOLE_HEADS = _parse_request_line is not None and _name_encoder is not None and KNOWN_NAMES
"""Whether this Twisted has the request-line parser and header-name encoder the one-pass parse reuses
(private names of ``twisted.web.http``, the same in Twisted 25.5 and 26.10); without them every head goes
line by line."""
_LENGTH_HEADERS = (b"Content-Length", b"Transfer-Encoding")
_QUEUED: Dict[Any, bool] = {}
"""Whether each request factory seen takes the request's queue position (not ``INonQueuedRequestFactory``)."""


class ChannelSite(Protocol):
    """What a channel needs of its site: the router, and where a refusal is counted and logged."""

    router: Router

    def refused(self, request: Optional[server.Request], code: int, length: int) -> None:
        """Count and log a request refused before its body was read."""


class GuardedChannel(http.HTTPChannel):
    """An HTTP/1.1 connection that can refuse a request before its body."""

    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_BYTES
    MAX_LENGTH = MAX_HEADER_BYTES
    refused = False
    site: ChannelSite
    _host: Any = None
    _secure: Optional[bool] = None
    clock: Callable[[], float] = staticmethod(time.monotonic)
    """Where the head deadline reads the time (tests put a fake clock here)."""
    head_timeout = HEAD_TIMEOUT
    _head_started = 0.0

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """The status line, the request's own header block (:mod:`svckit.headblock`), then its ``Headers``."""
        if not isinstance(headers, HeadHeaders) or not headers.block:
            super().writeHeaders(version, code, reason, headers)
            return
        sequence = [version, b" ", code, b" ", reason, b"\r\n", headers.block]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                sequence.extend((name, b": ", value, b"\r\n"))
        sequence.append(b"\r\n")
        if self.transport is not None:
            self.transport.writeSequence(sequence)

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the client: a whole head alone in one read in one pass, anything else line by line."""
        if (WHOLE_HEADS and self.line_mode and not self._buffer and not self.refused and not self.paused
                and not self._busyReceiving and self._HTTPChannel__first_line == 1
                and data.find(b"\r\n\r\n") == len(data) - 4 and self.persistent and self._whole_head(data)):
            return
        super().dataReceived(data)

    def _whole_head(self, data: bytes) -> bool:
        """Take ``data``, one request head and nothing more, as ``lineReceived`` would line by line; False
        (nothing changed) for anything that path must decide: a bad or odd line, a body, too many headers."""
        head = data[:-4]
        if len(head) > self.totalHeadersSize or b"\x00" in head:
            return False
        lines = head.split(b"\r\n")
        count = len(lines) - 1
        # A bare CR or LF, a folded line, too many headers: the line-by-line path refuses or decides them.
        if (count > self.maxHeaders or head.count(b"\r") != count or head.count(b"\n") != count
                or b"\n " in head or b"\n\t" in head):
            return False
        try:
            command, target, version = _parse_request_line(lines[0])
        except ValueError:
            return False
        headers = []
        encode, canonical = _name_encoder.encode, _name_encoder._canonicalHeaderCache.get
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                return False
            known_name = canonical(name)
            if known_name is None:
                try:
                    known_name = encode(name)
                except _InvalidHeaderName:
                    return False
            if known_name in _LENGTH_HEADERS:
                return False
            headers.append((known_name, value.strip(b" \t")))
        self.resetTimeout()
        factory: Any = self.requestFactory
        queued = _QUEUED.get(factory)
        if queued is None:  # asked once per factory: providedBy costs about a microsecond
            queued = _QUEUED[factory] = not INonQueuedRequestFactory.providedBy(factory)
        request = factory(self, len(self.requests)) if queued else factory(self)
        self.requests.append(request)
        self._HTTPChannel__first_line = 0
        self._command, self._path, self._version = command, target, version
        add_parsed(request.requestHeaders, headers)
        self._receivedHeaderCount = count
        self.allHeadersReceived()
        self.allContentReceived()
        return True

    def getHost(self) -> Any:
        """The local address, asked of the socket once per connection."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def isSecure(self) -> bool:
        """Whether the connection is TLS, found out once per connection."""
        if self._secure is None:
            self._secure = bool(super().isSecure())
        return self._secure

    def request_line(self) -> tuple[bytes, bytes, bytes]:
        """Method, request-target and version of the request being read."""
        return (getattr(self, "_command", b"-"), getattr(self, "_path", b"-"),
                getattr(self, "_version", b"HTTP/1.1"))

    def allHeadersReceived(self) -> None:
        """The headers are in: a streamed request is processed now."""
        super().allHeadersReceived()
        request = self.requests[-1] if self.requests else None
        if getattr(request, "body", None) is not None and not self.refused:
            request.dispatch_early()  # type: ignore[union-attr]  # a GuardedRequest streaming its body

    def resume_reading(self) -> None:
        """Read from the client again (a streamed body's consumer drained)."""
        if self.transport is not None and not self._waitingForTransport:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def discard_rest(self) -> None:
        """Read nothing more of this connection; close it after the answer."""
        self.refused = True
        self.persistent = False

    def refuse(self, request: Optional[server.Request], error: HTTPError) -> None:
        """Answer ``error`` now, read nothing more, close the connection."""
        if self.refused:
            return
        self.refused = True
        if request is not None:
            # No "100 Continue" after the answer: the body is not wanted.
            request.requestHeaders.removeHeader(b"expect")
        answer = {"Error": error.message}
        if self.site.router.request_ids and request is not None:
            answer["request_id"] = request_id(request).decode("ascii")
        body = dumps(answer)
        head = [
            b"HTTP/1.1 %d %s" % (error.code, PHRASES.get(error.code) or http.RESPONSES.get(error.code, b"Error")),
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        head += [f"{k}: {v}".encode("latin-1") for k, v in error.headers.items()]
        if "request_id" in answer:
            head.append(b"X-Request-Id: " + answer["request_id"].encode("ascii"))
        if self.transport is not None:
            self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.site.refused(request, error.code, len(body))
        self.loseConnection()

    def _refuse_head(self, error: HTTPError) -> None:
        request = self.requests[-1] if self.requests else None
        if request is not None and request.method == b"(no method yet)":
            request.method, request.uri, request.clientproto = self.request_line()
            request.path = request.uri.split(b"?", 1)[0]
        self.refuse(request, error)

    def lineReceived(self, line: bytes) -> None:
        """A request or header line: refuse header blocks that are too large or too slow.

        The idle timeout resets on every byte, so a client sending one header
        line every few seconds would keep its connection for ever; the head
        as a whole must arrive within :data:`HEAD_TIMEOUT` (checked as each
        line arrives; a client that sends nothing more meets the idle timeout).
        """
        if self.refused:
            return
        if getattr(self, "_command", None) is None:
            self._head_started = self.clock()  # the request line (or a blank line before it)
        elif self.clock() - self._head_started > self.head_timeout:
            self._refuse_head(HTTPError(408, f"request head not received within {self.head_timeout:g}s"))
            return
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._refuse_head(HTTPError(431, f"request headers larger than {self.totalHeadersSize} bytes"))
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """One line longer than the limit: 414 for the request line, else 431."""
        if getattr(self, "_command", None) is None:
            self._refuse_head(HTTPError(414, f"request line longer than {self.MAX_LENGTH} bytes"))
        else:
            self._refuse_head(HTTPError(431, f"request header longer than {self.MAX_LENGTH} bytes"))

    def headerReceived(self, line: bytes) -> bool:
        """One header: refuse more than :data:`MAX_HEADERS`."""
        if self._receivedHeaderCount >= self.maxHeaders:
            self._refuse_head(HTTPError(431, f"more than {self.maxHeaders} request headers"))
            return False
        return bool(super().headerReceived(line))

    def rawDataReceived(self, data: bytes) -> None:
        """Body bytes: ignored once the request was refused."""
        if not self.refused:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        """The whole body is in: process it, unless it was refused."""
        if not self.refused:
            super().allContentReceived()
