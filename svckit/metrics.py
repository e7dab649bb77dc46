"""Prometheus metrics through ``prometheus_client``, one registry per daemon.

Counters, gauges and histograms are ``prometheus_client``'s own, registered in
the :class:`~prometheus_client.CollectorRegistry` each daemon creates (never
the global one, so tests and two daemons in one process stay apart).
:class:`CallbackGauges` adds gauges read from the daemon's state at scrape
time, and :func:`render` is what ``/metrics`` answers.  Values are written
exactly (``prometheus_client`` prints every digit of a float), and the output
parses with ``prometheus_client.parser``.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Callable, Dict, Iterable, List, Mapping, Sequence, Tuple, Union

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from svckit.responses import BytesResponse

# ``*_created`` samples (a timestamp per counter) tell operators nothing the
# process start time does not; leave them out.
disable_created_metrics()

Reading = Union[float, Mapping[Tuple[str, ...], float]]
"""A callback gauge's value: a number, or ``{label values: number}``."""


def new_registry() -> CollectorRegistry:
    """A registry of one daemon's metrics."""
    return CollectorRegistry(auto_describe=True)


class _CallbackGauge(Collector):
    """One gauge whose value is read at scrape time."""

    def __init__(self, name: str, help: str, read: Callable[[], Reading], labelnames: Sequence[str]) -> None:
        self.name = name
        self.help = help
        self.read = read
        self.labelnames = list(labelnames)

    def describe(self) -> Iterable[Metric]:
        """The gauge without a value (for the registry's duplicate check)."""
        return [GaugeMetricFamily(self.name, self.help, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        """The gauge with its current value(s)."""
        family = GaugeMetricFamily(self.name, self.help, labels=self.labelnames)
        value = self.read()
        if isinstance(value, Mapping):
            for labels, number in sorted(value.items()):
                family.add_metric(list(labels), float(number))
        else:
            family.add_metric([], float(value))
        return [family]


class CallbackGauges:
    """Adds gauges whose values are read from callables at each scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def add(
        self,
        name: str,
        help: str,
        read: Callable[[], Reading],
        labelnames: Sequence[str] = (),
    ) -> None:
        """A gauge ``name`` whose value is ``read()`` at scrape time.

        ``ValueError`` when the registry already has that name.
        """
        self.registry.register(_CallbackGauge(name, help, read, labelnames))


def incrementer(child: Any) -> Callable[[float], None]:
    """A labelled counter's ``inc`` for a hot path: one call where ``Counter.inc`` makes four.

    ``Counter.inc`` checks on every call that it is a child (not a parent with
    labels) and that the amount is not negative; a hot path increments a child
    it looked up once, by 1, so the check is made here, once, and the value's
    own ``inc`` is returned.  (``_value`` is ``prometheus_client``'s own
    name; without it, ``child.inc``.)
    """
    child.inc(0)  # raises here, not per request, for a parent that has labels
    value = getattr(child, "_value", None)
    increment: Callable[[float], None] = getattr(value, "inc", None) or child.inc
    return increment


def observer(child: Any) -> Callable[[float], None]:
    """A labelled histogram's ``observe`` for a hot path: its bucket found by bisection, not a loop.

    The same sum and bucket counts as ``Histogram.observe`` (which checks the
    child and walks the bounds in Python on every call); ``_upper_bounds``,
    ``_buckets`` and ``_sum`` are ``prometheus_client``'s own names, and
    without them this is ``child.observe``.
    """
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(getattr(child, "_sum", None), "inc", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        plain: Callable[[float], None] = child.observe
        return plain
    getattr(child, "_raise_if_not_observable", lambda: None)()
    incs = [bucket.inc for bucket in buckets]
    ordered = list(bounds)

    def observe(amount: float) -> None:
        total(amount)
        if amount == amount:  # NaN is in no bucket (every comparison is false), as in Histogram.observe
            incs[bisect_left(ordered, amount)](1)

    return observe


def render(registry: CollectorRegistry) -> BytesResponse:
    """The ``/metrics`` answer: the registry in the Prometheus text format."""
    return BytesResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST.encode("ascii"))


def sample_value(registry: CollectorRegistry, name: str, labels: Dict[str, str] | None = None) -> float:
    """The current value of one sample (0 when absent): for tests and probes."""
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


Wanted = Mapping[str, Tuple[str, Mapping[str, str]]]
"""What to add up: a key → (sample name, labels a sample must have, others being free)."""


def sums(families: Iterable[Metric], wanted: Wanted) -> Dict[str, float]:
    """For each key of ``wanted``, the sum of the matching samples of ``families`` (a registry's
    ``collect()`` or a parsed ``/metrics`` text: every label not asked for is summed over, ``worker`` too);
    keys that matched nothing are left out."""
    by_name: Dict[str, List[Tuple[str, Any]]] = {}
    for key, (name, labels) in wanted.items():
        by_name.setdefault(name, []).append((key, labels.items()))
    out: Dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            for key, labels in by_name.get(sample.name, ()):
                if labels <= sample.labels.items():
                    out[key] = out.get(key, 0.0) + sample.value
    return out
