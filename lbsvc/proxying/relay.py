"""One exchange with a backend: its answer relayed to the client as it is parsed, and timed.

The response is relayed as it is parsed, the client's transport pushing back
on the backend's.  Whose fault: a backend that does not answer within
``timeouts.response`` (504), stalls its body or never reads the request's is
taken out; a client that stalls its body gets 408 and the backend keeps its
place.
"""

from __future__ import annotations

from typing import List, Optional

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web import server
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from lbsvc.backends.backend import Backend
from lbsvc.proxying.headerrules import NOT_RELAYED, VIA_NAME, connection_named
from lbsvc.proxying.upstream import Header, IResponseSink, UpstreamConnection
from lbsvc.proxying.upstreams import Upstreams
from svckit.knownheaders import add_all, set_one
from svckit.requestbody import RequestBody
from svckit.requestid import request_id
from svckit.responses import BytesResponse
from svckit.web import client_gone

log = Logger()


def text(request: server.Request, code: int, message: bytes) -> BytesResponse:
    """A plain-text gateway answer (``503 No available servers`` and friends).

    The message is the first line, as it always was; the request id follows
    on a line of its own.
    """
    return BytesResponse(b"%s\nrequest id: %s\n" % (message, request_id(request)), code)


@implementer(IResponseSink)
class Relay:
    """One exchange: relays the backend's answer to the client, times it out.

    ``failed`` is set to the gateway's answer when a timer fires first.
    """

    def __init__(self, request: server.Request, connection: UpstreamConnection, backend: Backend,
                 body: Optional[IBodyProducer], upstreams: Upstreams) -> None:
        self.request = request
        self.connection = connection
        self.backend = backend
        self.body = body
        self.upstreams = upstreams
        self.answered = False
        self.relaying = False
        self.failed: Optional[BytesResponse] = None
        timeouts = upstreams.pool.config.timeouts
        self._clock = upstreams.clock
        self._deadlines = upstreams.deadlines
        self._response_timeout = timeouts.response
        self._body_timeout = timeouts.body
        self._deadlines.set(self, self._response_timeout)
        self._body_seen = -1
        self.streamed: Optional[RequestBody] = body if isinstance(body, RequestBody) else None
        self._body_timer: Optional[IDelayedCall] = (
            self._clock.callLater(self._body_timeout, self._check_body) if self.streamed is not None else None)

    def head(self, code: int, phrase: bytes, headers: List[Header], length: Optional[int], body: bool) -> None:
        """Status and headers: relay them, then the body as it comes."""
        self.answered = True
        request = self.request
        if client_gone(request):
            self.connection.cancel()
            return
        request.setResponseCode(code, phrase)
        request.defaultContentType = None  # only what the backend sent
        out = request.responseHeaders
        drop = NOT_RELAYED
        for name, value in headers:
            if name.lower() == b"connection":
                drop = drop | connection_named([value])
        vias = []
        kept = []
        for name, value in headers:
            lower = name.lower()
            if lower == b"via":
                vias.append(value)
            elif lower not in drop:
                kept.append((name, value))
        vias.append(b"1.1 " + VIA_NAME)
        add_all(out, kept)  # as addRawHeader and setRawHeaders would, in fewer calls
        set_one(out, b"via", b", ".join(vias))
        if length is not None and code != 204:
            set_one(out, b"content-length", b"%d" % length)
        if not body or length == 0:
            self.stop()
        else:
            request.registerProducer(self.connection.transport, True)
            self.relaying = True
            self._deadlines.set(self, self._body_timeout)

    def data(self, chunk: bytes) -> None:
        """A piece of the response body: on to the client."""
        self._deadlines.set(self, self._body_timeout)
        if client_gone(self.request):
            self.connection.cancel()
        else:
            self.request.write(chunk)

    def stop(self) -> None:
        """The exchange is over: timers off, the backend's transport released."""
        self._deadlines.clear(self)
        if self._body_timer is not None and self._body_timer.active():
            self._body_timer.cancel()
        self._body_timer = None
        if self.relaying:
            self.relaying = False
            if not client_gone(self.request):
                self.request.unregisterProducer()

    def expired(self) -> None:
        """Its deadline passed: no answer in time, or a response body that stalled."""
        if self.answered:
            self._stalled()
        elif not self.connection.body_done:
            # Still sending the body: the body check decides whose fault it is.
            self._deadlines.set(self, self._response_timeout)
        else:
            self.upstreams.backend_failed(self.backend, "timeout", "did not answer within {seconds}s",
                                      seconds=self._response_timeout)
            self.failed = text(self.request, 504, b"Gateway timeout")
            self.connection.cancel()

    def _stalled(self) -> None:
        self.upstreams.backend_failed(self.backend, "body_stalled", "sent no body for {seconds}s; cut off",
                                  seconds=self._body_timeout)
        self.failed = text(self.request, 504, b"Gateway timeout")  # what the client gets if none of the body was sent yet
        self.connection.cancel()

    def _check_body(self) -> None:
        """Every ``timeouts.body`` seconds while the request body is arriving."""
        self._body_timer = None
        body = self.streamed
        if body is None or body.complete or self.answered:
            return
        if body.received == self._body_seen:
            if body.waiting_on_consumer and body.started:
                self.upstreams.backend_failed(self.backend, "timeout", "read none of the body for {seconds}s",
                                          seconds=self._body_timeout)
                self.failed = text(self.request, 504, b"Gateway timeout")
            else:
                log.info("Client sent none of its body for {seconds}s; giving up", seconds=self._body_timeout)
                self.failed = text(self.request, 408, b"Request body timed out")
            self.connection.cancel()
            return
        self._body_seen = body.received
        self._body_timer = self._clock.callLater(self._body_timeout, self._check_body)
