"""A request admitted or refused as soon as its headers are in, its body streamed or never stored.

``twisted.web`` reads a whole request body (into memory, then a temporary
file) before any resource sees the request.  :class:`GuardedRequest` moves
the decisions that need only the headers to the moment the headers are in:

* :meth:`GuardedRequest.gotLength` (called by the channel once the headers
  are parsed, before any body byte is stored) asks the site's
  :class:`~svckit.web.Router` to admit the request: guards check
  credentials, and a ``Content-Length`` over the route's limit is refused with
  413.  A chunked body is counted as it streams in and refused the moment it
  passes the limit.  A refused request with a body is answered at once
  (:meth:`svckit.channel.GuardedChannel.refuse`), its body is never stored,
  and the connection is closed (the client may still be sending); one
  without a body is answered normally, keeping the connection.
* A route with ``stream_body`` is dispatched as soon as its headers are
  admitted; its body goes to the handler as it arrives through a
  :class:`~svckit.requestbody.RequestBody` (``request.body``), never stored.
  Should the answer be finished before the whole body is in, the connection
  is closed after it: the rest of the body is never read as a next request.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from twisted.python import failure
from twisted.web import http, server

from svckit.accesslog import AccessLog, LogFields
from svckit.channel import ChannelSite, GuardedChannel
from svckit.headblock import HeadHeaders
from svckit.knownheaders import known
from svckit.requestbody import RequestBody
from svckit.requestid import request_id
from svckit.responses import HTTPError, too_large
from svckit.web import Route, first_byte, log_unhandled


class RequestSite(ChannelSite, Protocol):
    """What a request needs of its site, beyond its channel's needs: the access log, the date."""

    access_log: AccessLog

    def date(self) -> bytes:
        """The ``Date`` header's value."""

    def head_block(self) -> bytes:
        """The ``Server`` and ``Date`` lines of every answer (:mod:`svckit.headblock`)."""


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
    _route: Optional[Route] = None
    """Set while the body's limit waits for its first byte (a route with an array limit)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        known(self.requestHeaders)
        self.responseHeaders = HeadHeaders()

    def gotLength(self, length: Optional[int]) -> None:
        """Admit the request before any of its body is stored."""
        channel: GuardedChannel = self.channel  # type: ignore[assignment]
        self.method, self.uri, self.clientproto = channel.request_line()
        self.path = self.uri.split(b"?", 1)[0]
        site: RequestSite = channel.site  # type: ignore[assignment]
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
            if route is not None and route.max_array_body is not None:
                self._route = route
            if route is not None and route.stream_body:
                transport: Any = channel.transport
                self.body = RequestBody(length, transport.pauseProducing, channel.resume_reading)
                length = 0  # nothing is stored
        super().gotLength(length)

    def process(self) -> None:
        """Render through the site's router (no resource tree to walk)."""
        site: RequestSite = self.channel.site  # type: ignore[attr-defined]
        self.site = site  # type: ignore[assignment]  # a GuardedSite: a server.Site that is a RequestSite
        block = site.head_block()
        if site.router.request_ids:
            block += b"X-Request-Id: " + request_id(self) + b"\r\n"
        self.responseHeaders.block = block  # type: ignore[attr-defined]  # a HeadHeaders (__init__)
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
        if self._route is not None:
            first = first_byte(data)
            if first:
                self._limit, self._route = self._route.limit_for(first), None
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
        body = self.body
        if body is None or body.complete:
            return None
        return self._guarded_channel()

    def write(self, data: bytes) -> None:
        """Write the answer; one begun before the body is in ends the connection."""
        if not self.startedWriting and self.body is not None and self._body_still_arriving() is not None:
            self.setHeader(b"connection", b"close")
            self.channel.persistent = False
        super().write(data)

    def finish(self) -> None:
        """Finish the answer; stop reading a body that is still arriving."""
        channel = self._body_still_arriving() if self.body is not None else None
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
