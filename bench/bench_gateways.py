"""Several gateways: Redis buckets vs memory buckets, --workers 2 vs 1, admission accuracy.

* proxied req/s and gateway CPU per request of one lbsvc process with
  ``--buckets redis://`` (a private redis-server; leased tokens, the
  default) vs ``memory`` (goals: at least 0.95x the throughput, at most
  1.05x the CPU), and Redis deciding every request (``--lease-length 0``),
  with the Redis calls per 1,000 admissions of each (``BENCH_COPIES=N``: N
  processes of memory and of Redis with leases, interleaved: medians, and
  the median of the ratios of the pairs run back to back); the
  gateway is pinned
  to core 0, wrk to core 1 (Redis and nginx float), warmed up first
  (``BENCH_WARMUP``: 20 s on PyPy);
* proxied req/s of ``--workers 2`` vs ``--workers 1`` (both on Redis) on this
  machine (wrk shares the two cores with them here, so nothing is pinned);
* two gateways at once (memory, then Redis with leases), wrk on both, nothing
  pinned: req/s together and CPU per 10,000 requests;
* admission accuracy: two gateways on one SQLite file and one Redis, wrk
  against both at once for ``BENCH_SECONDS``, a user with capacity C and rate
  R: the 200s counted on both gateways' ``/metrics`` must be at most
  C + R·t (goal: 0 over-admission).

Same nginx backend as ``bench_proxy.py``; the server is warmed up first.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_proxy import BACKEND, CONNECTIONS, COPIES, SECONDS, WARMUP, cpu_seconds, nginx, wrk_run
from common import (
    Daemon,
    free_port,
    http,
    lbsvc_with_user,
    machine,
    pin_server,
    record,
    runtime,
    stop_all,
    wait_until,
)

from harness.net import metric


def redis_server(workdir: Path) -> Tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    wait_until(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                                      text=True).stdout.strip() == "PONG", 10, "redis-server")
    return process, f"redis://127.0.0.1:{port}/0"


def rate(url: str, key: str, pid: int) -> Tuple[float, float]:
    """Median req/s of three runs after a warm-up, and the process's CPU seconds per 10,000 requests."""
    wrk_run(url, WARMUP, f"Authorization: {key}")
    before = cpu_seconds(pid)
    runs = [wrk_run(url, SECONDS, f"Authorization: {key}") for _ in range(3)]
    cpu = (cpu_seconds(pid) - before) / sum(total for _, total in runs) * 10_000
    return sorted(r for r, _ in runs)[1], cpu


def wrk_any(url: str, seconds: int, key: str) -> subprocess.Popen:
    """A wrk run that accepts 429s (the accuracy run), started in the background."""
    return subprocess.Popen(["wrk", "-t1", f"-c{CONNECTIONS // 2}", f"-d{seconds}s", "-H", f"Authorization: {key}", url],
                            stdout=subprocess.PIPE, text=True)


def admitted(gateway: Daemon, admin_port: int) -> float:
    return metric(f"http://127.0.0.1:{admin_port}/metrics", "lbsvc_http_requests_total", route="proxy", code="200")


def admin_of(lb: Daemon) -> str:
    return "http://127.0.0.1:" + lb.env["LBSVC_ADMIN_ENDPOINT"].split(":")[1]


def calls_per_thousand(lb: Daemon) -> float:
    """Redis script calls per 1,000 admissions (each call covers a batch of users)."""
    admin = admin_of(lb) + "/metrics"
    calls = metric(admin, "lbsvc_bucket_store_batch_size_count")
    admissions = metric(admin, "lbsvc_http_requests_total", route="proxy", code="200")
    return 1000 * calls / admissions if admissions else float("nan")


def second_gateway(a: Daemon, workdir: Path, key: str, daemons: List[Daemon]) -> Tuple[Daemon, int, int]:
    """Another gateway like ``a`` (same users, same buckets) on ports of its own, serving ``key``'s user:
    it, its port and its admin port."""
    b_port, b_admin = free_port(), free_port()
    b = Daemon("lbsvc", [], {**a.env, "LBSVC_ENDPOINT": f"tcp:{b_port}:interface=127.0.0.1",
                             "LBSVC_ADMIN_ENDPOINT": f"tcp:{b_admin}:interface=127.0.0.1"}, workdir, "lbsvc-b").start()
    daemons.append(b)
    wait_until(lambda: http("GET", f"http://127.0.0.1:{b_port}/user/tokens/profile", None,
                            {"Authorization": key})[0] == 200, 30, "the second gateway")
    return b, b_port, b_admin


