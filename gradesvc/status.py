"""Where a replica is in its life: phase, broker connection, bootstrap progress.

``/ready``, ``/get`` and ``/set`` all ask this one object, so what an operator
sees and what clients get always agree.
"""

from __future__ import annotations

from typing import Dict, Optional

import attrs

STARTING = "starting"
LOADING_SNAPSHOT = "loading_snapshot"
CATCHING_UP = "catching_up"
READY = "ready"
RETENTION_GAP = "retention_gap"


@attrs.define
class ReplicaStatus:
    """Mutable state of one replica, read by the web resources."""

    phase: str = STARTING
    connected: bool = False
    ever_ready: bool = False
    snapshot_peer: Optional[str] = None
    snapshot_rows: int = 0
    snapshot_offset: int = -1
    applied_offset: int = -1
    lag_seconds: float = 0.0
    bootstrap_seconds: Optional[float] = None
    gap: Optional[Dict[str, int]] = None
    """``lag_seconds``: how old the newest applied write was when it was applied."""

    @property
    def ready(self) -> bool:
        """Caught up and connected: safe to serve and to be a bootstrap peer."""
        return self.phase == READY and self.connected

    @property
    def serving_reads(self) -> bool:
        """Whether ``/get`` answers: once caught up, reads survive broker outages."""
        return self.ever_ready and self.phase != RETENTION_GAP

    def reached_ready(self) -> None:
        """Caught up with the stream for the first time."""
        self.phase = READY
        self.ever_ready = True

    def report(self) -> Dict[str, object]:
        """The JSON body of ``/ready``."""
        body: Dict[str, object] = {
            "ready": self.ready,
            "phase": self.phase,
            "broker_connected": self.connected,
            "applied_offset": self.applied_offset,
            "lag_seconds": round(self.lag_seconds, 3),
            "snapshot": {
                "peer": self.snapshot_peer,
                "rows_loaded": self.snapshot_rows,
                "offset": self.snapshot_offset,
            },
        }
        if self.gap is not None:
            body["retention_gap"] = self.gap
        if self.bootstrap_seconds is not None:
            body["bootstrap_seconds"] = round(self.bootstrap_seconds, 3)
        return body
