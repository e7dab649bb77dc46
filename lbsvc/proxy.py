"""Proxying: API key, one token, a healthy backend, bodies streamed both ways.

The request body (already received by ``twisted.web``) is streamed upstream
from its buffer with ``FileBodyProducer``; the response body is relayed as it
arrives, with the client's transport pushing back on the backend's, so a slow
client never makes the gateway buffer a large response.  Backends are reached
through one persistent ``HTTPConnectionPool``.
"""

from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet import defer, error, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IRequest, IResponse

from lbsvc.backends import BackendPool
from lbsvc.balancer import Backend
from lbsvc.buckets import Buckets
from lbsvc.keys import authenticate
from lbsvc.users import UserStore
from svckit.jsonweb import HTTPError, error_response, write_response
from svckit.metrics import Registry

log = Logger()

HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade",
}
NOT_FORWARDED = HOP_BY_HOP | {b"authorization", b"host", b"content-length"}
CONNECT_ERRORS = (error.ConnectError, error.ConnectingCancelledError)


def _hop_by_hop(headers: Headers) -> set:
    named = set()
    for value in headers.getRawHeaders(b"connection", []):
        named.update(v.strip().lower() for v in value.split(b","))
    return named


def upstream_headers(request: IRequest) -> Headers:
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
    return headers


class _BodyRelay(Protocol):
    """Writes a backend's response body to the client request as it arrives."""

    def __init__(self, request: IRequest, done: "defer.Deferred[None]") -> None:
        self.request = request
        self.done = done

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if not self.request.finished:  # type: ignore[attr-defined]
            self.request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.request.unregisterProducer()
        if not self.request.finished:  # type: ignore[attr-defined]
            if reason.check(ResponseDone, PotentialDataLoss):
                self.request.finish()
            else:
                log.warn("Upstream body broke off: {reason}", reason=reason.value)
                self.request.loseConnection()
        self.done.callback(None)


def text_error(request: IRequest, code: int, message: str) -> bytes:
    """A plain-text gateway error (``503 No available servers`` and friends)."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return message.encode("utf-8")


class ProxyResource(resource.Resource):
    """Every path outside ``/user/``: authenticate, rate-limit, forward."""

    isLeaf = True

    def __init__(
        self,
        users: UserStore,
        buckets: Buckets,
        pool: BackendPool,
        agent: IAgent,
        clock: IReactorTime,
        registry: Registry,
        cooperator: Optional[task.Cooperator] = None,
    ) -> None:
        super().__init__()
        self.cooperator: Any = cooperator or task  # the module's cooperate() is the global one
        self.users = users
        self.buckets = buckets
        self.pool = pool
        self.agent = agent
        self.clock = clock
        self._requests = registry.counter(
            "lbsvc_proxied_requests_total", "Proxied requests by status code.", ("code",)
        )
        self._upstream = registry.counter(
            "lbsvc_upstream_requests_total", "Requests sent upstream by backend and outcome.",
            ("backend", "outcome"),
        )

    def render(self, request: IRequest) -> Any:
        """Admit the request or answer 401/429, then forward it."""
        try:
            user = authenticate(request, self.users)
        except HTTPError as e:
            self._requests.inc(code=str(e.code))
            return write_response(request, error_response(e))
        bucket = self.buckets.take(user.name, user.capacity, user.rate_per_sec)
        if bucket is None:
            bucket = self.buckets.peek(user.name, user.capacity, user.rate_per_sec)
            self._requests.inc(code="429")
            return write_response(request, error_response(HTTPError(429, "rate limit exceeded", {
                "Retry-After": str(bucket.retry_after()),
                "RateLimit-Limit": str(user.capacity),
                "RateLimit-Remaining": str(int(bucket.level)),
                "RateLimit-Reset": str(bucket.reset_after()),
            })))
        d = defer.ensureDeferred(self._forward(request))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(self._unexpected, request)
        return server.NOT_DONE_YET

    def _finish(self, request: IRequest, code: int, message: str) -> None:
        self._requests.inc(code=str(code))
        if not request.finished:  # type: ignore[attr-defined]
            request.write(text_error(request, code, message))
            request.finish()

    def _unexpected(self, failure: Failure, request: IRequest) -> None:
        if failure.check(defer.CancelledError):
            return
        log.failure("Proxying failed", failure)
        self._finish(request, 502, "Bad gateway")

    async def _forward(self, request: IRequest) -> None:
        headers = upstream_headers(request)
        tried: List[Backend] = []
        has_body = request.getHeader(b"content-length") not in (None, b"0") or request.getHeader(b"transfer-encoding") is not None
        while True:
            backend = self.pool.choose(tried)
            if backend is None:
                self._finish(request, 503, "No available servers")
                return
            tried.append(backend)
            response = await self._attempt(request, backend, headers, has_body)
            if response is not None:
                break
        if response is False:
            return
        backend.in_flight += 1
        try:
            await self._relay(request, response)
        finally:
            backend.in_flight -= 1

    async def _attempt(self, request: IRequest, backend: Backend, headers: Headers, has_body: bool) -> Any:
        """One backend: the response, None to try the next, False when answered."""
        body: Optional[FileBodyProducer] = None
        if has_body:
            request.content.seek(0)
            body = FileBodyProducer(request.content, cooperator=self.cooperator)
        url = backend.url.encode("utf-8") + request.uri
        d = self.agent.request(request.method, url, headers, body)
        d.addTimeout(self.pool.config.upstream_timeout, self.clock)
        backend.in_flight += 1
        try:
            response: IResponse = await d
        except CONNECT_ERRORS as e:
            self._upstream.inc(backend=backend.name, outcome="connect_error")
            log.info("Backend {name} unreachable ({error}); trying the next", name=backend.name, error=e)
            self.pool.connect_failed(backend)
            return None
        except defer.TimeoutError:
            self._upstream.inc(backend=backend.name, outcome="timeout")
            self._finish(request, 504, "Gateway timeout")
            return False
        except defer.CancelledError:
            raise
        except Exception as e:
            self._upstream.inc(backend=backend.name, outcome="error")
            log.warn("Backend {name} failed: {error!r}", name=backend.name, error=e)
            self._finish(request, 502, "Bad gateway")
            return False
        finally:
            backend.in_flight -= 1
        self._upstream.inc(backend=backend.name, outcome=str(response.code))
        return response

    async def _relay(self, request: IRequest, response: IResponse) -> None:
        self._requests.inc(code=str(response.code))
        request.setResponseCode(response.code, response.phrase)
        drop = HOP_BY_HOP | _hop_by_hop(response.headers) | {b"content-length"}
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in drop:
                request.responseHeaders.setRawHeaders(name, values)
        if isinstance(response.length, int):
            request.setHeader(b"content-length", str(response.length).encode("ascii"))
        done: "defer.Deferred[None]" = defer.Deferred()
        response.deliverBody(_BodyRelay(request, done))
        await done
