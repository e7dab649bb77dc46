"""The last minutes of a few numbers, sampled once a second, for the status pages' charts.

A :class:`History` calls its ``sample`` function every :data:`INTERVAL`
seconds and keeps the last :data:`SIZE` results (ten minutes) in a ring
buffer: memory is bounded, and the only work done while nobody looks is that
one sample a second.  Counters are kept as they are and turned into rates
when read (:meth:`History.rates`), so a missed sample or a restarted
counter costs one point, not a wrong one.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple, Union

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

INTERVAL = 1.0
SIZE = 600
"""Samples kept: ten minutes at one a second."""

Values = Mapping[str, float]
Sampler = Callable[[], Union[Values, "defer.Deferred[Values]"]]


class History(service.Service):
    """A ring buffer of ``(clock seconds, values)`` filled once a second while the service runs."""

    def __init__(self, clock: IReactorTime, sample: Sampler, size: int = SIZE, interval: float = INTERVAL) -> None:
        self.clock = clock
        self.sample = sample
        self.interval = interval
        self.points: Deque[Tuple[float, Values]] = deque(maxlen=size)
        self._loop = task.LoopingCall(self._take)
        self._loop.clock = clock

    def startService(self) -> None:
        """Sample now and every :attr:`interval` seconds."""
        super().startService()
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        """Stop sampling (what was kept stays readable)."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _take(self) -> defer.Deferred[None]:
        at = self.clock.seconds()
        d = defer.maybeDeferred(self.sample)

        def keep(values: Values) -> None:
            self.points.append((at, dict(values)))

        def failed(reason: Failure) -> None:  # a sample missed is a point missing, never a stopped loop
            log.info("Status sample not taken: {error}", error=reason.getErrorMessage())

        return d.addCallbacks(keep, failed)

    def values(self, name: str) -> List[Optional[float]]:
        """``name`` at each point, oldest first (None where it was not sampled)."""
        return [values.get(name) for _, values in self.points]

    def rates(self, name: str) -> List[Optional[float]]:
        """Per-second increase of the counter ``name`` between neighbouring points (one fewer than points).

        None where either point lacks it or the counter went down (a restarted process).
        """
        out: List[Optional[float]] = []
        points = list(self.points)
        for (t0, before), (t1, after) in zip(points, points[1:]):
            a, b = before.get(name), after.get(name)
            out.append(None if a is None or b is None or b < a or t1 <= t0 else (b - a) / (t1 - t0))
        return out

    def window(self, seconds: float) -> Tuple[Mapping[str, float], Mapping[str, float], float]:
        """The sample at least ``seconds`` before the last (or the first), the last, and the time between them
        (``{}, {}, 0.0`` before two samples)."""
        points = self.points
        if len(points) < 2:
            return {}, {}, 0.0
        t1, last = points[-1]
        t0, first = next((p for p in reversed(points) if t1 - p[0] >= seconds), points[0])
        return first, last, t1 - t0

    def rate_over(self, name: str, seconds: float) -> Optional[float]:
        """The counter's mean per-second increase over about the last ``seconds`` (None: not known yet)."""
        first, last, elapsed = self.window(seconds)
        a, b = first.get(name), last.get(name)
        if a is None or b is None or b < a or elapsed <= 0:
            return None
        return (b - a) / elapsed

    def chart(self, series: Dict[str, Tuple[str, bool]]) -> Dict[str, Any]:
        """Chart data: ``{"interval", "series": {label: [values]}}``; ``series`` maps a label to
        (sampled name, whether it is a counter to show as a rate)."""
        return {
            "interval": self.interval,
            "series": {label: [None if v is None else round(v, 4) for v in
                               (self.rates(name) if counter else self.values(name))]
                       for label, (name, counter) in series.items()},
        }
