"""Supervision of long-running loops: a loop that fails is logged and restarted.

A loop started fire-and-forget dies silently: nothing logs its exception
(or only when its Deferred is garbage collected) and the daemon goes on
looking healthy.  :class:`Supervisor` runs a loop as a service; when the loop
fails it logs the failure once, tells the daemon (``on_failure``: readiness
drops), and starts it again after an exponential back-off; ``on_running``
reports that it runs again.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


def _nothing(*args: Any) -> None:
    pass


def backoff(failures: int, initial: float = 0.5, maximum: float = 30.0) -> float:
    """Seconds to wait after ``failures`` failures in a row: ``initial``, doubling, at most ``maximum``."""
    return float(min(maximum, initial * 2.0 ** max(0, failures - 1)))


class Supervisor(service.Service):
    """Runs ``run()`` (a Deferred that fires when the loop ends) and restarts it."""

    def __init__(
        self,
        name: str,
        run: Callable[[], defer.Deferred[Any]],
        clock: IReactorTime,
        *,
        stop: Callable[[], None] = _nothing,
        on_failure: Callable[[str], None] = _nothing,
        on_running: Callable[[str], None] = _nothing,
        initial_delay: float = 0.5,
        max_delay: float = 30.0,
    ) -> None:
        self.what = name
        self.name = name
        self._run = run
        self._stop = stop
        self.clock = clock
        self.on_failure = on_failure
        self.on_running = on_running
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.failures = 0
        self._restarting = False
        self._current: Optional[defer.Deferred[Any]] = None
        self._restart: Optional[IDelayedCall] = None

    @classmethod
    def looping(cls, name: str, loop: task.LoopingCall, interval: float, clock: IReactorTime,
                now: bool = False, **kw: Any) -> Supervisor:
        """A supervisor of a ``LoopingCall`` run every ``interval`` seconds."""
        loop.clock = clock

        def stop() -> None:
            if loop.running:
                loop.stop()

        return cls(name, lambda: loop.start(interval, now=now), clock, stop=stop, **kw)

    def startService(self) -> None:
        """Start the loop."""
        super().startService()
        self._start()

    def stopService(self) -> None:
        """Stop the loop; no restart."""
        super().stopService()
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        self._stop()
        if self._current is not None:
            self._current.cancel()

    def _start(self) -> None:
        self._restart = None
        try:
            d = self._run()
        except Exception:
            d = defer.fail()
        self._current = d
        self.on_running(self.what)
        d.addCallbacks(self._ended, self._failed)

    def restart(self) -> None:
        """Stop the loop and start it again at once (after a configuration change)."""
        if self._current is None:
            return
        self._restarting = True
        self._stop()

    def _ended(self, _: Any) -> None:
        self._current = None
        if self._restarting and self.running:
            self._restarting = False
            self._start()
        elif self.running:
            log.warn("{name} stopped by itself; restarting it", name=self.what)
            self._schedule()

    def _failed(self, failure: Failure) -> None:
        self._current = None
        if not self.running:
            return
        self.failures += 1
        delay = self.delay()
        log.failure("{name} failed; restarting it in {delay:.1f}s", failure, name=self.what, delay=delay)
        self.on_failure(self.what)
        self._schedule(delay)

    def delay(self) -> float:
        """Seconds before the next restart: doubling from ``initial_delay``."""
        return backoff(self.failures, self.initial_delay, self.max_delay)

    def _schedule(self, delay: float = 0.0) -> None:
        self._restart = self.clock.callLater(delay, self._start)