def two_at_once(workdir: Path, backend_port: int, env: Dict[str, str], daemons: List[Daemon]) -> Tuple[float, float]:
    """Two gateways on one user database (and one Redis, if ``env`` names it), wrk on both at once, nothing
    pinned: req/s of both together, and their CPU seconds per 10,000 requests."""
    a, a_port, key = lbsvc_with_user(workdir, backend_port, 10**9, 10**6, env)
    daemons.append(a)
    b, b_port, _ = second_gateway(a, workdir, key, daemons)
    time.sleep(0.5)  # b has applied the new limits (the change log is polled every 250 ms)
    urls = [f"http://127.0.0.1:{port}/" for port in (a_port, b_port)]
    pids = [d.process.pid for d in (a, b) if d.process is not None]
    for url in urls:
        wrk_run(url, WARMUP, f"Authorization: {key}")
    before = sum(cpu_seconds(pid) for pid in pids)
    runs = [subprocess.Popen(["wrk", "-t1", f"-c{CONNECTIONS // 2}", f"-d{SECONDS}s", "-H", f"Authorization: {key}",
                              url], stdout=subprocess.PIPE, text=True) for url in urls]
    total = 0
    for run in runs:
        out = run.communicate()[0]
        total += int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    cpu = (sum(cpu_seconds(pid) for pid in pids) - before) / total * 10_000
    a.stop()
    b.stop()
    return total / SECONDS, cpu


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-gateways-"))
    backend_port = free_port()
    processes: List[subprocess.Popen] = [nginx(workdir, "backend", BACKEND.format(port=backend_port), [])]
    redis, redis_url = redis_server(workdir)
    processes.append(redis)
    daemons: List[Daemon] = []
    rows = []
    try:
        wait_until(lambda: http("GET", f"http://127.0.0.1:{backend_port}/")[0] == 200, 30, "the nginx backend")
        measured: Dict[str, List[Tuple[float, float]]] = {}
        calls: Dict[str, float] = {}
        pair = (("memory", {}), ("redis", {"LBSVC_BUCKETS": redis_url}))
        others = (("redis, per request", {"LBSVC_BUCKETS": redis_url, "LBSVC_LEASE_LENGTH": "0"}),
                  ("redis, --workers 2", {"LBSVC_BUCKETS": redis_url, "LBSVC_WORKERS": "2"}))
        # The pair the goals compare, COPIES processes each, interleaved (PyPy processes of one build differ).
        for copy, (name, env) in [(c, p) for c in range(COPIES) for p in pair] + [(0, o) for o in others]:
            sub = workdir / (re.sub(r"\W+", "-", name) + f"-{copy}")
            sub.mkdir()
            lb, port, key = lbsvc_with_user(sub, backend_port, 10**9, 10**6, env)
            daemons.append(lb)
            if "workers" not in name:
                pin_server(lb)
            time.sleep(0.5)  # the other worker sees the new limits (the change log is polled every 250 ms)
            assert lb.process is not None
            measured.setdefault(name, []).append(rate(f"http://127.0.0.1:{port}/", key, lb.process.pid))
            if name.startswith("redis") and "workers" not in name:
                calls[name] = calls_per_thousand(lb)
            lb.stop()
        if COPIES > 1:
            print({name: [(round(r), round(c, 2)) for r, c in runs] for name, runs in measured.items()})
        results = {name: (statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs))
                   for name, runs in measured.items()}
        (redis_rate, redis_cpu), (memory_rate, memory_cpu) = results["redis"], results["memory"]
        # Each copy's pair ran back to back: the median of their ratios is what the machine's drift over the run
        # (seen here: every pair slower than the one before) does not bias.
        pairs = list(zip(measured["redis"], measured["memory"]))
        rate_ratio = statistics.median(r[0] / m[0] for r, m in pairs)
        cpu_ratio = statistics.median(r[1] / m[1] for r, m in pairs)
        per_request_rate, per_request_cpu = results["redis, per request"]
        workers_rate = results["redis, --workers 2"][0]
        print(f"memory: {memory_rate:,.0f} req/s, {memory_cpu:.2f} CPU s/10k; redis (leases): {redis_rate:,.0f}"
              f" req/s, {redis_cpu:.2f} CPU s/10k, {calls['redis']:.2f} Redis calls per 1,000 admissions;"
              f" redis per request: {per_request_rate:,.0f} req/s, {per_request_cpu:.2f} CPU s/10k,"
              f" {calls['redis, per request']:.0f} calls per 1,000; redis --workers 2: {workers_rate:,.0f} req/s")
        rows.append(["proxied req/s, Redis buckets (leases) vs memory buckets (one process)", f"{redis_rate:,.0f}",
                     f"{memory_rate:,.0f}", f"{rate_ratio:.2f}x (goal 0.95x)", runtime(), machine()])
        rows.append(["gateway CPU s/10k requests, Redis buckets (leases) vs memory buckets", f"{redis_cpu:.2f}",
                     f"{memory_cpu:.2f}", f"{cpu_ratio:.2f}x (goal 1.05x)", runtime(), machine()])
        rows.append(["proxied req/s, Redis per request (--lease-length 0) vs memory buckets",
                     f"{per_request_rate:,.0f}", f"{memory_rate:,.0f}", f"{per_request_rate / memory_rate:.2f}x",
                     runtime(), machine()])
        rows.append(["gateway CPU s/10k requests, Redis per request vs memory buckets", f"{per_request_cpu:.2f}",
                     f"{memory_cpu:.2f}", f"{per_request_cpu / memory_cpu:.2f}x", runtime(), machine()])
        rows.append(["Redis calls per 1,000 admissions, leases vs per request", f"{calls['redis']:.2f}",
                     f"{calls['redis, per request']:.0f}", "", runtime(), machine()])
        rows.append(["proxied req/s, --workers 2 vs 1 (Redis buckets)", f"{workers_rate:,.0f}",
                     f"{redis_rate:,.0f}", f"{workers_rate / redis_rate:.2f}x", runtime(), machine()])
        two: Dict[str, Tuple[float, float]] = {}
        for name, env in (("memory", {}), ("redis", {"LBSVC_BUCKETS": redis_url})):
            sub = workdir / f"two-{name}"
            sub.mkdir()
            two[name] = two_at_once(sub, backend_port, env, daemons)
        print(f"two gateways: memory {two['memory'][0]:,.0f} req/s, {two['memory'][1]:.2f} CPU s/10k;"
              f" redis (leases) {two['redis'][0]:,.0f} req/s, {two['redis'][1]:.2f} CPU s/10k")
        rows.append(["two gateways at once, proxied req/s: Redis (leases) vs memory", f"{two['redis'][0]:,.0f}",
                     f"{two['memory'][0]:,.0f}", f"{two['redis'][0] / two['memory'][0]:.2f}x", runtime(), machine()])
        rows.append(["two gateways at once, CPU s/10k: Redis (leases) vs memory", f"{two['redis'][1]:.2f}",
                     f"{two['memory'][1]:.2f}", f"{two['redis'][1] / two['memory'][1]:.2f}x", runtime(), machine()])
        rows.append(accuracy(workdir, backend_port, redis_url, daemons))
    finally:
        stop_all(daemons, processes)
    record(rows)


