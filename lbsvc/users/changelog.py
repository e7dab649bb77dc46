"""Where a gateway is in the user change log, holes included.

Every write appends the changed user's name to ``user_changes``, whose
sequence numbers come from the database.  A transaction still committing
leaves a hole that fills in a moment later; a rolled-back one leaves a hole
forever.  :class:`ChangeCursor` keeps the position up to which every change
is applied, the changes seen beyond a hole, and how long the oldest hole has
been waited for: after :data:`GAP_PATIENCE` seconds it is taken to be a
rollback and skipped.
"""

from __future__ import annotations

from typing import Iterable, Optional, Set

from twisted.internet.interfaces import IReactorTime

GAP_PATIENCE = 10.0
"""Seconds a hole in the change log's sequence is waited for (a transaction
still committing) before it is taken to be a rolled-back one."""


class ChangeCursor:
    """The change log's position applied here, and what was seen past a hole."""

    def __init__(self, clock: IReactorTime, position: int = 0) -> None:
        self.clock = clock
        self.position = position
        """Every change up to this sequence number is applied."""
        self.ahead: Set[int] = set()
        """Changes applied beyond a hole (not to be applied twice)."""
        self._gap_since: Optional[float] = None

    def seen(self, sequence_numbers: Iterable[int]) -> None:
        """These changes are applied now: move on as far as there is no hole."""
        self.ahead.update(sequence_numbers)
        self._advance()

    def _advance(self) -> None:
        while self.position + 1 in self.ahead:
            self.position += 1
            self.ahead.discard(self.position)
        self.wait_for_holes()

    def wait_for_holes(self) -> None:
        """A hole waits :data:`GAP_PATIENCE` seconds, then counts as a rollback and is skipped."""
        if not self.ahead:
            self._gap_since = None
            return
        now = self.clock.seconds()
        if self._gap_since is None:
            self._gap_since = now
        elif now - self._gap_since >= GAP_PATIENCE:
            self.position = min(self.ahead) - 1
            self._gap_since = None
            self._advance()
