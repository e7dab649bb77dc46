"""One refill tick with 100,000 non-full buckets (and a million idle ones), in process."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, record, runtime  # noqa: E402

from twisted.internet.task import Clock  # noqa: E402

from lbsvc.buckets import Buckets  # noqa: E402


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
    for _ in range(20):
        clock.advance(0.05)
        started = time.perf_counter()
        buckets.refill()
        samples.append(time.perf_counter() - started)
    samples.sort()
    median = samples[len(samples) // 2] * 1000
    empty = Buckets(Clock())
    for i in range(1_000_000):
        empty.bucket(f"idle{i}", 5, 1.0)
    started = time.perf_counter()
    empty.refill()
    idle = (time.perf_counter() - started) * 1000
    record([
        ["refill tick, 100k non-full + 1M full buckets (ms, goal 10)", f"{median:.2f}", "10", f"{median / 10:.2f}x of goal", runtime(), machine()],
        ["refill tick, 1M full buckets only (ms)", f"{idle:.3f}", "-", "-", runtime(), machine()],
    ])


if __name__ == "__main__":
    main()
