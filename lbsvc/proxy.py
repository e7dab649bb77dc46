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

from typing import Any, Dict, List, Optional, Set, Union

from prometheus_client import CollectorRegistry, Counter, Histogram
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from lbsvc.backends import BackendPool
from lbsvc.balancer import Backend
from lbsvc.buckets import IBucketStore, Verdict
from lbsvc.keys import user_of
from lbsvc.ratelimitheaders import POLICY_HEADER, STATE_HEADER, policy, seconds_until_next, state
from lbsvc.retries import RetryBudget
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
from svckit.requestid import request_id
from svckit.responses import STREAMED, BytesResponse, HTTPError, Streamed
from svckit.web import client_gone

log = Logger()

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
})
NOT_FORWARDED = HOP_BY_HOP | {b"authorization", b"host", b"content-length", b"expect", b"x-request-id",
                              b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"via"}
NOT_RELAYED = HOP_BY_HOP | {b"content-length", b"via", b"x-request-id", b"ratelimit", b"ratelimit-policy"}
"""The gateway's own request id and limits replace a backend's."""
GATEWAY_HEADERS = (b"server", b"date", b"x-request-id", b"ratelimit", b"ratelimit-policy")
"""What the gateway puts on every answer, proxied or its own."""
VIA_NAME = b"lbsvc"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds of ``lbsvc_upstream_response_seconds``'s buckets."""


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


def text(request: server.Request, code: int, message: bytes) -> BytesResponse:
    """A plain-text gateway answer (``503 No available servers`` and friends).

    The message is the first line, as it always was; the request id follows
    on a line of its own.
    """
    return BytesResponse(b"%s\nrequest id: %s\n" % (message, request_id(request)), code)


