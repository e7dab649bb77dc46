"""One proxied request: backends in turn, each on a pooled connection, retried when it is safe."""

from __future__ import annotations

from typing import Any, List, Optional, Union

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer

from lbsvc.backends.backend import Backend
from lbsvc.proxying.headerrules import GATEWAY_HEADERS, upstream_head
from lbsvc.proxying.relay import Relay, text
from lbsvc.proxying.upstream import BadResponse, ConnectFailed, StaleConnection, UpstreamConnection
from lbsvc.proxying.upstreams import Upstreams
from svckit.headblock import HeadHeaders
from svckit.responses import STREAMED, BytesResponse, Streamed
from svckit.web import client_gone

log = Logger()


def body_of(request: server.Request) -> Optional[IBodyProducer]:
    """The request's body as a producer for the upstream write (None: no body)."""
    streamed = getattr(request, "body", None)
    if streamed is not None:
        return streamed  # type: ignore[no-any-return]
    if request.getHeader(b"content-length") in (None, b"0") and request.getHeader(b"transfer-encoding") is None:
        return None
    # Not behind a GuardedSite: the body was stored whole.
    request.content.seek(0)  # type: ignore[union-attr]
    return FileBodyProducer(request.content)


class Forwarding:
    """One proxied request: backends in turn, each on a pooled connection.

    Written as callbacks rather than a coroutine: this is the data path, and
    a coroutine (with ``ensureDeferred`` and an ``await`` per step) cost a
    measurable share of a proxied request.  :attr:`done` fires with the
    gateway's own answer or :data:`STREAMED` once the backend's answer was
    relayed; cancelling it (the client left) drops the upstream connection.
    """

    def __init__(self, upstreams: Upstreams, request: server.Request) -> None:
        self.upstreams = upstreams
        self.request = request
        self.body = body_of(request)
        self.tried: List[Backend] = []
        self.backend: Optional[Backend] = None
        self.connection: Optional[UpstreamConnection] = None
        self.relay: Optional[Relay] = None
        self.fresh = False
        self.connecting: Optional[defer.Deferred[UpstreamConnection]] = None
        self.done: defer.Deferred[Union[Streamed, BytesResponse]] = defer.Deferred(self._cancel)
        self.sent = 0
        """Attempts that sent the request (a refused connect is none)."""
        self.sent_at = 0.0
        """When the last attempt sent the request."""
        self.started = upstreams.clock.seconds()
        self.retrying = False

    def start(self) -> defer.Deferred[Union[Streamed, BytesResponse]]:
        """Forward; the Deferred of the answer."""
        self.upstreams.retries.active += 1
        self.done.addBoth(self._ended)
        self._next_backend()
        return self.done

    def _ended(self, result: Any) -> Any:
        fields = getattr(self.request, "log_fields", None)
        if fields is not None and self.tried:
            fields["backend"] = self.tried[-1].name
            fields["upstream_ms"] = (self.upstreams.clock.seconds() - self.started) * 1000
        budget = self.upstreams.retries
        budget.active -= 1
        if self.retrying:
            budget.retrying -= 1
        return result

    # --- choosing and connecting -------------------------------------------

    def _next_backend(self) -> None:
        backend = self.upstreams.pool.choose(self.tried)
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
        if not self.fresh:
            idle = self.upstreams.connections.idle_connection(self.backend)
            if idle is not None:
                self._connected(idle)
                return
        d = self.upstreams.connections.connection(self.backend, fresh=self.fresh)
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
        upstreams = self.upstreams
        upstreams.outcomes.labels(backend.name, "connect_error").inc()
        log.info("Backend {name} unreachable ({error}); trying the next", name=backend.name,
                 error=reason.getErrorMessage())
        upstreams.pool.connect_failed(backend)
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
            relay = self.relay = Relay(self.request, connection, backend, self.body, self.upstreams)
            exchange = connection.request(head, self.body, relay, head_only=self.request.method == b"HEAD")
            self.sent += 1
            self.sent_at = self.upstreams.clock.seconds()
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
        upstreams = self.upstreams
        upstreams.answered(self.backend.name, self.request.code)
        upstreams.took(self.backend.name, upstreams.clock.seconds() - self.sent_at)
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
        self.upstreams.backend_failed(self.backend, "error", why)
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
        upstreams = self.upstreams
        if not upstreams.retries.allows(upstreams.pool.config.retries, request.method, self.body, self.sent,
                                        upstreams.clock.seconds() - self.started, self.retrying):
            return False
        backend = upstreams.pool.choose(self.tried)
        if backend is None:
            return False
        self._forget_backend_head()
        if not self.retrying:
            self.retrying = True
            upstreams.retries.retrying += 1
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
            old, new = self.request.responseHeaders, HeadHeaders()
            new.block = getattr(old, "block", b"")  # the gateway's own lines (svckit.headblock)
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
