"""The HTTP server side: limits and credentials checked before a body is read.

``twisted.web`` reads a whole request body (into memory, then a temporary
file) before any resource sees the request.  The classes here move the
decisions that need only the headers to the moment the headers are in:

* :class:`GuardedRequest.gotLength` (called by the channel once the headers
  are parsed, before any body byte is stored) asks the site's
  :class:`~svckit.web.Router` to admit the request: guards check
  credentials, and a ``Content-Length`` over the route's limit is refused with
  413.  A chunked body is counted as it streams in and refused the moment it
  passes the limit.  A refused request with a body is answered at once, its
  body is never stored, and the connection is closed (the client may still
  be sending); one without a body is answered normally, keeping the
  connection.
* A route with ``stream_body`` is dispatched as soon as its headers are
  admitted; its body goes to the handler as it arrives through a
  :class:`~svckit.requestbody.RequestBody` (``request.body``), never stored.
  Should the answer be finished before the whole body is in, the connection
  is closed after it: the rest of the body is never read as a next request.
* :class:`GuardedChannel` answers a header block that is too large (or has too
  many headers) with 431, a request line that is too long with 414, instead
  of Twisted's bare ``400``/close, and times out idle connections.
* :func:`make_site` builds the site for a router, with the buffered
  :class:`~svckit.accesslog.AccessLog`, HTML form parsing off (every body here
  is JSON or bytes to proxy).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.python import failure
from twisted.web import http, server

from svckit.accesslog import AccessLog, LogFields
from svckit.requestbody import RequestBody
from svckit.requestid import request_id
from svckit.responses import PHRASES, HTTPError, dumps, too_large
from svckit.web import Router, log_unhandled

IDLE_TIMEOUT = 60.0
HEAD_TIMEOUT = 30.0
"""Seconds a client has for a whole request head, however it trickles it (then 408 and close)."""
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 * 1024


class GuardedRequest(server.Request):
    """A request that is admitted (or refused) as soon as its headers are in."""

    admitted = False
    rejection: Optional[HTTPError] = None
    """An admission refusal answered through the router (requests without a body)."""
    principal: object = None
    """What a guard authenticated (the user of an API key, the admin)."""
    body: Optional[RequestBody] = None
    """The body as it arrives, for a route that streams it."""
    request_id: Optional[bytes] = None
    """Its id (:func:`svckit.requestid.request_id`), once asked for."""
    log_fields: Optional[LogFields] = None
    """What the daemon adds to its access log line (lbsvc: user, backend, upstream time)."""
    started: Optional[float] = None
    """When its headers were in (the reactor's time), for the access log's duration."""
    _limit = 0
    _received = 0

    def gotLength(self, length: Optional[int]) -> None:
        """Admit the request before any of its body is stored."""
        channel: GuardedChannel = self.channel  # type: ignore[assignment]
        self.method, self.uri, self.clientproto = channel.request_line()
        self.path = self.uri.split(b"?", 1)[0]
        site: GuardedSite = channel.site
        self.started = site.access_log.clock.seconds()
        refusal: Optional[HTTPError] = None
        try:
            self._limit = site.router.admit(self)
        except HTTPError as e:
            refusal = e
        except Exception:
            log_unhandled("Unhandled error admitting a request", None, self)
            refusal = HTTPError(500, "internal error")
        else:
            if length is not None and length > self._limit:
                refusal = too_large(self._limit)
        self.admitted = True
        if refusal is not None:
            if length == 0:
                self.rejection = refusal
            else:
                channel.refuse(self, refusal)
                length = 0
        elif length != 0:
            route = site.router.route_for(self.path)
            if route is not None and route.stream_body:
                transport: Any = channel.transport
                self.body = RequestBody(length, transport.pauseProducing, channel.resume_reading)
                length = 0  # nothing is stored
        super().gotLength(length)

    def process(self) -> None:
        """Render through the site's router (no resource tree to walk)."""
        site: GuardedSite = self.channel.site  # type: ignore[attr-defined]
        self.site = site
        headers = self.responseHeaders
        headers.setRawHeaders(b"server", [server.version])
        headers.setRawHeaders(b"date", [site.date()])
        if site.router.request_ids:
            headers.setRawHeaders(b"x-request-id", [request_id(self)])
        self.prepath, self.postpath = [], []
        if self.path == b"*":  # OPTIONS * is answered, any other method is 405
            self._handleStar()
            return
        try:
            self.render(site.router)
        except BaseException:
            self.processingFailed(failure.Failure())

    def dispatch_early(self) -> None:
        """Process a streamed request now; its body follows through :attr:`body`."""
        channel: GuardedChannel = self.channel  # type: ignore[assignment]
        http.Request.requestReceived(self, *channel.request_line())

    def _guarded_channel(self) -> Optional[GuardedChannel]:
        channel = self.channel
        return channel if isinstance(channel, GuardedChannel) and not channel.refused else None

    def handleContentChunk(self, data: bytes) -> None:
        """Store a body chunk, unless the body has passed its limit."""
        channel = self._guarded_channel()
        if channel is None:
            return
        self._received += len(data)
        if self._received > self._limit:
            if self.body is not None:
                self.body.break_off()
            channel.refuse(self, too_large(self._limit))
            return
        if self.body is not None:
            if not self.finished:
                self.body.feed(data)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """Process the request, unless it was refused while its body arrived.

        A streamed request was processed when its headers were in: its body
        is complete now.
        """
        if self.body is not None:
            self.body.finish()
        elif self._guarded_channel() is not None:
            super().requestReceived(command, path, version)

    def _body_still_arriving(self) -> Optional[GuardedChannel]:
        channel = self._guarded_channel()
        if self.body is None or self.body.complete or channel is None:
            return None
        return channel

    def write(self, data: bytes) -> None:
        """Write the answer; one begun before the body is in ends the connection."""
        if not self.startedWriting and self._body_still_arriving() is not None:
            self.setHeader(b"connection", b"close")
            self.channel.persistent = False
        super().write(data)

    def finish(self) -> None:
        """Finish the answer; stop reading a body that is still arriving."""
        channel = self._body_still_arriving()
        if channel is not None:
            if not self.startedWriting:
                self.setHeader(b"connection", b"close")
            channel.discard_rest()
        super().finish()

    def connectionLost(self, reason: Any) -> None:
        """The client went away: a body still arriving is broken off."""
        if self.body is not None:
            self.body.break_off()
        super().connectionLost(reason)


class GuardedChannel(http.HTTPChannel):
    """An HTTP/1.1 connection that can refuse a request before its body."""

    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_BYTES
    MAX_LENGTH = MAX_HEADER_BYTES
    refused = False
    site: GuardedSite
    _host: Any = None
    _secure: Optional[bool] = None
    clock: Callable[[], float] = staticmethod(time.monotonic)
    """Where the head deadline reads the time (tests put a fake clock here)."""
    head_timeout = HEAD_TIMEOUT
    _head_started = 0.0

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
        if isinstance(request, GuardedRequest) and request.body is not None and not self.refused:
            request.dispatch_early()

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


class GuardedSite(server.Site):
    """A site whose root is a :class:`Router` and whose log is an :class:`AccessLog`."""

    protocol = GuardedChannel  # type: ignore[assignment]
    requestFactory = GuardedRequest

    def __init__(self, router: Router, access_log: AccessLog, timeout: float = IDLE_TIMEOUT) -> None:
        super().__init__(router, logPath=None, timeout=timeout)
        self._parsePOSTFormSubmission = False
        self.router = router
        self.access_log = access_log

    _date_second = -1
    _date = b""

    def date(self) -> bytes:
        """The ``Date`` header's value, formatted once a second."""
        now = int(time.time())
        if now != self._date_second:
            self._date_second, self._date = now, http.datetimeToString(now)
        return self._date

    def log(self, request: server.Request) -> None:  # type: ignore[override]
        """Buffer the access log line of a finished request."""
        self.access_log.record(request)

    def refused(self, request: Optional[server.Request], code: int, length: int) -> None:
        """Count and log a request refused before its body was read."""
        path = getattr(request, "path", None)
        route = self.router.route_for(path) if path is not None else None
        self.router.count(route, code)
        if request is not None:
            request.sentLength = length
            self.access_log.record(request, code)


def make_site(router: Router, access_log: AccessLog) -> GuardedSite:
    """The site serving ``router``."""
    return GuardedSite(router, access_log)


def listen(reactor: Any, description: str, router: Router, access_log: AccessLog) -> service.Service:
    """A service serving ``router`` on a Twisted endpoint string."""
    endpoint = endpoints.serverFromString(reactor, description)
    return StreamServerEndpointService(endpoint, make_site(router, access_log))
