"""Refill ticks with 100,000 non-full buckets (and a million idle ones), in process.

A tick credits at most lbsvc.limits.buckets.SLICE buckets; the whole pass over the
100,000 is reported too (its CPU time, spread over several ticks)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, record, runtime
from twisted.internet.task import Clock

from lbsvc.limits.buckets import SLICE, Buckets


def main() -> None:
    clock = Clock()
    buckets = Buckets(clock)
    for i in range(1_000_000):
        buckets.bucket(f"idle{i}", 5, 1.0)
    for i in range(100_000):
        buckets.take(f"busy{i}", 5, 0.001)
    clock.advance(0.05)
    for _ in range(5):  # warm up (PyPy's JIT)
        buckets.refill()
    samples = []
    passes = []
    for _ in range(4):
        clock.advance(0.05)
        buckets.refill()  # finish whatever pass is under way; the next tick starts one
        spent = 0.0
        while True:
            clock.advance(0.05)
            started = time.perf_counter()
            buckets.refill()
            took = time.perf_counter() - started
            samples.append(took)
            spent += took
            if not buckets.pass_remaining:
                break
        passes.append(spent)
    assert buckets.refilling == 100_000  # rate 0.001/s: none fills up during the run
    samples.sort()
    passes.sort()
    median = samples[len(samples) // 2] * 1000
    whole = passes[len(passes) // 2] * 1000
    empty = Buckets(Clock())
    for i in range(1_000_000):
        empty.bucket(f"idle{i}", 5, 1.0)
    started = time.perf_counter()
    empty.refill()
    idle = (time.perf_counter() - started) * 1000
    record([
        [f"refill tick, 100k non-full + 1M full buckets, at most {SLICE:,} per tick (ms, goal 10)", f"{median:.2f}", "10",
         f"{median / 10:.2f}x of goal", runtime(), machine()],
        ["... the whole pass over the 100k non-full buckets, CPU spread over several ticks (ms)", f"{whole:.2f}", "-", "-",
         runtime(), machine()],
        ["refill tick, 1M full buckets only (ms)", f"{idle:.3f}", "-", "-", runtime(), machine()],
    ])


if __name__ == "__main__":
    main()
