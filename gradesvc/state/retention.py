"""Watching retention against the checkpoint: warn before a restart would meet a gap.

A replica restarted from its checkpoint resumes the stream at the
checkpoint's offset + 1, so that offset must still be in the stream.  After
each checkpoint :class:`RetentionWatch` compares it with the stream's first
retained offset: the *margin* is how many offsets lie between the two.  When
the margin is smaller than :data:`WARN_INTERVALS` checkpoint intervals' worth
of writes, retention is about to outrun the checkpoints: a warning in the log
and ``gradesvc_retention_margin_intervals`` on ``/metrics`` say so.  (The
rule for operators: retention must cover several checkpoint intervals of
writes; docs/design.md gives it.)
"""

from __future__ import annotations

from typing import Optional

from twisted.logger import Logger

log = Logger()

WARN_INTERVALS = 3.0


class RetentionWatch:
    """The margin between what a restart needs and what the stream still holds."""

    def __init__(self) -> None:
        self.margin: Optional[int] = None
        """Offsets between the stream's start and the checkpoint's resume point (None: unknown)."""
        self.intervals: Optional[float] = None
        """The margin in checkpoint intervals of writes (None: unknown or no writes)."""
        self._previous: Optional[int] = None

    def update(self, checkpoint_offset: int, stream_first: Optional[int]) -> None:
        """After a checkpoint at ``checkpoint_offset``, with the stream starting at ``stream_first``."""
        previous, self._previous = self._previous, checkpoint_offset
        if stream_first is None or checkpoint_offset < 0:
            return
        self.margin = checkpoint_offset + 1 - stream_first
        per_interval = checkpoint_offset - previous if previous is not None else 0
        self.intervals = self.margin / per_interval if per_interval > 0 else None
        if self.margin < 0:
            log.critical(
                "Retention already dropped offsets this replica's checkpoint needs (it resumes at"
                " {needed}, the stream starts at {first}): a restart needs a peer. Lengthen retention.",
                needed=checkpoint_offset + 1, first=stream_first,
            )
        elif self.intervals is not None and self.intervals < WARN_INTERVALS:
            log.warn(
                "Retention is close to the checkpoint: the stream starts {margin} offsets before the"
                " checkpoint's resume point, {intervals:.1f} checkpoint intervals of writes."
                " Lengthen retention (several checkpoint intervals of writes) or checkpoint more often.",
                margin=self.margin, intervals=self.intervals,
            )
