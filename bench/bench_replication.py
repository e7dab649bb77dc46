"""Replication figures: replay, /backup and bootstrap of BENCH_USERS users, and lag.

1. BENCH_USERS writes are published straight to a fresh stream (pika, confirms).
2. Replica A starts with no peers and replays them: time to ready.
3. GET /backup of A: time, A's RSS growth, and /get p99 measured meanwhile.
4. Replica B bootstraps from A's /backup: time to ready.
5. Lag: 1,000 writes/s on A for BENCH_LAG_SECONDS; each write polled on B.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pika

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GradeReplica, delete_stream, http, machine, record, runtime, unique_stream  # noqa: E402

from tests.integration.harness import BROKER_URL  # noqa: E402

USERS = int(os.environ.get("BENCH_USERS", "1000000"))
LAG_SECONDS = int(os.environ.get("BENCH_LAG_SECONDS", "5"))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def publish(stream: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    channel = connection.channel()
    channel.queue_declare(stream, durable=True, arguments={"x-queue-type": "stream"})
    channel.confirm_delivery()
    props = pika.BasicProperties(type="write", app_id="loader", delivery_mode=2, content_type="application/json")
    for i in range(USERS):
        body = json.dumps({"replica": "loader", "ts": (1 << 40) + i, "user_id": str(i),
                           "patch": {"postpaid_limit": i, "spp": 2 * i, "shipping_fee": 20, "return_fee": 29}})
        channel.basic_publish("", stream, body.encode(), props)
    connection.close()


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-repl-"))
    stream = unique_stream()
    replicas = []
    try:
        publish(stream)
        started = time.monotonic()
        a = GradeReplica(workdir, stream, "a").start()
        replicas.append(a)
        a.wait_ready(timeout=900)
        replay = time.monotonic() - started

        latencies = []
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set():
                t = time.monotonic()
                http("GET", f"{a.read_url}/get?user_id=1")
                latencies.append(time.monotonic() - t)

        rss_before = rss_kb(a.process.pid)  # type: ignore[union-attr]
        peak = [rss_before]
        thread = threading.Thread(target=probe)
        thread.start()
        t0 = time.monotonic()
        code, _, body = http("GET", f"{a.read_url}/backup", timeout=600)
        backup = time.monotonic() - t0
        stop.set()
        thread.join()
        peak.append(rss_kb(a.process.pid))  # type: ignore[union-attr]
        assert code == 200
        p99 = sorted(latencies)[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan")

        started = time.monotonic()
        b = GradeReplica(workdir, stream, "b", [a.read_url]).start()
        replicas.append(b)
        b.wait_ready(timeout=900)
        bootstrap = time.monotonic() - started

        lags = []
        end = time.monotonic() + LAG_SECONDS
        i = 0
        while time.monotonic() < end:
            tick = time.monotonic()
            user = f"lag{i}"
            assert a.set({"user_id": user, "spp": i})[0] == 200
            while http("GET", f"{b.read_url}/get?user_id={user}")[0] != 200:
                pass
            lags.append(time.monotonic() - tick)
            i += 1
            time.sleep(max(0.0, 0.001 - (time.monotonic() - tick)))
        lags.sort()
        rt, mc = runtime(), machine()
        record([
            [f"replay {USERS:,} writes from the stream to ready (s)", f"{replay:.1f}", "-", "-", rt, mc],
            [f"/backup of {USERS:,} users (s, goal 3)", f"{backup:.1f}", "3", f"{backup / 3:.2f}x of goal", rt, mc],
            ["RSS growth during /backup (MB, goal 50)", f"{(max(peak) - rss_before) / 1024:.1f}", "50", "-", rt, mc],
            ["/get p99 during /backup (ms, goal 50)", f"{p99:.1f}", "50", "-", rt, mc],
            [f"bootstrap of {USERS:,} users from a peer to ready (s, goal 10)", f"{bootstrap:.1f}", "10", f"{bootstrap / 10:.2f}x of goal", rt, mc],
            ["replication lag set on A -> visible on B, p50 / p99 (ms, goal p99 10)",
             f"{statistics.median(lags) * 1000:.1f} / {lags[int(len(lags) * 0.99) - 1] * 1000:.1f}", "10", "-", rt, mc],
        ])
    finally:
        for replica in replicas:
            replica.stop()
        delete_stream(stream)


if __name__ == "__main__":
    main()
