"""The backend pool: current backends, their health, the balancer, reloads.

Health is tracked two ways.  Actively, :class:`lbsvc.backends.healthcheck.HealthChecker`
reports each check through :meth:`BackendPool.record_check`; ``fall``
failures in a row take a backend out, ``rise`` successes in a row bring it
back.  Passively, the proxy calls :meth:`BackendPool.connect_failed` when a
backend refuses a connection, times out or answers badly: that *ejects* it,
at once and for a time that grows with each ejection in a row (``ejection:
{base, max}`` in ``servers.yaml``: base x n, at most max, Envoy's outlier
detection), during which passing health checks do not bring it back.  So a
backend that answers ``/health`` but not real requests stays out.

**Panic threshold.**  When fewer than ``panic_threshold`` (default half) of
the backends are healthy, the pool balances over all of them, healthy or
not (Envoy's healthy panic threshold): a health-check blip or a passive mark
never turns into a total outage by itself.  Entering and leaving panic is
logged once each; ``lbsvc_backends_panic`` on ``/metrics`` shows it.
Balancers read :attr:`Backend.available`, which the pool keeps up to date
whenever health changes (never per request).
"""

from __future__ import annotations

from typing import Container, Dict, List, Optional, Tuple

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lbsvc.backends.backend import Backend
from lbsvc.backends.balancer import BALANCERS, IBalancer
from lbsvc.backends.servers import HealthCheck, ServersConfig

log = Logger()


class BackendPool:
    """Backends from the configuration, with their live state."""

    def __init__(self, config: ServersConfig, clock: IReactorTime) -> None:
        self.backends: List[Backend] = []
        self.balancer: IBalancer = BALANCERS[config.algorithm]()
        self.config = config
        self.clock = clock
        self.panicking = False
        self.apply(config)

    def apply(self, config: ServersConfig) -> None:
        """Switch to ``config``; backends with the same name and URL keep their state.

        Requests in flight hold their own ``Backend`` objects and finish
        normally, whatever the new list says.
        """
        old: Dict[Tuple[str, str, Optional[str]], Backend] = {(b.name, b.url, b.ca_file): b for b in self.backends}
        self.backends = [old.get((s.name, s.url, s.ca_file)) or Backend(s.name, s.url, s.ca_file)
                         for s in config.servers]
        if config.algorithm != self.config.algorithm:
            self.balancer = BALANCERS[config.algorithm]()
        self.config = config
        self._health_changed()

    def ca_file_of(self, host: bytes, port: int) -> Optional[str]:
        """The CA file of the https backend at ``host:port`` (None: the system's CAs)."""
        for backend in self.backends:
            if backend.host == host and backend.port == port and backend.scheme == b"https":
                return backend.ca_file
        return None

    def choose(self, exclude: Container[Backend] = ()) -> Optional[Backend]:
        """The balancer's pick among available backends."""
        return self.balancer.choose(self.backends, exclude)

    def connect_failed(self, backend: Backend) -> None:
        """Passive check: a refused connection, a timeout or a bad answer ejects the backend now."""
        now = self.clock.seconds()
        ejection = self.config.ejection
        if now - backend.ejected_until > ejection.max:
            backend.ejections = 0  # long enough in service: a first offence again
        if backend.ejected_until <= now:
            backend.ejections += 1
            seconds = min(ejection.base * backend.ejections, ejection.max)
            backend.ejected_until = now + seconds
            log.warn("Backend {name} failed (refused, timed out, stalled or answered badly); out for"
                     " {seconds:g}s (ejection {n} in a row)", name=backend.name, seconds=seconds,
                     n=backend.ejections)
        backend.healthy = False
        backend.successes = 0
        self._health_changed()

    def record_check(self, backend: Backend, ok: bool, check: HealthCheck) -> None:
        """Active check result, with the fall/rise thresholds (an ejection waits out its time)."""
        if ok:
            backend.failures = 0
            backend.successes += 1
            if not backend.healthy and backend.successes >= check.rise \
                    and self.clock.seconds() >= backend.ejected_until:
                backend.healthy = True
                log.info("Backend {name} is healthy again", name=backend.name)
                self._health_changed()
        else:
            backend.successes = 0
            backend.failures += 1
            if backend.healthy and backend.failures >= check.fall:
                backend.healthy = False
                log.warn("Backend {name} failed {n} health checks; taking it out", name=backend.name, n=backend.failures)
                self._health_changed()

    def _health_changed(self) -> None:
        healthy = sum(1 for b in self.backends if b.healthy)
        panic = bool(self.backends) and healthy < self.config.panic_threshold * len(self.backends)
        if panic != self.panicking:
            self.panicking = panic
            if panic:
                log.warn("Only {healthy} of {total} backends are healthy, under the panic threshold"
                         " ({threshold:.0%}): balancing over all of them until more recover",
                         healthy=healthy, total=len(self.backends), threshold=self.config.panic_threshold)
            else:
                log.info("{healthy} of {total} backends healthy again: balancing over the healthy ones",
                         healthy=healthy, total=len(self.backends))
        for backend in self.backends:
            backend.available = panic or backend.healthy
