"""Replication figures: replay, /backup and bootstrap of BENCH_USERS users, and lag.

1. BENCH_USERS writes are published straight to a fresh stream.
2. Replica A starts with no peers and replays them: time to ready.
3. GET /backup of A: time, A's RSS growth, and /get p99 measured meanwhile.
4. Replica B bootstraps from A's /backup: time to ready.
5. Lag at a steady 1,000 writes/s on A (a second process writes), twice for
   BENCH_LAG_SECONDS: first with nothing else running, read from B's
   gradesvc_replication_delay_seconds histogram (every write, from A stamping
   it, 1 ms clock, to B applying it); then with every tenth write a probe,
   polled on B until visible (probe sent -> seen on B, so it includes A's own
   /set latency and the polling's load on B).
"""

from __future__ import annotations

import base64
import http.client
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, List, Tuple

import pika

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GradeReplica, delete_stream, machine, record, runtime, unique_stream

from harness.broker import BROKER_URL

USERS = int(os.environ.get("BENCH_USERS", "1000000"))
LAG_SECONDS = int(os.environ.get("BENCH_LAG_SECONDS", "10"))
WRITES_PER_SECOND = 1000
PROBES_PER_SECOND = 100
AUTH = {"Authorization": "Basic " + base64.b64encode(b"admin:admin").decode(),
        "Content-Type": "application/json"}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def publish(stream: str) -> None:
    """USERS writes on a fresh stream; only the last one waits for a confirm."""
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    channel = connection.channel()
    channel.queue_declare(stream, durable=True, arguments={"x-queue-type": "stream"})
    props = pika.BasicProperties(type="write", app_id="loader", delivery_mode=2, content_type="application/json")
    for i in range(USERS):
        if i == USERS - 1:
            # A channel's messages reach the stream in order: once this last
            # one is confirmed, every earlier one is stored too.
            channel.confirm_delivery()
        body = json.dumps({"replica": "loader", "id": str(i), "at": 0, "user_id": str(i),
                           "patch": {"postpaid_limit": i, "spp": 2 * i, "shipping_fee": 20, "return_fee": 29}})
        channel.basic_publish("", stream, body.encode(), props)
    connection.close()


def client(url: str) -> http.client.HTTPConnection:
    """A keep-alive connection to ``http://host:port``."""
    host, port = url.split("//", 1)[1].split(":")
    return http.client.HTTPConnection(host, int(port), timeout=30)


def request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes = b"",
            headers: dict = {}) -> Tuple[int, bytes]:  # noqa: B006 - never mutated
    conn.request(method, path, body or None, headers)
    response = conn.getresponse()
    return response.status, response.read()


def paced(rate: float, seconds: float, step: Callable[[int], None]) -> int:
    """Call ``step(i)`` ``rate`` times a second for ``seconds``; return how many ran."""
    start = time.monotonic()
    i = 0
    while True:
        due = start + i / rate
        now = time.monotonic()
        if due - start >= seconds:
            return i
        if due > now:
            time.sleep(due - now)
        step(i)
        i += 1


