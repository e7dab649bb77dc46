"""Proxying: one token, a healthy backend, bodies streamed both ways.

The key was checked when the headers arrived (:func:`lbsvc.keys.key_guard`);
the handler spends a token, picks a backend and forwards.  The request body
(already received, within ``--max-body``) is streamed upstream from its
buffer with ``FileBodyProducer``; the response body is relayed as it arrives,
with the client's transport pushing back on the backend's, so a slow client
never makes the gateway buffer a large response.  A client that goes away
cancels the handler: the upstream connection is closed and nothing more is
read from it.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Set, Union

from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer, error, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from lbsvc.backends import BackendPool
from lbsvc.balancer import Backend
from lbsvc.buckets import Buckets
from lbsvc.keys import user_of
from lbsvc.target import upstream_url
from svckit.responses import STREAMED, BytesResponse, HTTPError, Streamed, retry_after
from svckit.web import client_gone

log = Logger()

HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
}
NOT_FORWARDED = HOP_BY_HOP | {b"authorization", b"host", b"content-length"}
VIA_NAME = b"lbsvc"
CONNECT_ERRORS = (error.ConnectError, error.ConnectingCancelledError, error.TimeoutError)


def _hop_by_hop(headers: Headers) -> Set[bytes]:
    named: Set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        named.update(v.strip().lower() for v in value.split(b","))
    return named


def upstream_headers(request: server.Request) -> Headers:
    """The request's headers minus hop-by-hop and the API key, plus X-Forwarded-*."""
    drop = NOT_FORWARDED | _hop_by_hop(request.requestHeaders)
    headers = Headers()
    for name, values in request.requestHeaders.getAllRawHeaders():
        if name.lower() not in drop:
            headers.setRawHeaders(name, values)
    client = request.getClientAddress()
    client_ip = getattr(client, "host", "unknown")
    prior = request.getHeader(b"x-forwarded-for")
    forwarded_for = f"{prior.decode('latin-1')}, {client_ip}" if prior else client_ip
    headers.setRawHeaders(b"x-forwarded-for", [forwarded_for.encode("latin-1")])
    host = request.getHeader(b"host")
    if host:
        headers.setRawHeaders(b"x-forwarded-host", [host])
    headers.setRawHeaders(b"x-forwarded-proto", [b"https" if request.isSecure() else b"http"])
    headers.setRawHeaders(b"via", [*request.requestHeaders.getRawHeaders(b"via", []), via(request)])
    return headers


def via(request: server.Request) -> bytes:
    """This hop, as RFC 9110 section 7.6.3 writes it: ``1.1 lbsvc``."""
    version = request.clientproto.rpartition(b"/")[2] or b"1.1"
    return version + b" " + VIA_NAME


class _BodyRelay(Protocol):
    """Writes a backend's response body to the client request as it arrives.

    ``done`` fires when the body is complete; cancelling it (the client went
    away) closes the upstream connection.  A body that sends nothing for
    ``idle`` seconds is cut off and ``stalled`` is called (a passive failure
    of the backend).
    """

    def __init__(self, request: server.Request, clock: IReactorTime, idle: float,
                 stalled: Callable[[], None]) -> None:
        self.request = request
        self.clock = clock
        self.idle = idle
        self.stalled = stalled
        self.done: defer.Deferred[None] = defer.Deferred(self._cancel)
        self._timer: Optional[IDelayedCall] = None
        self._timed_out = False

    def _cancel(self, _: Any) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _stalled(self) -> None:
        self._timed_out = True
        log.warn("Upstream body sent nothing for {idle}s; cutting it off", idle=self.idle)
        self.stalled()
        self._cancel(None)

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)
        self._timer = self.clock.callLater(self.idle, self._stalled)

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle)
        if client_gone(self.request):
            self._cancel(None)
        else:
            self.request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if client_gone(self.request):
            if not self.done.called:
                self.done.errback(defer.CancelledError("client went away"))
            return
        self.request.unregisterProducer()
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss) and not self._timed_out:
            self.done.callback(None)
        else:
            # The status is out: the router can only cut the client's
            # connection, which it does for a cancelled handler.
            log.warn("Upstream body broke off: {reason}", reason=reason.value)
            self.done.errback(defer.CancelledError("upstream body broke off"))


def text(code: int, message: str) -> BytesResponse:
    """A plain-text gateway answer (``503 No available servers`` and friends)."""
    return BytesResponse(message.encode("utf-8"), code)


