"""What every proxied request's trip to the backends shares: the pool, connections, budget, counts.

:class:`Upstreams` is handed by the :class:`~lbsvc.proxying.proxy.Proxy` to
each :class:`~lbsvc.proxying.forwarding.Forwarding` and
:class:`~lbsvc.proxying.relay.Relay`: the backend pool and its health, the
idle connections, the clock and the deadlines of every exchange, the retry
budget, and the outcome counters and response-time histograms.  It sits
below all three, so the proxy, the forwarding and the relay import it and
none of them imports another that imports it back.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lbsvc.backends.backend import Backend
from lbsvc.backends.pool import BackendPool
from lbsvc.proxying.connections import UpstreamConnections
from lbsvc.proxying.retries import RetryBudget
from svckit.deadlines import Deadlines
from svckit.metrics import incrementer, observer

log = Logger()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Upstreams:
    """The backends as every request's trip sees them, and what is counted of each trip."""

    def __init__(self, pool: BackendPool, connections: UpstreamConnections, clock: IReactorTime,
                 registry: CollectorRegistry) -> None:
        self.pool = pool
        self.connections = connections
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
        self._latency: Dict[str, Callable[[float], None]] = {}
        self._latency_of = latency.labels
        self._answered: Dict[Tuple[str, int], Callable[[float], None]] = {}

    def answered(self, backend: str, code: int) -> None:
        """Count one answer of ``backend`` with status ``code`` (``outcomes``; its child's increment kept, as a
        label lookup and ``Counter.inc`` cost seven calls a request)."""
        increment = self._answered.get((backend, code))
        if increment is None:
            increment = self._answered[backend, code] = incrementer(self.outcomes.labels(backend, str(code)))
        increment(1)

    def took(self, backend: str, seconds: float) -> None:
        """Record one response time of ``backend`` (the histogram's bucket found by bisection)."""
        observe = self._latency.get(backend)
        if observe is None:
            observe = self._latency[backend] = observer(self._latency_of(backend))
        observe(seconds)

    def backend_failed(self, backend: Backend, outcome: str, why: str, **fields: Any) -> None:
        """A passive failure: counted, logged, and the backend taken out."""
        self.outcomes.labels(backend.name, outcome).inc()
        log.warn("Backend {name} " + why, name=backend.name, **fields)
        self.pool.connect_failed(backend)
