"""Hybrid logical clock: versions that order writes across replicas.

A timestamp is one 64-bit integer, ``physical_ms << 16 | logical``.  It never
goes backwards, stays close to wall time, and after :meth:`observe` is larger
than every timestamp seen from other replicas, so a write made after reading
another replica's write always wins over it.
"""

from __future__ import annotations

from typing import Callable

LOGICAL_BITS = 16


class HybridLogicalClock:
    """Issue and observe hybrid logical clock timestamps."""

    def __init__(self, seconds: Callable[[], float]) -> None:
        self._seconds = seconds
        self.last = 0

    def now(self) -> int:
        """A timestamp larger than every one issued or observed so far."""
        physical = int(self._seconds() * 1000) << LOGICAL_BITS
        self.last = max(self.last + 1, physical)
        return self.last

    def observe(self, timestamp: int) -> None:
        """Take note of a timestamp from another replica."""
        if timestamp > self.last:
            self.last = timestamp


def physical_seconds(timestamp: int) -> float:
    """The wall-clock part of ``timestamp`` in seconds since the epoch."""
    return (timestamp >> LOGICAL_BITS) / 1000.0