def accuracy(workdir: Path, backend_port: int, redis_url: str, daemons: List[Daemon]) -> List[str]:
    """Two gateways, one user (C=100, R=50/s), wrk on both: 200s vs C + R·t."""
    capacity, per_second = 100, 50.0
    sub = workdir / "accuracy"
    sub.mkdir()
    env = {"LBSVC_BUCKETS": redis_url}  # the defaults: a 50 ms Redis timeout, local shares
    a, a_port, key = lbsvc_with_user(sub, backend_port, capacity, per_second, env)
    daemons.append(a)
    b, b_port, b_admin = second_gateway(a, sub, key, daemons)
    a_admin = int(a.env["LBSVC_ADMIN_ENDPOINT"].split(":")[1])
    start = time.monotonic()
    runs = [wrk_any(f"http://127.0.0.1:{port}/", SECONDS, key) for port in (a_port, b_port)]
    for run in runs:
        run.wait()
    elapsed = time.monotonic() - start
    total = admitted(a, a_admin) + admitted(b, b_admin)
    bound = capacity + per_second * elapsed
    over = max(0.0, total - bound)
    profile = json.loads(http("GET", f"http://127.0.0.1:{a_port}/user/tokens/profile", None, {"Authorization": key})[2])
    print(f"accuracy: admitted {total:.0f} over {elapsed:.1f}s, bound {bound:.0f}, profile now {profile}")
    return [f"admission across 2 gateways (C={capacity}, R={per_second:.0f}/s, {elapsed:.1f}s): over-admission",
            f"{over:.0f}", f"bound {bound:.0f}, admitted {total:.0f}", "goal 0", runtime(), machine()]


if __name__ == "__main__":
    main()
