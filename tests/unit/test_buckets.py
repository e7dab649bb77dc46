"""Token bucket arithmetic with a simulated clock."""

from __future__ import annotations

import time

from twisted.internet.task import Clock

from lbsvc.limits.buckets import Buckets


def make(tick: float = 0.05) -> tuple:
    clock = Clock()
    buckets = Buckets(clock, tick)
    buckets.start()
    return clock, buckets


def admitted(buckets: Buckets, n: int, capacity: int = 5, rate: float = 1.0) -> int:
    return sum(buckets.take("u", capacity, rate) is not None for _ in range(n))


def test_burst_then_rate() -> None:
    clock, buckets = make()
    assert admitted(buckets, 20) == 5
    clock.pump([0.05] * 20)  # one second
    assert admitted(buckets, 20) == 1
    clock.pump([0.05] * 200)  # ten seconds: full again, never above capacity
    assert buckets.peek("u", 5, 1.0).level == 5.0
    assert admitted(buckets, 20) == 5


def test_never_more_than_capacity_plus_rate_times_t() -> None:
    """Hammer every 10 ms for 30 s: admitted <= C + R*t in every prefix window."""
    clock, buckets = make()
    capacity, rate = 3, 2.5
    total = 0
    for step in range(3000):
        total += admitted(buckets, 10, capacity, rate)
        elapsed = step * 0.01
        assert total <= capacity + rate * elapsed + 1e-9
        clock.advance(0.01)
    assert total >= capacity + rate * 29.9 - 1  # and the rate is really delivered


def test_fractional_rate() -> None:
    clock, buckets = make()
    assert admitted(buckets, 10, 1, 0.5) == 1
    clock.pump([0.05] * 19)  # 0.95 s: half a token... not even
    assert admitted(buckets, 1, 1, 0.5) == 0
    clock.pump([0.05] * 21)  # 2 s in all
    assert admitted(buckets, 1, 1, 0.5) == 1


def test_change_caps_level_and_applies_at_once() -> None:
    clock, buckets = make()
    buckets.bucket("u", 10, 1.0)
    assert buckets.change("u", 3, 1.0).level == 3.0
    assert admitted(buckets, 10, 3, 1.0) == 3
    buckets.change("u", 3, 10.0)
    clock.pump([0.05] * 2)  # 0.1 s at 10/s
    assert admitted(buckets, 10, 3, 10.0) == 1


def test_retry_after_and_reset() -> None:
    clock, buckets = make()
    admitted(buckets, 5, 5, 0.5)
    bucket = buckets.peek("u", 5, 0.5)
    assert bucket.retry_after() == 2
    assert bucket.reset_after() == 10


def test_full_buckets_cost_nothing_per_tick() -> None:
    clock, buckets = make()
    for i in range(10_000):
        buckets.bucket(f"idle{i}", 5, 1.0)
    buckets.take("busy", 5, 1.0)
    assert buckets.refilling == 1
    clock.pump([0.05] * 100)
    assert buckets.refilling == 0  # full again: out of the refill set


def test_tick_cost_scales_with_non_full_buckets_only() -> None:
    clock, buckets = make()
    for i in range(100_000):
        buckets.bucket(f"idle{i}", 5, 1.0)
    for i in range(100):
        buckets.take(f"busy{i}", 5, 1.0)
    started = time.perf_counter()
    for _ in range(10):
        buckets.refill()
    per_tick = (time.perf_counter() - started) / 10
    assert buckets.refilling == 100
    assert per_tick < 0.005, per_tick  # 100 live buckets, whatever the idle ones


def test_a_tick_visits_at_most_a_slice_and_take_credits_the_rest() -> None:
    clock = Clock()
    buckets = Buckets(clock, 0.05, slice=1000)
    for i in range(2500):
        buckets.take(f"u{i}", 1, 10.0)  # each now empty
    clock.advance(0.05)
    buckets.refill()
    visited = sum(buckets.bucket(f"u{i}", 1, 10.0).since == 0.05 for i in range(2500))
    assert visited == 1000
    # a bucket not visited yet still has what it earned when it is used
    waiting = next(f"u{i}" for i in range(2500) if buckets.bucket(f"u{i}", 1, 10.0).since == 0.0)
    clock.advance(0.05)  # 0.1 s at 10/s: one token
    assert buckets.take(waiting, 1, 10.0) is not None
    buckets.refill()  # second slice: a full token each, so out of the set
    buckets.refill()  # the last 500, except the one just spent
    assert buckets.refilling == 1000 + 1  # the first slice, half full, waits for the next pass
    clock.advance(0.1)
    buckets.refill()
    buckets.refill()
    assert buckets.refilling == 0
