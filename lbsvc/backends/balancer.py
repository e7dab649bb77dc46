"""Choosing a backend: the ``IBalancer`` interface and its implementations.

``algorithm:`` in ``servers.yaml`` names one of :data:`BALANCERS`.
"""

from __future__ import annotations

from typing import Callable, Container, Dict, Optional, Sequence

from zope.interface import Interface, implementer

from lbsvc.backends.backend import Backend


class IBalancer(Interface):
    """Picks the backend for the next request."""

    def choose(backends: Sequence[Backend], exclude: Container[Backend]) -> Optional[Backend]:
        """An available backend (``Backend.available``) not in ``exclude``, or None when there is none."""


@implementer(IBalancer)
class RoundRobin:
    """Each available backend in turn."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, backends: Sequence[Backend], exclude: Container[Backend]) -> Optional[Backend]:
        """The next available backend after the last one chosen."""
        n = len(backends)
        for step in range(n):
            backend = backends[(self._next + step) % n]
            if backend.available and backend not in exclude:
                self._next = (self._next + step + 1) % n
                return backend
        return None


@implementer(IBalancer)
class LeastConnections:
    """The available backend with the fewest requests in flight (ties: round robin)."""

    def __init__(self) -> None:
        self._tie = RoundRobin()

    def choose(self, backends: Sequence[Backend], exclude: Container[Backend]) -> Optional[Backend]:
        """The least busy available backend."""
        candidates = [b for b in backends if b.available and b not in exclude]
        if not candidates:
            return None
        least = min(b.in_flight for b in candidates)
        return self._tie.choose([b for b in candidates if b.in_flight == least], ())


BALANCERS: Dict[str, Callable[[], IBalancer]] = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
}
