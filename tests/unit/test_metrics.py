"""The Prometheus text of svckit.metrics."""

from __future__ import annotations

import pytest

from svckit.metrics import Registry


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    registry = Registry()
    h = registry.histogram("lag_seconds", "Lag.", (0.01, 0.001))
    for value in (0.0005, 0.001, 0.002, 5.0):
        h.observe(value)
    assert registry.render().decode().splitlines() == [
        "# HELP lag_seconds Lag.",
        "# TYPE lag_seconds histogram",
        'lag_seconds_bucket{le="0.001"} 2',
        'lag_seconds_bucket{le="0.01"} 3',
        'lag_seconds_bucket{le="+Inf"} 4',
        "lag_seconds_sum 5.0035",
        "lag_seconds_count 4",
    ]


def test_a_name_registers_once() -> None:
    registry = Registry()
    registry.gauge("x", "X.")
    with pytest.raises(ValueError):
        registry.histogram("x", "X again.", (1.0,))
