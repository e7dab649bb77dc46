"""Active health checks: every backend's configured path, every ``interval``.

:class:`HealthChecker` owns the check loop (a ``LoopingCall`` the daemon runs
under a :class:`~svckit.supervisor.Supervisor`); :func:`http_probe` is the
probe it uses in the daemon, a GET through a non-persistent agent.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.web import client
from twisted.web.iweb import IAgent, IPolicyForHTTPS, IResponse

from lbsvc.backends.backend import Backend
from lbsvc.backends.pool import BackendPool
from lbsvc.backends.servers import HealthCheck

Probe = Callable[[str, float], "defer.Deferred[int]"]
"""``probe(url, timeout)`` fires with the HTTP status code (errback on failure)."""


class _QuietFactory(client._HTTP11ClientFactory):
    noisy = False  # no "Starting factory" line per check


def probe_agent(reactor: Any, connect_timeout: float, tls: Optional[IPolicyForHTTPS] = None) -> IAgent:
    """An agent for health checks: a new connection per check, never pooled.

    ``tls`` verifies ``https`` backends (:class:`lbsvc.backends.tls.ProbePolicy`: the
    same CA files as the proxied requests).
    """
    pool = client.HTTPConnectionPool(reactor, persistent=False)
    pool._factory = _QuietFactory
    policy = tls if tls is not None else client.BrowserLikePolicyForHTTPS()
    return client.Agent(reactor, contextFactory=policy, connectTimeout=connect_timeout, pool=pool)


def http_probe(agent: IAgent, clock: IReactorTime) -> Probe:
    """A probe: GET ``url`` within ``timeout``, fire with the status code."""

    def run(url: str, timeout: float) -> defer.Deferred[int]:
        d = agent.request(b"GET", url.encode("utf-8"))
        d.addTimeout(timeout, clock)

        def code(response: IResponse) -> defer.Deferred[int]:
            return client.readBody(response).addBoth(lambda _: response.code)

        return d.addCallback(code)

    return run


class HealthChecker:
    """Checks every backend of a pool every ``interval`` seconds."""

    def __init__(self, pool: BackendPool, probe: Probe, clock: IReactorTime) -> None:
        self.pool = pool
        self.probe = probe
        self.loop = task.LoopingCall(self.check_all)
        self.loop.clock = clock
        self.interval = pool.config.health_check.interval

    def start(self) -> defer.Deferred[Any]:
        """Check now and then every interval; fires when the loop stops (or fails)."""
        self.interval = self.pool.config.health_check.interval
        return self.loop.start(self.interval, now=True)

    def stop(self) -> None:
        """Stop checking."""
        if self.loop.running:
            self.loop.stop()

    @property
    def interval_changed(self) -> bool:
        """Whether a reload changed the interval (the loop must be restarted)."""
        return self.interval != self.pool.config.health_check.interval

    def check_all(self) -> defer.Deferred[List[None]]:
        """One round of checks, all backends at once.

        A failed probe counts as a failed check; anything else that goes wrong
        fails the round, and so the loop, which its supervisor reports.
        """
        check = self.pool.config.health_check
        return defer.gatherResults(
            [self._check(b, check) for b in list(self.pool.backends)], consumeErrors=True
        )

    def _check(self, backend: Backend, check: HealthCheck) -> defer.Deferred[None]:
        def record(ok: bool) -> None:
            self.pool.record_check(backend, ok, check)

        d = self.probe(backend.url + check.path, check.timeout)
        passed: defer.Deferred[bool] = d.addCallbacks(lambda code: 200 <= code < 300, lambda _: False)
        return passed.addCallback(record)
