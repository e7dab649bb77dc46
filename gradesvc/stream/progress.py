"""Waiting for the stream: until this replica has applied an offset, or its own write.

``POST /set`` answers once the replica has consumed and applied its own
message (:meth:`StreamProgress.own_write`), so the write is in the stream
before any later one is published, and the client reads it back at once.
``GET /get?min_offset=N`` answers once offset N is applied here
(:meth:`StreamProgress.reached`).  Both wait without blocking anything: the
consumer reports each applied write and each batch's last offset, which fires
the Deferreds of those waiting.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from gradesvc.state.phase import ReplicaStatus
from gradesvc.stream.link import StreamDeleted


class StreamProgress:
    """Who waits for which offset or write, and telling them when it is applied."""

    def __init__(self, status: ReplicaStatus, clock: IReactorTime) -> None:
        self.status = status
        self.clock = clock
        self._offsets: List[Tuple[int, defer.Deferred[None]]] = []
        self._writes: Dict[str, defer.Deferred[int]] = {}

    def expect_write(self, message_id: str) -> defer.Deferred[int]:
        """A Deferred that fires with the offset of ``message_id`` once applied here.

        Register before publishing: the message can come back before the
        broker's confirm does.
        """
        def forget(_: object) -> None:
            self._writes.pop(message_id, None)

        d: defer.Deferred[int] = defer.Deferred(forget)
        self._writes[message_id] = d
        return d

    async def own_write(self, waiting: defer.Deferred[int], timeout: float) -> int:
        """The offset of a write registered with :meth:`expect_write`; ``TimeoutError`` after ``timeout``."""
        waiting.addTimeout(timeout, self.clock)
        return await waiting

    def forget_write(self, waiting: defer.Deferred[int]) -> None:
        """Stop waiting for a write that was never published."""
        waiting.cancel()
        waiting.addErrback(lambda f: f.trap(defer.CancelledError))

    def stream_deleted(self) -> None:
        """The stream was deleted and declared again: no write waited for will ever be applied."""
        writes, self._writes = self._writes, {}
        for waiting in writes.values():
            if not waiting.called:
                waiting.errback(StreamDeleted("the stream was deleted before the write was applied"))

    def write_applied(self, message_id: str, offset: int) -> None:
        """The consumer applied this replica's write ``message_id`` at ``offset``."""
        waiting = self._writes.pop(message_id, None)
        if waiting is not None and not waiting.called:
            waiting.callback(offset)

    async def reached(self, offset: int, timeout: float) -> bool:
        """Whether offset ``offset`` is applied here within ``timeout`` seconds."""
        if self.status.applied_offset >= offset:
            return True
        entry: Tuple[int, defer.Deferred[None]]
        d: defer.Deferred[None] = defer.Deferred(lambda _: self._offsets.remove(entry))
        entry = (offset, d)
        self._offsets.append(entry)
        d.addTimeout(timeout, self.clock)
        try:
            await d
        except defer.TimeoutError:
            return False
        return True

    def advanced(self) -> None:
        """The consumer applied up to ``status.applied_offset``: wake those waiting for it."""
        if not self._offsets:
            return
        applied = self.status.applied_offset
        due = [entry for entry in self._offsets if entry[0] <= applied]
        if due:
            self._offsets = [entry for entry in self._offsets if entry[0] > applied]
            for _, d in due:
                d.callback(None)

    @property
    def waiting(self) -> int:
        """Requests waiting for an offset or a write."""
        return len(self._offsets) + len(self._writes)
