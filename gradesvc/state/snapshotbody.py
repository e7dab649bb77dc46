"""A peer's ``/backup`` body as it arrives: fed on, paused while its head is checked, given up when it stalls.

:class:`~gradesvc.state.bootstrap.Bootstrap` delivers each peer's response body to a
:class:`SnapshotBody`, whose ``feed`` merges the rows into the store and may
ask for a pause (a check of the snapshot's head against the stream) by
returning a Deferred.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone


class PeerStalled(Exception):
    """A peer sent nothing of its snapshot for too long."""


class ForeignSnapshot(Exception):
    """A peer's snapshot is not of this replica's stream, or not of its current life."""


Feed = Callable[[bytes], Union[None, "defer.Deferred[None]"]]


class SnapshotBody(Protocol):
    """Feeds a response body to ``feed``; gives up when it stalls or ``feed`` fails.

    Giving up closes the connection (``stopProducing``), so a peer that stops
    sending without closing cannot hold a bootstrapping replica forever.  When
    ``feed`` returns a Deferred (a check of what was read so far), the body is
    paused, and the idle timer with it, until that fires; a failed check gives up.
    """

    def __init__(
        self,
        feed: Feed,
        done: defer.Deferred[None],
        clock: IReactorTime,
        idle_timeout: float,
    ) -> None:
        self.feed = feed
        self.done = done
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.error: Optional[BaseException] = None
        self._timer: Optional[IDelayedCall] = None
        self._checking: Optional[defer.Deferred[None]] = None
        self._lost: Optional[Failure] = None

    def connectionMade(self) -> None:
        self._timer = self.clock.callLater(self.idle_timeout, self._stalled)

    def dataReceived(self, data: bytes) -> None:
        if self.error is not None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle_timeout)
        try:
            check = self.feed(data)
        except Exception as e:
            self._give_up(e)
            return
        if check is not None:
            self._pause_for(check)

    def _pause_for(self, check: defer.Deferred[None]) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._checking = check
        self.transport.pauseProducing()  # type: ignore[union-attr]

        def passed(_: object) -> None:
            self._checking = None
            if self._lost is not None:
                self._ended(self._lost)
            elif self.error is None:
                self._timer = self.clock.callLater(self.idle_timeout, self._stalled)
                self.transport.resumeProducing()  # type: ignore[union-attr]

        def failed(failure: Failure) -> None:
            self._checking = None
            error: BaseException = self.error or failure.value or ForeignSnapshot("refused")
            self.error = error
            if self._lost is not None:
                self._ended(self._lost)
            else:
                self._give_up(error)

        check.addCallbacks(passed, failed)

    def _stalled(self) -> None:
        self._give_up(PeerStalled(f"no snapshot data for {self.idle_timeout:g}s"))

    def _give_up(self, error: BaseException) -> None:
        self.error = error
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._checking is not None:
            self._lost = reason  # the whole body came before its head was checked
            return
        self._ended(reason)

    def _ended(self, reason: Failure) -> None:
        if self.error is not None:
            self.done.errback(self.error)
        elif reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)