def steady_writer(url: str, rate: float, seconds: float, connections: int, done: multiprocessing.Queue[int]) -> None:
    """Writes on A at ``rate`` per second over a few keep-alive connections."""
    counts: List[int] = []

    def run(n: int) -> None:
        conn = client(url)

        def write(i: int) -> None:
            body = json.dumps({"user_id": f"load{n}-{i % 5000}", "spp": i}).encode()
            assert request(conn, "POST", "/set", body, AUTH)[0] == 200

        counts.append(paced(rate / connections, seconds, write))

    threads = [threading.Thread(target=run, args=(n,)) for n in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.put(sum(counts))


def lag_histogram(replica: GradeReplica) -> List[Tuple[float, int]]:
    """``(upper bound, cumulative count)`` of the replica's lag histogram."""
    out = []
    for line in request(client(replica.read_url), "GET", "/metrics")[1].decode().splitlines():
        if line.startswith("gradesvc_replication_delay_seconds_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out.append((float(bound), int(float(line.rsplit(" ", 1)[1]))))
    return out


def histogram_quantile(before: List[Tuple[float, int]], after: List[Tuple[float, int]], q: float) -> float:
    """The ``q`` quantile of what was observed between two scrapes (linear within a bucket)."""
    counts = [(bound, b - a) for (bound, b), (_, a) in zip(after, before)]
    wanted = q * counts[-1][1]
    lower, below = 0.0, 0
    for bound, cumulative in counts:
        if cumulative >= wanted:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (wanted - below) / max(1, cumulative - below)
        lower, below = bound, cumulative
    return lower


def start_writer(a: GradeReplica, rate: float) -> Tuple[multiprocessing.Process, multiprocessing.Queue[int]]:
    """A second process writing on A at ``rate`` for LAG_SECONDS."""
    done: multiprocessing.Queue[int] = multiprocessing.Queue()
    load = multiprocessing.Process(target=steady_writer, args=(a.write_url, rate, LAG_SECONDS, 4, done))
    load.start()
    return load, done


def delay_on_b(a: GradeReplica, b: GradeReplica) -> Tuple[float, List[float]]:
    """Steady writes on A, nothing else: the rate achieved and B's p50/p99 delay."""
    before = lag_histogram(b)
    load, done = start_writer(a, WRITES_PER_SECOND)
    load.join()
    after = lag_histogram(b)
    return done.get() / LAG_SECONDS, [histogram_quantile(before, after, q) for q in (0.5, 0.99)]


def probe_lag(a: GradeReplica, b: GradeReplica) -> Tuple[List[float], List[float], float]:
    """Steady writes on A, some of them probes polled on B until visible: the
    probes' lags and /set latencies (seconds, sorted), and the rate achieved."""
    load, done = start_writer(a, WRITES_PER_SECOND - PROBES_PER_SECOND)
    writer, reader = client(a.write_url), client(b.read_url)
    lags: List[float] = []
    acked: List[float] = []

    def probe(i: int) -> None:
        user = f"lag{i}"
        sent = time.monotonic()
        assert request(writer, "POST", "/set", json.dumps({"user_id": user, "spp": i}).encode(), AUTH)[0] == 200
        acked.append(time.monotonic() - sent)
        while request(reader, "GET", f"/get?user_id={user}")[0] != 200:
            time.sleep(0.0005)  # poll B without starving it of CPU
        lags.append(time.monotonic() - sent)

    probes = paced(PROBES_PER_SECOND, LAG_SECONDS, probe)
    load.join()
    return sorted(lags), sorted(acked), (done.get() + probes) / LAG_SECONDS


def percentile(sorted_values: List[float], p: float) -> float:
    return sorted_values[max(0, int(len(sorted_values) * p) - 1)]


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-repl-"))
    stream = unique_stream()
    replicas = []
    try:
        publish(stream)
        started = time.monotonic()
        a = GradeReplica(workdir, stream, "a").start()
        replicas.append(a)
        a.wait_ready(timeout=1800)
        replay = time.monotonic() - started

        latencies: List[float] = []
        stop = threading.Event()

        def probe() -> None:
            conn = client(a.read_url)
            while not stop.is_set():
                t = time.monotonic()
                request(conn, "GET", "/get?user_id=1")
                latencies.append(time.monotonic() - t)
                time.sleep(0.005)

        rss_before = rss_kb(a.process.pid)  # type: ignore[union-attr]
        peak = [rss_before]
        thread = threading.Thread(target=probe)
        thread.start()
        t0 = time.monotonic()
        backup = client(a.read_url)
        backup.request("GET", "/backup")
        response = backup.getresponse()
        size = 0
        while True:
            chunk = response.read(1 << 16)
            if not chunk:
                break
            size += len(chunk)
            peak.append(rss_kb(a.process.pid))  # type: ignore[union-attr]
        backup_seconds = time.monotonic() - t0
        stop.set()
        thread.join()
        assert response.status == 200
        p99 = percentile(sorted(latencies), 0.99) * 1000

        started = time.monotonic()
        b = GradeReplica(workdir, stream, "b", [a.read_url]).start()
        replicas.append(b)
        b.wait_ready(timeout=900)
        bootstrap = time.monotonic() - started

        rate_b, on_b = delay_on_b(a, b)
        lags, acked, rate = probe_lag(a, b)
        rt, mc = runtime(), machine()
        record([
            [f"replay {USERS:,} writes from the stream to ready (s)", f"{replay:.1f}",
             "-", f"{USERS / replay:,.0f} msg/s", rt, mc],
            [f"/backup of {USERS:,} users, {size / 1e6:.0f} MB gzip (s, goal 3)", f"{backup_seconds:.1f}", "3",
             f"{backup_seconds / 3:.2f}x of goal", rt, mc],
            ["RSS growth during /backup (MB, goal 50)", f"{(max(peak) - rss_before) / 1024:.1f}", "50", "-", rt, mc],
            [f"/get p99 during /backup, {len(latencies)} probes (ms, goal 50)", f"{p99:.1f}", "50", "-", rt, mc],
            [f"bootstrap of {USERS:,} users from a peer to ready (s, goal 10)", f"{bootstrap:.1f}", "10",
             f"{bootstrap / 10:.2f}x of goal", rt, mc],
            [(f"replication lag at {rate:,.0f} writes/s, set on A -> visible on B, p50 / p99, {len(lags)} probes"
             " (ms, goal p99 10)"),
             f"{statistics.median(lags) * 1000:.1f} / {percentile(lags, 0.99) * 1000:.1f}", "10", "-", rt, mc],
            [f"/set answered by A at {rate:,.0f} writes/s, p50 / p99 (ms)",
             f"{statistics.median(acked) * 1000:.1f} / {percentile(acked, 0.99) * 1000:.1f}", "-", "-", rt, mc],
            [(f"replication lag at {rate_b:,.0f} writes/s, stamped on A -> applied on B, p50 / p99,"
             " every write, from B's /metrics (ms, goal p99 10)"),
             f"{on_b[0] * 1000:.1f} / {on_b[1] * 1000:.1f}", "10", "-", rt, mc],
        ])
    finally:
        for replica in replicas:
            replica.stop()
        delete_stream(stream)


if __name__ == "__main__":
    main()
