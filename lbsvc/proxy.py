"""Proxying: one token, a healthy backend, bodies streamed both ways.

The key was checked when the headers arrived (:func:`lbsvc.keys.key_guard`),
and the proxy route streams its body (``Route.stream_body``): the handler runs
before the body is in.  It spends a token, picks a backend, takes a pooled
connection to it (:mod:`lbsvc.upstream`) and sends the request head followed
by the body as it arrives, with back-pressure from the backend to the client.
The response is relayed as it is parsed, the client's transport pushing back
on the backend's.  A client that goes away cancels the handler, which drops
the upstream connection.

Headers follow RFC 9110 section 7.6 both ways: hop-by-hop headers and every
header named in ``Connection`` are removed, ``Via`` is added, nothing else is
invented; the API key never goes upstream.

Whose fault: a backend that refuses or does not accept the connection (the
next backend is tried), answers malformed, stalls its body, or does not
answer within ``timeouts.response`` (504) is taken out; a client that stalls
its body gets 408 and the backend keeps its place.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Set, Union

from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web import server
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from lbsvc.backends import BackendPool
from lbsvc.balancer import Backend
from lbsvc.buckets import IBucketStore, Verdict
from lbsvc.keys import user_of
from lbsvc.target import origin_target
from lbsvc.upstream import (
    BadResponse,
    ConnectFailed,
    Header,
    IResponseSink,
    StaleConnection,
    UpstreamConnection,
    UpstreamPool,
)
from lbsvc.users import User
from svckit.requestbody import RequestBody
from svckit.responses import STREAMED, BytesResponse, HTTPError, Streamed, retry_after
from svckit.web import client_gone

log = Logger()

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
NOT_FORWARDED = HOP_BY_HOP | {b"authorization", b"host", b"content-length", b"expect",
                              b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"via"}
NOT_RELAYED = HOP_BY_HOP | {b"content-length", b"via"}
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
    drop = NOT_FORWARDED | connection_named(headers.getRawHeaders(b"connection"))
    for name, values in headers.getAllRawHeaders():
        if name.lower() not in drop:
            for value in values:
                lines += (name, b": ", value, b"\r\n")
    client = request.getClientAddress()
    client_ip = getattr(client, "host", "unknown").encode("latin-1")
    prior = headers.getRawHeaders(b"x-forwarded-for")
    lines += (b"X-Forwarded-For: ", b", ".join([*prior, client_ip]) if prior else client_ip, b"\r\n")
    original_host = headers.getRawHeaders(b"host")
    if original_host:
        lines += (b"X-Forwarded-Host: ", original_host[0], b"\r\n")
    lines.append(b"X-Forwarded-Proto: https\r\n" if request.isSecure() else b"X-Forwarded-Proto: http\r\n")
    lines += (b"Via: ", b", ".join([*headers.getRawHeaders(b"via", ()), via(request)]), b"\r\n")
    return b"".join(lines)


def text(code: int, message: str) -> BytesResponse:
    """A plain-text gateway answer (``503 No available servers`` and friends)."""
    return BytesResponse(message.encode("utf-8"), code)


class _Retry(Exception):
    """This backend did not take the request; try the next one."""


@implementer(IResponseSink)
class _Relay:
    """One exchange: relays the backend's answer to the client, times it out.

    ``failed`` is set to the gateway's answer when a timer fires first.
    """

    def __init__(self, request: server.Request, connection: UpstreamConnection, backend: Backend,
                 body: Optional[IBodyProducer], proxy: Proxy) -> None:
        self.request = request
        self.connection = connection
        self.backend = backend
        self.body = body
        self.proxy = proxy
        self.answered = False
        self.relaying = False
        self.failed: Optional[BytesResponse] = None
        timeouts = proxy.pool.config.timeouts
        self._clock = proxy.clock
        self._response_timeout = timeouts.response
        self._body_timeout = timeouts.body
        self._timer: Optional[IDelayedCall] = self._clock.callLater(self._response_timeout, self._no_answer)
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
        for name, value in headers:
            lower = name.lower()
            if lower == b"via":
                vias.append(value)
            elif lower not in drop:
                out.addRawHeader(name, value)
        vias.append(b"1.1 " + VIA_NAME)
        out.setRawHeaders(b"via", [b", ".join(vias)])
        if length is not None and code != 204:
            out.setRawHeaders(b"content-length", [b"%d" % length])
        if not body or length == 0:
            self.stop()
        else:
            request.registerProducer(self.connection.transport, True)
            self.relaying = True
            self._restart(self._body_timeout, self._stalled)

    def data(self, chunk: bytes) -> None:
        """A piece of the response body: on to the client."""
        timer = self._timer
        if timer is not None:
            timer.reset(self._body_timeout)
        if client_gone(self.request):
            self.connection.cancel()
        else:
            self.request.write(chunk)

    def stop(self) -> None:
        """The exchange is over: timers off, the backend's transport released."""
        for timer in (self._timer, self._body_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._body_timer = None
        if self.relaying:
            self.relaying = False
            if not client_gone(self.request):
                self.request.unregisterProducer()

    def _restart(self, seconds: float, then: Callable[[], None]) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(seconds, then)

    def _no_answer(self) -> None:
        self._timer = None
        if not self.connection.body_done:
            # Still sending the body: the body check decides whose fault it is.
            self._timer = self._clock.callLater(self._response_timeout, self._no_answer)
            return
        self.proxy.backend_failed(self.backend, "timeout", "did not answer within {seconds}s",
                                  seconds=self._response_timeout)
        self.failed = text(504, "Gateway timeout")
        self.connection.cancel()

    def _stalled(self) -> None:
        self._timer = None
        self.proxy.backend_failed(self.backend, "body_stalled", "sent no body for {seconds}s; cut off",
                                  seconds=self._body_timeout)
        self.connection.cancel()

    def _check_body(self) -> None:
        """Every ``timeouts.body`` seconds while the request body is arriving."""
        self._body_timer = None
        body = self.streamed
        if body is None or body.complete or self.answered:
            return
        if body.received == self._body_seen:
            if body.waiting_on_consumer and body.started:
                self.proxy.backend_failed(self.backend, "timeout", "read none of the body for {seconds}s",
                                          seconds=self._body_timeout)
                self.failed = text(504, "Gateway timeout")
            else:
                log.info("Client sent none of its body for {seconds}s; giving up", seconds=self._body_timeout)
                self.failed = text(408, "Request body timed out")
            self.connection.cancel()
            return
        self._body_seen = body.received
        self._body_timer = self._clock.callLater(self._body_timeout, self._check_body)


class Proxy:
    """The handler of every path outside ``/user/``: rate-limit, forward."""

    def __init__(self, buckets: IBucketStore, pool: BackendPool, upstream: UpstreamPool,
                 clock: IReactorTime, registry: CollectorRegistry) -> None:
        self.buckets = buckets
        self.pool = pool
        self.upstream = upstream
        self.clock = clock
        self._upstream = Counter(
            "lbsvc_upstream_requests", "Requests sent upstream by backend and outcome.",
            ["backend", "outcome"], registry=registry,
        )

    def __call__(self, request: server.Request) -> Any:
        """Spend a token (429 without one), then forward."""
        user = user_of(request)
        verdict = self.buckets.take(user.name, user.capacity, user.rate_per_sec)
        if isinstance(verdict, defer.Deferred):  # a shared store: Redis answers later
            return verdict.addCallback(self._admitted, request, user)
        return self._admitted(verdict, request, user)

    def _admitted(self, verdict: Verdict, request: server.Request, user: User) -> Any:
        taken, bucket = verdict
        if not taken:
            raise HTTPError(429, "rate limit exceeded", {
                "Retry-After": retry_after(bucket.retry_after()),
                "RateLimit-Limit": str(user.capacity),
                "RateLimit-Remaining": str(int(bucket.level)),
                "RateLimit-Reset": str(bucket.reset_after()),
            })
        return defer.ensureDeferred(self._forward(request))

    def backend_failed(self, backend: Backend, outcome: str, why: str, **fields: Any) -> None:
        """A passive failure: counted, logged, and the backend taken out."""
        self._upstream.labels(backend.name, outcome).inc()
        log.warn("Backend {name} " + why, name=backend.name, **fields)
        self.pool.connect_failed(backend)

    def _body(self, request: server.Request) -> Optional[IBodyProducer]:
        streamed = getattr(request, "body", None)
        if streamed is not None:
            return streamed  # type: ignore[no-any-return]
        if request.getHeader(b"content-length") in (None, b"0") and request.getHeader(b"transfer-encoding") is None:
            return None
        # Not behind a GuardedSite: the body was stored whole.
        request.content.seek(0)  # type: ignore[union-attr]
        return FileBodyProducer(request.content)

    async def _forward(self, request: server.Request) -> Union[Streamed, BytesResponse]:
        body = self._body(request)
        tried: List[Backend] = []
        while True:
            backend = self.pool.choose(tried)
            if backend is None:
                return text(503, "No available servers")
            tried.append(backend)
            backend.in_flight += 1
            try:
                return await self._attempt(request, backend, body)
            except _Retry:
                continue
            finally:
                backend.in_flight -= 1

    async def _attempt(self, request: server.Request, backend: Backend,
                       body: Optional[IBodyProducer]) -> Union[Streamed, BytesResponse]:
        """One backend: the answer relayed, the gateway's own answer, or :class:`_Retry`."""
        fresh = False
        while True:
            try:
                connection = await self.upstream.connection(backend, fresh=fresh)
            except ConnectFailed as e:
                if client_gone(request):
                    raise defer.CancelledError() from None
                self._upstream.labels(backend.name, "connect_error").inc()
                log.info("Backend {name} unreachable ({error}); trying the next", name=backend.name, error=e)
                self.pool.connect_failed(backend)
                raise _Retry() from None
            host = backend.host if b":" not in backend.host else b"[" + backend.host + b"]"
            head = upstream_head(request, b"%s:%d" % (host, backend.port))
            relay = _Relay(request, connection, backend, body, self)
            exchange = connection.request(head, body, relay, head_only=request.method == b"HEAD")
            try:
                await exchange
            except StaleConnection:
                relay.stop()
                if body is not None and getattr(body, "started", True):
                    return self._broken(backend, relay, "closed a reused connection mid-request")
                fresh = True  # the idle connection had been closed: once more, on a new one
                continue
            except BadResponse as e:
                relay.stop()
                return self._broken(backend, relay, f"answered badly: {e}")
            except defer.CancelledError:
                relay.stop()
                connection.cancel()
                if relay.failed is not None:
                    if request.startedWriting:
                        raise
                    return relay.failed
                raise
            except Exception:
                relay.stop()
                connection.cancel()
                raise
            relay.stop()
            self._upstream.labels(backend.name, str(request.code)).inc()
            return STREAMED

    def _broken(self, backend: Backend, relay: _Relay, why: str) -> BytesResponse:
        self.backend_failed(backend, "error", why)
        if relay.answered:
            # The status is out: the router can only cut the client's connection.
            raise defer.CancelledError("upstream answer broke off")
        return text(502, "Bad gateway")
