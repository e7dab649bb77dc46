"""Applying deliveries to the store, one at a time, in stream order.

:class:`StreamApplier` is what the consumer hands every delivery to: a write
is merged into the store at its offset (the later offset wins, per field), a
sync marker is recognised as this replica's own or ignored, and anything
older than what is already applied is skipped (applying a message twice, or
an old one late, changes nothing).  It also remembers where the state in
memory stands in the stream (:meth:`StreamApplier.anchor`), which the
identity check and the checkpoints need.

The applied offset moves only once a delivery has been handled, so one that
fails is delivered again after the consumer restarts.
"""

from __future__ import annotations

import json
from typing import Callable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from twisted.logger import Logger

from gradesvc.state.identity import Anchor, body_sha256
from gradesvc.state.phase import ReplicaStatus
from gradesvc.state.store import GradeStore
from gradesvc.stream.messages import BATCH_TYPE, MARKER_TYPE, decode_batch, decode_write
from gradesvc.stream.progress import StreamProgress

log = Logger()

SKIP_REASONS = ("duplicate", "malformed", "marker")
LAG_BUCKETS = (0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
               0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class StreamApplier:
    """Applies deliveries to the store and knows where the store stands in the stream."""

    def __init__(
        self,
        store: GradeStore,
        replica_id: str,
        status: ReplicaStatus,
        progress: StreamProgress,
        registry: CollectorRegistry,
        wall: Callable[[], float],
    ) -> None:
        self.store = store
        self.replica_id = replica_id
        self.status = status
        self.progress = progress
        self.wall = wall
        self.marker: Optional[str] = None
        """The nonce of this replica's sync marker still on its way (None: none)."""
        self.marker_back: Callable[[], None] = lambda: None
        """Called when this replica's own sync marker was applied."""
        self._loaded: Optional[Anchor] = None
        self._last_offset = -1
        self._last_body: Optional[bytes] = None
        self._applied_in_batch = 0  # the counter is brought up to date once a batch
        self._applied = Counter(
            "gradesvc_stream_messages_applied", "Stream messages applied to the store.",
            registry=registry,
        )
        skipped = Counter(
            "gradesvc_stream_messages_skipped", "Stream messages skipped, by reason.",
            ["reason"], registry=registry,
        )
        self._skipped = {reason: skipped.labels(reason) for reason in SKIP_REASONS}
        self._lag = Histogram(
            "gradesvc_replication_delay_seconds",
            "Time from another replica's write (its clock) to applying it here, once ready.",
            buckets=LAG_BUCKETS, registry=registry,
        )

    def loaded(self, anchor: Optional[Anchor]) -> None:
        """A checkpoint or snapshot with this anchor was loaded into the store."""
        if anchor is not None and anchor.offset > self.status.applied_offset:
            self.status.applied_offset = anchor.offset
            self._loaded = anchor

    def anchor(self) -> Optional[Anchor]:
        """Where the state in memory stands in the stream (None: nothing applied yet)."""
        applied = self.status.applied_offset
        if applied < 0:
            return None
        if self._last_offset == applied and self._last_body is not None:
            return Anchor(applied, body_sha256(self._last_body))
        if self._loaded is not None and self._loaded.offset == applied:
            return self._loaded
        return Anchor(applied)

    def forget(self) -> None:
        """The state was refused: the store is emptied and nothing counts as applied."""
        self.store.clear()
        self.status.applied_offset = -1
        self._loaded, self._last_body, self._last_offset = None, None, -1

    def handle(self, offset: int, kind: Optional[str], body: bytes) -> None:
        """Apply one delivery at ``offset`` (idempotent; older offsets are ignored).

        ``kind`` is the message's kind; a message without one is a write (as
        the earliest releases published them).
        """
        status = self.status
        if offset <= status.applied_offset:
            self._skipped["duplicate"].inc()
            return
        if kind == MARKER_TYPE:
            status.applied_offset = offset
            self._last_offset, self._last_body = offset, body
            self._on_marker(body)
            return
        self._apply(offset, body, kind == BATCH_TYPE)
        status.applied_offset = offset
        self._last_offset, self._last_body = offset, body

    def batch_done(self) -> None:
        """A batch of deliveries is applied: wake those waiting for its offsets, count it."""
        self.progress.advanced()
        self._applied.inc(self._applied_in_batch)
        self._applied_in_batch = 0

    def _apply(self, offset: int, body: bytes, batch: bool) -> None:
        try:
            if batch:  # one offset: each user once, its patches merged in array order
                replica, write_id, written_at, rows, count = decode_batch(body)
            else:
                replica, write_id, written_at, user_id, patch = decode_write(body)
        except (ValueError, TypeError) as e:
            log.warn("Malformed stream message at offset {offset}: {error}", offset=offset, error=e)
            self._skipped["malformed"].inc()
            return
        lag = self.wall() - written_at / 1000.0
        self.status.lag_seconds = lag if lag > 0.0 else 0.0
        if batch:
            apply_row = self.store.apply_row
            for user_id, values in rows.items():
                apply_row(user_id, values, offset)
            self._applied_in_batch += count
        else:
            self.store.apply_patch(user_id, patch, offset)
            self._applied_in_batch += 1
        if replica == self.replica_id:
            self.progress.write_applied(f"{replica}:{write_id}", offset)
        elif self.status.ready:
            self._lag.observe(self.status.lag_seconds)

    def _on_marker(self, body: bytes) -> None:
        try:
            marker = json.loads(body).get("marker")
        except ValueError:
            return
        if marker is None or marker != self.marker:
            self._skipped["marker"].inc()
            return
        self.marker = None
        self.marker_back()
