"""A small Prometheus text-format registry and the ``/metrics`` resource.

Only what the daemons need: counters and gauges with labels, gauges whose
value is read from a callable at scrape time, and unlabelled histograms.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from twisted.web import resource
from twisted.web.iweb import IRequest

LabelValues = Tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Tuple[str, ...] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self.values: Dict[LabelValues, float] = {}

    def _key(self, labels: Dict[str, str]) -> LabelValues:
        return tuple(str(labels[n]) for n in self.labelnames)

    def samples(self) -> List[Tuple[LabelValues, float]]:
        return sorted(self.values.items())

    def render(self) -> List[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for key, value in self.samples():
            if key:
                labels = ",".join(
                    f'{n}="{_escape(v)}"' for n, v in zip(self.labelnames, key)
                )
                lines.append(f"{self.name}{{{labels}}} {value:g}")
            else:
                lines.append(f"{self.name} {value:g}")
        return lines


class Counter(_Metric):
    """A monotonically increasing count."""

    kind = "counter"

    def inc(self, amount: float = 1, **labels: str) -> None:
        """Add ``amount`` to the sample named by ``labels``."""
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0) + amount


class Gauge(_Metric):
    """A value that goes up and down, set directly or read from a callable."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Tuple[str, ...] = (),
        read: Optional[Callable[[], Any]] = None,
    ) -> None:
        super().__init__(name, help, labelnames)
        self.read = read

    def set(self, value: float, **labels: str) -> None:
        """Set the sample named by ``labels``."""
        self.values[self._key(labels)] = value

    def samples(self) -> List[Tuple[LabelValues, float]]:
        if self.read is None:
            return super().samples()
        value = self.read()
        if isinstance(value, dict):  # labelled: {label values: value}
            return sorted((k, float(v)) for k, v in value.items())
        return [((), float(value))]


class Histogram(_Metric):
    """Observations counted into fixed buckets (cumulative on output)."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        super().__init__(name, help)
        self.bounds = sorted(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def render(self) -> List[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        total = 0
        for bound, count in zip([*map(repr, self.bounds), "+Inf"], self.counts):
            total += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        lines.append(f"{self.name}_sum {self.sum:g}")
        lines.append(f"{self.name}_count {total}")
        return lines


_M = TypeVar("_M", bound=_Metric)


class Registry:
    """The metrics of one daemon."""

    def __init__(self) -> None:
        self._metrics: List[_Metric] = []

    def _add(self, metric: _M) -> _M:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics.append(metric)
        return metric

    def counter(self, name: str, help: str, labelnames: Tuple[str, ...] = ()) -> Counter:
        """Register and return a counter."""
        return self._add(Counter(name, help, labelnames))

    def gauge(
        self,
        name: str,
        help: str,
        labelnames: Tuple[str, ...] = (),
        read: Optional[Callable[[], Any]] = None,
    ) -> Gauge:
        """Register and return a gauge (``read`` makes it a callback gauge)."""
        return self._add(Gauge(name, help, labelnames, read))

    def histogram(self, name: str, help: str, buckets: Sequence[float]) -> Histogram:
        """Register and return a histogram with these bucket upper bounds."""
        return self._add(Histogram(name, help, buckets))

    def render(self) -> bytes:
        """All metrics in the Prometheus text exposition format."""
        lines: List[str] = []
        for metric in self._metrics:
            lines.extend(metric.render())
        return ("\n".join(lines) + "\n").encode("utf-8")


class MetricsResource(resource.Resource):
    """``GET /metrics``: the registry as Prometheus text."""

    isLeaf = True

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: IRequest) -> bytes:
        """Render the registry."""
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.registry.render()
