"""Deadlines: many swept by one timer (:class:`Deadlines`), or one call given up on (:func:`within`)."""

from __future__ import annotations

from typing import Any, Dict, List, TypeVar

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")


class Deadlines:
    """The deadlines of the exchanges in flight, checked by one timer.

    A ``callLater`` and its ``cancel`` for every request (and a ``reset`` for
    every piece of a body) cost a measurable share of a proxied request; here
    setting a deadline is a dictionary store, and one ``LoopingCall`` looks
    every :attr:`resolution` seconds (while anything is in flight) for those
    that passed.  Timeouts are thus late by up to ``resolution`` seconds.
    """

    def __init__(self, clock: IReactorTime, resolution: float = 0.1) -> None:
        self.clock = clock
        self.resolution = resolution
        self._due: Dict[Any, float] = {}
        self._loop = task.LoopingCall(self._sweep)
        self._loop.clock = clock

    def set(self, watched: Any, seconds: float) -> None:
        """``watched.expired()`` is called once ``seconds`` pass without another ``set``."""
        self._due[watched] = self.clock.seconds() + seconds
        if not self._loop.running:
            self._loop.start(self.resolution, now=False)

    def clear(self, watched: Any) -> None:
        """No deadline for ``watched`` any more."""
        self._due.pop(watched, None)

    def _sweep(self) -> None:
        now = self.clock.seconds()
        due = self._due
        for watched in [w for w, at in due.items() if at <= now]:
            del due[watched]
            watched.expired()
        if not due and self._loop.running:
            self._loop.stop()


def within(call: defer.Deferred[T], seconds: float, clock: IReactorTime, what: str,
           after_a_turn: bool = False) -> defer.Deferred[T]:
    """``call``'s result, or ``defer.TimeoutError`` once it has had ``seconds``; ``call`` itself goes on.

    The call is not cancelled (a database thread or a Redis command cannot
    be taken back); whoever holds ``call`` may still look at its late result.

    With ``after_a_turn`` the deadline measures the other side, not this
    reactor's backlog: the clock starts after the reactor's next look at the
    sockets (when a command has been written, not when it was queued), and
    when it runs out the answer is looked for once more before the call is
    given up (a busy reactor runs its timers before it reads an answer that
    did arrive).
    """
    out: defer.Deferred[T] = defer.Deferred()
    timers: List[IDelayedCall] = []

    def result(value: Any) -> None:
        for pending in timers:
            if pending.active():
                pending.cancel()
        if out.called:
            return
        if isinstance(value, Failure):
            out.errback(value)
        else:
            out.callback(value)

    def too_slow() -> None:
        if not out.called:
            out.errback(defer.TimeoutError(f"{what} did not answer within {seconds}s"))

    if after_a_turn:
        def start() -> None:
            timers.append(clock.callLater(seconds, lambda: timers.append(clock.callLater(0, too_slow))))

        timers.append(clock.callLater(0, start))
    else:
        timers.append(clock.callLater(seconds, too_slow))
    call.addBoth(result)
    return out
