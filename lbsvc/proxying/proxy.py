"""The gateway's handler of every path outside ``/user/``: one token, then forwarding.

The key was checked when the headers arrived (:func:`lbsvc.users.keys.key_guard`),
and the proxy route streams its body (``Route.stream_body``): the handler runs
before the body is in.  It spends a token (429 with ``Retry-After`` and the
``RateLimit`` headers without one) and hands the request to a
:class:`~lbsvc.proxying.forwarding.Forwarding`, which picks a backend, takes a
pooled connection to it (:mod:`lbsvc.proxying.upstream`) and sends the head
(:mod:`lbsvc.proxying.headerrules`) and the body as it arrives, with
back-pressure from the backend to the client; the answer comes back through a
:class:`~lbsvc.proxying.relay.Relay`.  A client that goes away cancels the
handler, which drops the upstream connection.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer

from lbsvc.backends.backend import Backend
from lbsvc.backends.pool import BackendPool
from lbsvc.limits.buckets import IBucketStore, Verdict
from lbsvc.limits.ratelimitheaders import POLICY_HEADER, STATE_HEADER, policy, seconds_until_next, state
from lbsvc.proxying.connections import UpstreamConnections
from lbsvc.proxying.forwarding import Forwarding
from lbsvc.proxying.retries import RetryBudget
from lbsvc.users.index import User
from lbsvc.users.keys import user_of
from svckit.deadlines import Deadlines
from svckit.responses import HTTPError

log = Logger()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds of ``lbsvc_upstream_response_seconds``'s buckets."""


class Proxy:
    """The handler of every path outside ``/user/``: rate-limit, forward."""

    def __init__(self, buckets: IBucketStore, pool: BackendPool, upstream: UpstreamConnections,
                 clock: IReactorTime, registry: CollectorRegistry) -> None:
        self.buckets = buckets
        self.pool = pool
        self.upstream = upstream
        self.clock = clock
        self.deadlines = Deadlines(clock)
        self.retries = RetryBudget(registry)
        self.outcomes = Counter(
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
        return Forwarding(self, request).start()

    def backend_failed(self, backend: Backend, outcome: str, why: str, **fields: Any) -> None:
        """A passive failure: counted, logged, and the backend taken out."""
        self.outcomes.labels(backend.name, outcome).inc()
        log.warn("Backend {name} " + why, name=backend.name, **fields)
        self.pool.connect_failed(backend)

    def body_of(self, request: server.Request) -> Optional[IBodyProducer]:
        streamed = getattr(request, "body", None)
        if streamed is not None:
            return streamed  # type: ignore[no-any-return]
        if request.getHeader(b"content-length") in (None, b"0") and request.getHeader(b"transfer-encoding") is None:
            return None
        # Not behind a GuardedSite: the body was stored whole.
        request.content.seek(0)  # type: ignore[union-attr]
        return FileBodyProducer(request.content)
