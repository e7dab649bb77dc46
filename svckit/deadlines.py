"""Many deadlines, one timer: a dictionary of due times swept by one ``LoopingCall``."""

from __future__ import annotations

from typing import Any, Dict

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime


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
