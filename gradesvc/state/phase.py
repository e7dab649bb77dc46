"""Where a replica is in its life: its phase, broker connection, bootstrap progress.

:class:`ReplicaStatus` is the one owner of the replica's :class:`Phase`: the
start-up, the stream consumer and the broker connection change it only
through its methods, and ``/ready``, ``/get``, ``/set`` and ``/backup`` all
ask it, so what an operator sees and what clients get always agree.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Dict, Optional

import attrs

from svckit.responses import HTTPError, unavailable


class Phase(str, enum.Enum):
    """The phases of a replica, in the order a healthy one passes them."""

    STARTING = "starting"
    LOADING_SNAPSHOT = "loading_snapshot"
    CATCHING_UP = "catching_up"
    READY = "ready"
    RETENTION_GAP = "retention_gap"


@attrs.define
class ReplicaStatus:
    """Mutable state of one replica, read by the web handlers and the metrics."""

    phase: Phase = Phase.STARTING
    replica_id: Optional[str] = None
    """Which replica this is (``--replica-id``): named on ``/ready``, so a peer's page can name it."""
    connected: bool = False
    broker_node: Optional[str] = None
    stream_protocol: Optional[str] = None
    """Which protocol carries the stream: ``stream``, ``amqp``, or ``auto`` until the broker answered."""
    consumer_failures: int = 0
    snapshot_peer: Optional[str] = None
    snapshot_rows: int = 0
    snapshot_offset: int = -1
    applied_offset: int = -1
    lag_seconds: float = 0.0
    """How old the newest applied write was when it was applied."""
    bootstrap_seconds: Optional[float] = None
    gap: Optional[Dict[str, int]] = None
    stream: Optional[Dict[str, str]] = None
    """The stream this replica serves: ``{"vhost": ..., "name": ...}``."""
    refused: Optional[Dict[str, object]] = None
    """The last state refused as another stream's (or another life's), and why."""
    broker_error: Optional[str] = None
    """Why the last attempt to connect to the broker failed (a TLS failure, a refusal); None once connected."""
    waiting_for: str = "the broker connection"
    """What the current phase waits for, in words (shown once a phase stalls)."""
    stalled: Optional[Dict[str, object]] = None
    """Set while a non-ready phase has made no progress for a while: what, since when."""

    @property
    def ready(self) -> bool:
        """Caught up and connected: safe to serve and to be a bootstrap peer."""
        return self.phase is Phase.READY and self.connected

    @property
    def serving_reads(self) -> bool:
        """Whether ``/get`` answers: only when caught up (never stale data)."""
        return self.ready

    def loading_snapshot(self) -> None:
        """Start-up: loading a peer's snapshot."""
        self.phase = Phase.LOADING_SNAPSHOT

    def catching_up(self) -> None:
        """Subscribed; replaying the stream up to its tail."""
        if self.phase is not Phase.RETENTION_GAP:
            self.phase = Phase.CATCHING_UP

    def reached_ready(self, seconds: Optional[float] = None) -> None:
        """Caught up with the stream."""
        self.phase = Phase.READY
        if seconds is not None and self.bootstrap_seconds is None:
            self.bootstrap_seconds = seconds

    def retention_gap(self, wanted: int, first: int) -> None:
        """The stream lost offsets this replica needed: never ready again."""
        self.gap = {"wanted_offset": wanted, "first_available_offset": first}
        self.phase = Phase.RETENTION_GAP

    def state_refused(self, source: str, state: str, problem: str, moved_to: Optional[Path] = None) -> None:
        """A checkpoint, a peer's snapshot or the state in memory is not of this stream's life."""
        self.refused = {"source": source, "state": state, "problem": problem}
        if moved_to is not None:
            self.refused["moved_to"] = str(moved_to)

    def broker_lost(self) -> None:
        """The broker connection is gone: not caught up any more until resubscribed."""
        self.connected = False
        if self.phase is Phase.READY:
            self.phase = Phase.CATCHING_UP

    def consumer_failed(self) -> None:
        """The stream consumer broke; it is restarted and must catch up again."""
        self.consumer_failures += 1
        self.catching_up()

    def not_ready(self) -> HTTPError:
        """503 for a replica that cannot answer now, with ``Retry-After``."""
        broker = "up" if self.connected else "down"
        return unavailable(f"replica not ready (phase {self.phase.value}, broker {broker})")

    def report(self) -> Dict[str, object]:
        """The JSON body of ``/ready``."""
        body: Dict[str, object] = {
            "ready": self.ready,
            "replica_id": self.replica_id,
            "phase": self.phase.value,
            "broker_connected": self.connected,
            "broker_node": self.broker_node,
            "broker_error": self.broker_error,
            "stream_protocol": self.stream_protocol,
            "applied_offset": self.applied_offset,
            "lag": round(self.lag_seconds, 3),
            "lag_seconds": round(self.lag_seconds, 3),
            "consumer_failures": self.consumer_failures,
            "snapshot": {
                "peer": self.snapshot_peer,
                "rows_loaded": self.snapshot_rows,
                "offset": self.snapshot_offset,
            },
        }
        if self.gap is not None:
            body["retention_gap"] = self.gap
        if self.stream is not None:
            body["stream"] = self.stream
        if self.refused is not None:
            body["state_refused"] = self.refused
        if self.stalled is not None:
            body["stalled"] = self.stalled
        if self.bootstrap_seconds is not None:
            body["bootstrap_seconds"] = round(self.bootstrap_seconds, 3)
        return body