class Proxy:
    """The handler of every path outside ``/user/``: rate-limit, forward."""

    def __init__(
        self,
        buckets: Buckets,
        pool: BackendPool,
        agent: IAgent,
        clock: IReactorTime,
        registry: CollectorRegistry,
        cooperator: Optional[task.Cooperator] = None,
    ) -> None:
        self.cooperator: Any = cooperator or task  # the module's cooperate() is the global one
        self.buckets = buckets
        self.pool = pool
        self.agent = agent
        self.clock = clock
        self._upstream = Counter(
            "lbsvc_upstream_requests", "Requests sent upstream by backend and outcome.",
            ["backend", "outcome"], registry=registry,
        )

    def __call__(self, request: server.Request) -> Any:
        """Spend a token (429 without one), then forward."""
        user = user_of(request)
        bucket = self.buckets.take(user.name, user.capacity, user.rate_per_sec)
        if bucket is None:
            bucket = self.buckets.peek(user.name, user.capacity, user.rate_per_sec)
            raise HTTPError(429, "rate limit exceeded", {
                "Retry-After": retry_after(bucket.retry_after()),
                "RateLimit-Limit": str(user.capacity),
                "RateLimit-Remaining": str(int(bucket.level)),
                "RateLimit-Reset": str(bucket.reset_after()),
            })
        return self._forward(request)

    async def _forward(self, request: server.Request) -> Union[Streamed, BytesResponse]:
        headers = upstream_headers(request)
        tried: List[Backend] = []
        has_body = request.getHeader(b"content-length") not in (None, b"0") \
            or request.getHeader(b"transfer-encoding") is not None
        while True:
            backend = self.pool.choose(tried)
            if backend is None:
                return text(503, "No available servers")
            tried.append(backend)
            response = await self._attempt(request, backend, headers, has_body)
            if response is not None:
                break
        if isinstance(response, BytesResponse):
            return response
        backend.in_flight += 1
        try:
            await self._relay(request, response, backend)
        finally:
            backend.in_flight -= 1
        return STREAMED

    async def _attempt(self, request: server.Request, backend: Backend, headers: Headers,
                       has_body: bool) -> Union[None, IResponse, BytesResponse]:
        """One backend: its response, None to try the next, or the gateway's answer."""
        body: Optional[FileBodyProducer] = None
        if has_body:
            request.content.seek(0)  # type: ignore[union-attr]
            body = FileBodyProducer(request.content, cooperator=self.cooperator)
        url = upstream_url(backend.scheme, backend.host, backend.port, request.uri)
        d = self.agent.request(request.method, url, headers, body)
        timed_out: List[bool] = []

        def too_slow() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self.clock.callLater(self.pool.config.timeouts.response, too_slow)
        backend.in_flight += 1
        try:
            response: IResponse = await d
        except CONNECT_ERRORS as e:
            if client_gone(request):
                raise defer.CancelledError() from None
            self._upstream.labels(backend.name, "connect_error").inc()
            log.info("Backend {name} unreachable ({error}); trying the next", name=backend.name, error=e)
            self.pool.connect_failed(backend)
            return None
        except Exception as e:
            if timed_out:
                self._upstream.labels(backend.name, "timeout").inc()
                log.warn("Backend {name} did not answer within {seconds}s; taking it out",
                         name=backend.name, seconds=self.pool.config.timeouts.response)
                self.pool.connect_failed(backend)
                return text(504, "Gateway timeout")
            if isinstance(e, defer.CancelledError) or client_gone(request):
                raise defer.CancelledError() from None
            self._upstream.labels(backend.name, "error").inc()
            log.warn("Backend {name} failed: {error!r}", name=backend.name, error=e)
            return text(502, "Bad gateway")
        finally:
            backend.in_flight -= 1
            if timer.active():
                timer.cancel()
        self._upstream.labels(backend.name, str(response.code)).inc()
        return response

    async def _relay(self, request: server.Request, response: IResponse, backend: Backend) -> None:
        request.setResponseCode(response.code, response.phrase)
        request.defaultContentType = None  # only what the backend sent
        drop = HOP_BY_HOP | _hop_by_hop(response.headers) | {b"content-length"}
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in drop:
                request.responseHeaders.setRawHeaders(name, values)
        if isinstance(response.length, int):
            request.setHeader(b"content-length", str(response.length).encode("ascii"))
        request.responseHeaders.setRawHeaders(
            b"via", [*response.headers.getRawHeaders(b"via", []), b"1.1 " + VIA_NAME])
        relay = _BodyRelay(request, self.clock, self.pool.config.timeouts.body,
                           lambda: self.pool.connect_failed(backend))
        response.deliverBody(relay)
        await relay.done