class Deadlines:
    """The deadlines of the exchanges in flight, checked by one timer.

    A ``callLater`` and its ``cancel`` for every request (and a ``reset`` for
    every piece of a body) cost a measurable share of a proxied request; here
    setting a deadline is a dictionary store, and one ``LoopingCall`` looks
    every :attr:`resolution` seconds (while anything is in flight) for those
    that passed.  Timeouts are thus late by up to ``resolution`` seconds.
    """

    def __init__(self, clock: IReactorTime, resolution: float = 0.1) -> None:
        self.clock = clock
        self.resolution = resolution
        self._due: Dict[Any, float] = {}
        self._loop = task.LoopingCall(self._sweep)
        self._loop.clock = clock

    def set(self, watched: Any, seconds: float) -> None:
        """``watched.expired()`` is called once ``seconds`` pass without another ``set``."""
        self._due[watched] = self.clock.seconds() + seconds
        if not self._loop.running:
            self._loop.start(self.resolution, now=False)

    def clear(self, watched: Any) -> None:
        """No deadline for ``watched`` any more."""
        self._due.pop(watched, None)

    def _sweep(self) -> None:
        now = self.clock.seconds()
        due = self._due
        for watched in [w for w, at in due.items() if at <= now]:
            del due[watched]
            watched.expired()
        if not due and self._loop.running:
            self._loop.stop()


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
        self._deadlines = proxy.deadlines
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
            self.proxy.backend_failed(self.backend, "timeout", "did not answer within {seconds}s",
                                      seconds=self._response_timeout)
            self.failed = text(self.request, 504, b"Gateway timeout")
            self.connection.cancel()

    def _stalled(self) -> None:
        self.proxy.backend_failed(self.backend, "body_stalled", "sent no body for {seconds}s; cut off",
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
                self.proxy.backend_failed(self.backend, "timeout", "read none of the body for {seconds}s",
                                          seconds=self._body_timeout)
                self.failed = text(self.request, 504, b"Gateway timeout")
            else:
                log.info("Client sent none of its body for {seconds}s; giving up", seconds=self._body_timeout)
                self.failed = text(self.request, 408, b"Request body timed out")
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
        self.deadlines = Deadlines(clock)
        self.retries = RetryBudget(registry)
        self._upstream = Counter(
            "lbsvc_upstream_requests", "Requests sent upstream by backend and outcome.",
            ["backend", "outcome"], registry=registry,
        )
        latency = Histogram(
            "lbsvc_upstream_response_seconds", "Seconds from sending a request to a backend to the end of its"
            " answer, by backend (answers relayed whole).", ["backend"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self._latency: Dict[str, Any] = {}
        self._latency_of = latency.labels

    def latency(self, backend: str) -> Any:
        """The response-time histogram of ``backend``."""
        child = self._latency.get(backend)
        if child is None:
            child = self._latency[backend] = self._latency_of(backend)
        return child

    def __call__(self, request: server.Request) -> Any:
        """Spend a token (429 without one), then forward."""
        user = user_of(request)
        request.log_fields = {"user": user.name}  # type: ignore[attr-defined]
        verdict = self.buckets.take(user.name, user.capacity, user.rate_per_sec)
        if isinstance(verdict, defer.Deferred):  # a shared store: Redis answers later
            return verdict.addCallback(self._admitted, request, user)
        return self._admitted(verdict, request, user)

    def _admitted(self, verdict: Verdict, request: server.Request, user: User) -> Any:
        taken, bucket = verdict
        limits = policy(user.capacity, user.rate_per_sec)
        if not taken:
            raise HTTPError(429, "rate limit exceeded", {
                "Retry-After": str(seconds_until_next(bucket)),
                "RateLimit-Policy": limits.decode("ascii"),
                "RateLimit": state(bucket).decode("ascii"),
            })
        headers = request.responseHeaders
        headers.setRawHeaders(POLICY_HEADER, [limits])
        headers.setRawHeaders(STATE_HEADER, [state(bucket)])
        return _Forwarding(self, request).start()

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


class _Forwarding:
    """One proxied request: backends in turn, each on a pooled connection.

    Written as callbacks rather than a coroutine: this is the data path, and
    a coroutine (with ``ensureDeferred`` and an ``await`` per step) cost a
    measurable share of a proxied request.  :attr:`done` fires with the
    gateway's own answer or :data:`STREAMED` once the backend's answer was
    relayed; cancelling it (the client left) drops the upstream connection.
    """

    def __init__(self, proxy: Proxy, request: server.Request) -> None:
        self.proxy = proxy
        self.request = request
        self.body = proxy._body(request)
        self.tried: List[Backend] = []
        self.backend: Optional[Backend] = None
        self.connection: Optional[UpstreamConnection] = None
        self.relay: Optional[_Relay] = None
        self.fresh = False
        self.connecting: Optional[defer.Deferred[UpstreamConnection]] = None
        self.done: defer.Deferred[Union[Streamed, BytesResponse]] = defer.Deferred(self._cancel)
        self.sent = 0
        """Attempts that sent the request (a refused connect is none)."""
        self.sent_at = 0.0
        """When the last attempt sent the request."""
        self.started = proxy.clock.seconds()
        self.retrying = False

    def start(self) -> defer.Deferred[Union[Streamed, BytesResponse]]:
        """Forward; the Deferred of the answer."""
        self.proxy.retries.active += 1
        self.done.addBoth(self._ended)
        self._next_backend()
        return self.done

    def _ended(self, result: Any) -> Any:
        fields = getattr(self.request, "log_fields", None)
        if fields is not None and self.tried:
            fields["backend"] = self.tried[-1].name
            fields["upstream_ms"] = (self.proxy.clock.seconds() - self.started) * 1000
        budget = self.proxy.retries
        budget.active -= 1
        if self.retrying:
            budget.retrying -= 1
        return result

    # --- choosing and connecting -------------------------------------------

    def _next_backend(self) -> None:
        backend = self.proxy.pool.choose(self.tried)
        if backend is None:
            self._answer(text(self.request, 503, b"No available servers"))
            return
        self._use(backend)

    def _use(self, backend: Backend) -> None:
        self.tried.append(backend)
        backend.in_flight += 1
        self.backend = backend
        self.fresh = False
        self._connect()

    def _connect(self) -> None:
        assert self.backend is not None
        d = self.proxy.upstream.connection(self.backend, fresh=self.fresh)
        self.connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _connect_failed(self, reason: Failure) -> None:
        self.connecting = None
        backend = self._release()
        if self.done.called:
            return
        if not reason.check(ConnectFailed) or client_gone(self.request) or backend is None:
            self._fail(reason if not client_gone(self.request) else Failure(defer.CancelledError()))
            return
        proxy = self.proxy
        proxy._upstream.labels(backend.name, "connect_error").inc()
        log.info("Backend {name} unreachable ({error}); trying the next", name=backend.name,
                 error=reason.getErrorMessage())
        proxy.pool.connect_failed(backend)
        self._next_backend()

    def _connected(self, connection: UpstreamConnection) -> None:
        self.connecting = None
        backend = self.backend
        if self.done.called or backend is None:  # the client left meanwhile
            connection.cancel()
            return
        self.connection = connection
        try:
            host = backend.host if b":" not in backend.host else b"[" + backend.host + b"]"
            head = upstream_head(self.request, b"%s:%d" % (host, backend.port))
            relay = self.relay = _Relay(self.request, connection, backend, self.body, self.proxy)
            exchange = connection.request(head, self.body, relay, head_only=self.request.method == b"HEAD")
            self.sent += 1
            self.sent_at = self.proxy.clock.seconds()
        except Exception:
            connection.cancel()
            self._release()
            self._fail(Failure())
            return
        exchange.addCallbacks(self._exchanged, self._exchange_failed)

    # --- the exchange ----------------------------------------------------------

    def _exchanged(self, _: object) -> None:
        assert self.relay is not None and self.backend is not None
        self.relay.stop()
        proxy = self.proxy
        proxy._upstream.labels(self.backend.name, str(self.request.code)).inc()
        proxy.latency(self.backend.name).observe(proxy.clock.seconds() - self.sent_at)
        self._release()
        self._answer(STREAMED)

    def _exchange_failed(self, reason: Failure) -> None:
        relay, connection = self.relay, self.connection
        assert relay is not None and connection is not None
        relay.stop()
        if self.done.called:
            self._release()
            return
        if reason.check(StaleConnection):
            if self.body is not None and getattr(self.body, "started", True):
                self._broken("closed a reused connection mid-request")
            else:
                self.fresh = True  # the idle connection had been closed: once more, on a new one
                self._connect()
            return
        if reason.check(BadResponse):
            self._broken(f"answered badly: {reason.getErrorMessage()}")
            return
        connection.cancel()
        self._release()
        if reason.check(defer.CancelledError) and relay.failed is not None and not self.request.startedWriting:
            if relay.failed.code == 504 and not relay.answered and self._retry():
                return  # no answer in time: the next backend may have one
            self._answer_instead(relay.failed)  # a timer's answer: 504 or 408
        else:
            self._fail(reason)

    def _broken(self, why: str) -> None:
        assert self.relay is not None and self.backend is not None
        self.proxy.backend_failed(self.backend, "error", why)
        self._release()
        if self._retry():
            return
        if self.request.startedWriting:
            # Part of the answer is out: the router can only cut the client's
            # connection, quietly (the warning above says why).
            self._fail(Failure(defer.CancelledError("upstream answer broke off")))
        else:
            self._answer_instead(text(self.request, 502, b"Bad gateway"))

    def _retry(self) -> bool:
        """Send the request to another backend, if that is safe and within the budget."""
        request = self.request
        if request.startedWriting or client_gone(request):
            return False
        proxy = self.proxy
        if not proxy.retries.allows(proxy.pool.config.retries, request.method, self.body, self.sent,
                                    proxy.clock.seconds() - self.started, self.retrying):
            return False
        backend = proxy.pool.choose(self.tried)
        if backend is None:
            return False
        self._forget_backend_head()
        if not self.retrying:
            self.retrying = True
            proxy.retries.retrying += 1
        log.info("Retrying {method} on backend {name} (attempt {n})", method=request.method.decode("latin-1"),
                 name=backend.name, n=self.sent + 1)
        self.relay = self.connection = None
        self._use(backend)
        return True

    def _answer_instead(self, response: BytesResponse) -> None:
        """The gateway answers; a backend head taken but never sent to the client is forgotten."""
        self._forget_backend_head()
        self._answer(response)

    def _forget_backend_head(self) -> None:
        """Drop the headers a failed attempt's head put on the answer (they were never sent).

        The gateway's own (:data:`GATEWAY_HEADERS`) stay.
        """
        if self.relay is not None and self.relay.answered:
            old, new = self.request.responseHeaders, Headers()
            for name in GATEWAY_HEADERS:
                values = old.getRawHeaders(name)
                if values:
                    new.setRawHeaders(name, values)
            self.request.responseHeaders = new

    # --- the end ------------------------------------------------------------------

    def _release(self) -> Optional[Backend]:
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.in_flight -= 1
        return backend

    def _answer(self, response: Union[Streamed, BytesResponse]) -> None:
        if not self.done.called:
            self.done.callback(response)

    def _fail(self, reason: Failure) -> None:
        if not self.done.called:
            self.done.errback(reason)

    def _cancel(self, _: object) -> None:
        """The client went away: stop connecting, or drop the upstream connection."""
        if self.connecting is not None:
            connecting, self.connecting = self.connecting, None
            connecting.cancel()
        elif self.connection is not None:
            self.connection.cancel()
