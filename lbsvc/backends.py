"""The backend pool: current backends, their health, the balancer, reloads.

Health is tracked two ways.  Actively, :class:`HealthChecker` requests each
backend's configured path every ``interval``; ``fall`` failures in a row take
it out, ``rise`` successes in a row bring it back.  Passively, the proxy calls
:meth:`BackendPool.connect_failed` when a backend refuses a connection, which
takes it out at once.
"""

from __future__ import annotations

from typing import Any, Callable, Container, Dict, List, Optional

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lbsvc.balancer import BALANCERS, Backend, IBalancer
from lbsvc.config import HealthCheck, ServersConfig

log = Logger()


class BackendPool:
    """Backends from the configuration, with their live state."""

    def __init__(self, config: ServersConfig) -> None:
        self.backends: List[Backend] = []
        self.balancer: IBalancer = BALANCERS[config.algorithm]()
        self.config = config
        self.apply(config)

    def apply(self, config: ServersConfig) -> None:
        """Switch to ``config``; backends with the same name and URL keep their state.

        Requests in flight hold their own ``Backend`` objects and finish
        normally, whatever the new list says.
        """
        old: Dict[tuple, Backend] = {(b.name, b.url): b for b in self.backends}
        self.backends = [old.get((s.name, s.url)) or Backend(s.name, s.url) for s in config.servers]
        if config.algorithm != self.config.algorithm:
            self.balancer = BALANCERS[config.algorithm]()
        self.config = config

    def choose(self, exclude: Container[Backend] = ()) -> Optional[Backend]:
        """The balancer's pick among healthy backends."""
        return self.balancer.choose(self.backends, exclude)

    def connect_failed(self, backend: Backend) -> None:
        """Passive check: a refused connection takes the backend out now."""
        if backend.healthy:
            log.warn("Backend {name} refused a connection; taking it out", name=backend.name)
        backend.healthy = False
        backend.successes = 0

    def record_check(self, backend: Backend, ok: bool, check: HealthCheck) -> None:
        """Active check result, with the fall/rise thresholds."""
        if ok:
            backend.failures = 0
            backend.successes += 1
            if not backend.healthy and backend.successes >= check.rise:
                backend.healthy = True
                log.info("Backend {name} is healthy again", name=backend.name)
        else:
            backend.successes = 0
            backend.failures += 1
            if backend.healthy and backend.failures >= check.fall:
                backend.healthy = False
                log.warn("Backend {name} failed {n} health checks; taking it out", name=backend.name, n=backend.failures)


Probe = Callable[[str, float], "defer.Deferred[int]"]
"""``probe(url, timeout)`` fires with the HTTP status code (errback on failure)."""


class HealthChecker:
    """Checks every backend of a pool every ``interval`` seconds."""

    def __init__(self, pool: BackendPool, probe: Probe, clock: IReactorTime) -> None:
        self.pool = pool
        self.probe = probe
        self._loop = task.LoopingCall(self.check_all)
        self._loop.clock = clock
        self._interval = pool.config.health_check.interval

    def start(self) -> None:
        """Check now and then every interval."""
        self._interval = self.pool.config.health_check.interval
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        """Stop checking."""
        if self._loop.running:
            self._loop.stop()

    def restart_if_changed(self) -> None:
        """After a reload: follow a new interval."""
        if self._loop.running and self._interval != self.pool.config.health_check.interval:
            self.stop()
            self.start()

    def check_all(self) -> "defer.Deferred[Any]":
        """One round of checks, all backends at once."""
        check = self.pool.config.health_check
        return defer.DeferredList(
            [self._check(b, check) for b in list(self.pool.backends)], consumeErrors=True
        )

    def _check(self, backend: Backend, check: HealthCheck) -> "defer.Deferred[None]":
        d = self.probe(backend.url + check.path, check.timeout)
        d.addCallbacks(lambda code: 200 <= code < 300, lambda _: False)
        d.addCallback(lambda ok: self.pool.record_check(backend, ok, check))
        return d
