"""No silent stall: a replica that is not ready and makes no progress says why.

Every second :class:`StallWatch` compares what a replica is doing (phase,
applied offset, snapshot rows, broker connection) with a second ago.  When a
phase other than ``ready`` has shown no progress for :data:`STALL_AFTER`
seconds, ``/ready`` gains a ``stalled`` object (the phase, since when, what it
waits for, the offsets involved) and one warning is logged for the episode.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable, Optional, Tuple

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gradesvc.state.phase import ReplicaStatus
from gradesvc.state.snapshot import rfc3339

log = Logger()

STALL_AFTER = 10.0


class StallWatch:
    """Marks a replica's status as stalled once a non-ready phase stops progressing."""

    def __init__(self, status: ReplicaStatus, clock: IReactorTime, wall: Callable[[], float],
                 after: float = STALL_AFTER) -> None:
        self.status = status
        self.clock = clock
        self.wall = wall
        self.after = after
        self._mark: Optional[Tuple[object, ...]] = None
        self._since = clock.seconds()
        self._since_wall = wall()
        self._warned = False

    def check(self) -> None:
        """One look (every second)."""
        status = self.status
        mark = (status.phase, status.applied_offset, status.snapshot_rows, status.connected, status.waiting_for)
        if status.ready or mark != self._mark:
            self._mark = mark
            self._since, self._since_wall = self.clock.seconds(), self.wall()
            self._warned = False
            status.stalled = None
            return
        seconds = self.clock.seconds() - self._since
        if seconds < self.after:
            return
        status.stalled = {
            "phase": status.phase.value,
            "since": rfc3339(datetime.fromtimestamp(self._since_wall, timezone.utc)),
            "seconds": round(seconds, 1),
            "waiting_for": status.waiting_for,
            "applied_offset": status.applied_offset,
            "broker_connected": status.connected,
        }
        if not self._warned:
            self._warned = True
            log.warn(
                "No progress for {seconds:.0f}s in phase {phase}: waiting for {what}"
                " (applied offset {offset}, broker {broker})",
                seconds=seconds, phase=status.phase.value, what=status.waiting_for,
                offset=status.applied_offset, broker="connected" if status.connected else "not connected",
            )
