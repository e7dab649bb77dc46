"""svckit.metrics: exact values, parseable output, one registry per daemon, hot-path increments that count
as prometheus_client's own do."""

from __future__ import annotations

from typing import List

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lbsvc.workermetrics import merge
from svckit.metrics import CallbackGauges, incrementer, new_registry, observer, render


def samples(registry: object) -> dict:
    text = render(registry).body.decode()  # type: ignore[arg-type]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_large_values_are_exact_and_the_output_parses() -> None:
    registry = new_registry()
    count = Counter("things", "Things.", registry=registry)
    count.inc(1_234_567)
    gauges = CallbackGauges(registry)
    gauges.add("offset", "An offset.", lambda: 9_007_199_254_740_991)
    gauges.add("up", "Per backend.", lambda: {("a",): 1, ("b",): 0}, ["backend"])
    values = samples(registry)
    assert values[("things_total", ())] == 1_234_567
    assert values[("offset", ())] == 9_007_199_254_740_991
    assert values[("up", (("backend", "a"),))] == 1
    assert values[("up", (("backend", "b"),))] == 0
    assert not any(name.endswith("_created") for name, _ in values)


def test_registries_are_separate_and_names_register_once() -> None:
    one, two = new_registry(), new_registry()
    Counter("x", "X.", registry=one).inc()
    Counter("x", "X.", registry=two)
    assert samples(one)[("x_total", ())] == 1 and samples(two)[("x_total", ())] == 0
    gauges = CallbackGauges(one)
    with pytest.raises(ValueError):
        gauges.add("y", "Y.", lambda: 1)
        gauges.add("y", "Y again.", lambda: 2)
    with pytest.raises(ValueError):
        CallbackGauges(one).add("x_total", "clash", lambda: 1)


def test_worker_metrics_merge_into_one_exposition_labelled_by_worker() -> None:
    texts = []
    for worker in range(2):
        registry = new_registry()
        counter = Counter("lbsvc_things", "Things.", ["kind"], registry=registry)
        counter.labels("a").inc(worker + 1)
        Histogram("lbsvc_seconds", "Seconds.", registry=registry, buckets=(0.1, 1.0)).observe(0.5)
        texts.append(generate_latest(registry).decode())
    merged = merge({"0": texts[0], "1": texts[1], "2": None}).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    things = {s.labels["worker"]: s.value for s in families["lbsvc_things"].samples}
    assert things == {"0": 1.0, "1": 2.0} and families["lbsvc_things"].type == "counter"
    counts = [s for s in families["lbsvc_seconds"].samples if s.name == "lbsvc_seconds_count"]
    assert sorted(s.labels["worker"] for s in counts) == ["0", "1"]
    assert {s.labels["worker"]: s.value for s in families["lbsvc_worker_up"].samples} == {"0": 1, "1": 1, "2": 0}
    assert merged.count("# TYPE lbsvc_things_total counter") == 1  # one family, samples of both processes


@given(amounts=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                  st.sampled_from([0.0, 0.005, 0.01, 0.1, 1.0, 10.0, -1.0])), max_size=30))
def test_the_hot_path_observer_and_incrementer_count_as_prometheus_client_does(amounts: List[float]) -> None:
    """Bucket bounds included (an amount equal to a bound is in that bucket), NaN in none, +Inf in the last."""
    samples = []
    for hot in (False, True):
        registry = new_registry()
        latency = Histogram("t_latency_seconds", "t", ["backend"], registry=registry,
                            buckets=(0.005, 0.01, 0.1, 1.0, 10.0))
        answers = Counter("t_answers", "t", ["backend"], registry=registry)
        child, counted = latency.labels("a"), answers.labels("a")
        observe = observer(child) if hot else child.observe
        increment = incrementer(counted) if hot else counted.inc
        for amount in amounts:
            observe(amount)
            increment(1)
        samples.append(generate_latest(registry))
    assert samples[0] == samples[1]


def test_a_parent_with_labels_is_refused_once_not_per_call() -> None:
    registry = new_registry()
    with pytest.raises(ValueError):
        incrementer(Counter("t_parent", "t", ["backend"], registry=registry))
