"""The backend pool: current backends, their health, the balancer, reloads.

Health is tracked two ways.  Actively, :class:`lbsvc.healthcheck.HealthChecker`
reports each check through :meth:`BackendPool.record_check`; ``fall``
failures in a row take a backend out, ``rise`` successes in a row bring it
back.  Passively, the proxy calls :meth:`BackendPool.connect_failed` when a
backend refuses a connection, which takes it out at once.
"""

from __future__ import annotations

from typing import Container, Dict, List, Optional, Tuple

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
        old: Dict[Tuple[str, str], Backend] = {(b.name, b.url): b for b in self.backends}
        self.backends = [old.get((s.name, s.url)) or Backend(s.name, s.url) for s in config.servers]
        if config.algorithm != self.config.algorithm:
            self.balancer = BALANCERS[config.algorithm]()
        self.config = config

    def choose(self, exclude: Container[Backend] = ()) -> Optional[Backend]:
        """The balancer's pick among healthy backends."""
        return self.balancer.choose(self.backends, exclude)

    def connect_failed(self, backend: Backend) -> None:
        """Passive check: a refused connection, or a timeout, takes the backend out now."""
        if backend.healthy:
            log.warn("Backend {name} failed (refused, timed out or stalled); taking it out", name=backend.name)
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
