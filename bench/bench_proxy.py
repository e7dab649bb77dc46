"""Proxied requests/s and CPU per request, side by side in one run.

Contenders, each in front of the same nginx backend (one worker, answering a
short text; it is never the bottleneck):

* lbsvc with its default access log, and with ``LBSVC_ACCESS_LOG=off``
  (checks an API key and spends a token per request; the user's bucket is
  large enough never to run dry);
* Twisted's stock ``ReverseProxyResource`` (a new upstream connection per
  request) and an ``Agent`` + persistent ``HTTPConnectionPool`` proxy, on the
  same runtime as lbsvc;
* an ``aiohttp`` proxy, always on CPython (the goal compares PyPy's lbsvc
  with it);
* nginx ``proxy_pass`` with upstream keepalive (the ceiling), and the backend
  direct.

Every contender is measured with 32 and with 128 concurrent connections
(``BENCH_CONNECTIONS="32 128"``), and lbsvc's req/s and CPU per request are
printed as ratios of the aiohttp proxy's at each (issue #32's goals).

The server under test is pinned to core 0, ``wrk`` and the backend to core 1
(where the machine has two).  Each server is warmed up first
(``BENCH_WARMUP``: 20 s on PyPy, for its JIT; 3 s on CPython); all are up
at once, idle but for the one being measured, and are measured in turns,
``BENCH_ROUNDS`` rounds (default 5) of ``BENCH_SECONDS`` each, so that a
slower minute of a shared machine hits every contender alike; the median is
reported, with
the CPU seconds (user + system) the server process used per 10,000 proxied
requests over the timed rounds.

On PyPy every Twisted contender runs with ``PYPY_GC_NURSERY=16M`` (unless
set otherwise): PyPy's default nursery on this machine is small enough that
minor collections cost about a third of lbsvc's throughput (10.4k req/s with
the default, 14-16k with 16M, measured with this benchmark's method); the
docs/operating.md recommends the same setting for running lbsvc on PyPy.

``BENCH_PREVIOUS_TWISTD=/path/to/other/checkout/.venv/bin/twistd`` adds that
release's lbsvc as one more contender (the issue's "CPU per request compared
with today's" was measured so).  To compare two releases closely,
``BENCH_LBSVC_ONLY=1`` measures the lbsvc contenders alone and
``BENCH_COPIES=N`` starts N processes of each (each its own row, then a row
per build over all its processes' rounds): on a shared VM two processes of
one build can run 8-12% apart (30-40% on PyPy), more than the difference
being looked for.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    CLIENT_CPUS,
    ROOT,
    free_port,
    http,
    lbsvc_with_user,
    machine,
    pin_server,
    record,
    runtime,
    stop_all,
    twistd_tac,
    wait_until,
)

SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "20" if sys.implementation.name == "pypy" else "3"))
LEVELS = [int(c) for c in os.environ.get("BENCH_CONNECTIONS", "32 128").split()]
"""Concurrent connections wrk keeps open; every contender is measured at each."""
PREVIOUS = os.environ.get("BENCH_PREVIOUS_TWISTD", "")
"""The ``twistd`` of another lbsvc release (its own venv) to measure alongside, for CPU per request."""
LBSVC_ONLY = os.environ.get("BENCH_LBSVC_ONLY", "") not in ("", "0")
COPIES = int(os.environ.get("BENCH_COPIES", "1"))
"""Processes started of each lbsvc contender."""
if sys.implementation.name == "pypy":
    os.environ.setdefault("PYPY_GC_NURSERY", "16M")  # inherited by every server started here
HERE = Path(__file__).resolve().parent
CPYTHON = ROOT / ".venv" / "bin" / "python"
SERVER_CORE = ["taskset", "-c", "0"] if CLIENT_CPUS else []
TICK = os.sysconf("SC_CLK_TCK")

NGINX = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  {body}
}}
"""
BACKEND = """server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;
  location / {{ default_type text/plain; return 200 "Server bench answer"; }} }}"""
CEILING = """upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;
  location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}"""


def nginx(workdir: Path, name: str, body: str, cpus: List[str]) -> subprocess.Popen:
    """An nginx master with one worker, on ``cpus``."""
    directory = workdir / name
    directory.mkdir()
    conf = directory / "nginx.conf"
    conf.write_text(NGINX.format(dir=directory, body=body))
    return subprocess.Popen([*cpus, "nginx", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wrk_run(url: str, seconds: int, header: Optional[str], connections: int = 32) -> Tuple[float, int]:
    """(requests/s, requests) of one wrk run; non-2xx answers fail it."""
    command = [*CLIENT_CPUS, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s"]
    if header:
        command += ["-H", header]
    out = subprocess.run(command + [url], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"errors during the run:\n{out}")
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    assert rate and total, out
    return float(rate.group(1)), int(total.group(1))


@attrs.define
class Contender:
    """One server under test, measured in turns with the others."""

    name: str
    url: str
    pid: Optional[int]
    header: Optional[str] = None
    build: str = ""
    """The lbsvc contender this is a process of (with ``BENCH_COPIES``)."""
    connections: int = 32
    warmup: int = WARMUP
    rates: List[float] = attrs.Factory(list)
    requests: int = 0
    cpu: float = 0.0

    def round(self) -> None:
        before = cpu_seconds(self.pid) if self.pid else 0.0
        rate, n = wrk_run(self.url, SECONDS, self.header, self.connections)
        self.rates.append(rate)
        self.requests += n
        if self.pid:
            self.cpu += cpu_seconds(self.pid) - before

    def result(self) -> Tuple[float, Optional[float]]:
        """Median requests/s, and CPU seconds per 10,000 requests."""
        per_10k = self.cpu / self.requests * 10_000 if self.pid else None
        return statistics.median(self.rates), per_10k


def main() -> None:
    if shutil.which("nginx") is None:
        raise SystemExit("nginx is needed: apt-get install nginx")
    workdir = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    backend_port, ceiling_port, stock_port, agent_port, aio_port = (free_port() for _ in range(5))
    processes: List[subprocess.Popen] = [
        nginx(workdir, "backend", BACKEND.format(port=backend_port), CLIENT_CPUS),
        nginx(workdir, "ceiling", CEILING.format(port=ceiling_port, backend=backend_port), SERVER_CORE),
    ]
    daemons = []
    contenders: List[Contender] = []
    try:
        wait_until(lambda: http("GET", f"http://127.0.0.1:{backend_port}/")[0] == 200, 30, "the nginx backend")
        wait_until(lambda: http("GET", f"http://127.0.0.1:{ceiling_port}/")[0] == 200, 30, "the nginx proxy")
        if not LBSVC_ONLY:
            contenders.append(Contender("backend direct (nginx)", f"http://127.0.0.1:{backend_port}/", None,
                                        warmup=1))
            contenders.append(Contender("nginx proxy_pass, keepalive", f"http://127.0.0.1:{ceiling_port}/", None,
                                        warmup=1))
        if CPYTHON.exists() and not LBSVC_ONLY:
            aio = subprocess.Popen([*SERVER_CORE, str(CPYTHON), str(HERE / "aiohttp_proxy.py")],
                                   env={**os.environ, "BENCH_PORT": str(aio_port),
                                        "BENCH_BACKEND_PORT": str(backend_port)})
            processes.append(aio)
            wait_until(lambda: http("GET", f"http://127.0.0.1:{aio_port}/")[0] == 200, 30, "the aiohttp proxy")
            contenders.append(Contender("aiohttp proxy (CPython)", f"http://127.0.0.1:{aio_port}/", aio.pid, warmup=3))
        baselines = [("stock ReverseProxyResource", "stock_proxy.tac", stock_port),
                     ("Agent + pool proxy", "agent_proxy.tac", agent_port)]
        for name, tac, port in [] if LBSVC_ONLY else baselines:
            daemon = twistd_tac(HERE / tac, workdir, tac.split(".")[0],
                                {"BENCH_PORT": str(port), "BENCH_BACKEND_PORT": str(backend_port)}).start()
            daemons.append(daemon)
            pin_server(daemon)
            wait_until(lambda p=port: http("GET", f"http://127.0.0.1:{p}/")[0] == 200, 30, name)
            assert daemon.process is not None
            contenders.append(Contender(name, f"http://127.0.0.1:{port}/", daemon.process.pid))
        lbsvcs = [("lbsvc (access log on, the default)", {}, None),
                  ("lbsvc (access log off)", {"LBSVC_ACCESS_LOG": "off"}, None)]
        if PREVIOUS:
            lbsvcs.append(("lbsvc, previous release (access log on)", {}, PREVIOUS))
        for number, (build, env, twistd) in enumerate(lbsvcs):
            for copy in range(COPIES):
                name = build if COPIES == 1 else f"{build} #{copy + 1}"
                sub = workdir / f"lbsvc-{number}-{copy}"
                sub.mkdir()
                lb, port, key = lbsvc_with_user(sub, backend_port, 10**9, 10**6, env, twistd)
                daemons.append(lb)
                pin_server(lb)
                assert lb.process is not None
                contenders.append(Contender(name, f"http://127.0.0.1:{port}/", lb.process.pid,
                                            f"Authorization: {key}", build=build))
        for contender in contenders:  # every server warm before any is timed
            wrk_run(contender.url, contender.warmup, contender.header)
        contenders = [attrs.evolve(c, name=f"{c.name}, c{level}", build=c.build and f"{c.build}, c{level}",
                                   connections=level, rates=[]) for level in LEVELS for c in contenders]
        for turn in range(ROUNDS):  # in turns, so a slower minute of the machine hits all alike
            for contender in contenders[turn % len(contenders):] + contenders[:turn % len(contenders)]:
                contender.round()
    finally:
        stop_all(daemons, processes)
    results = {c.name: c.result() for c in contenders}
    if COPIES > 1:
        results.update(builds(contenders))
    report(results)


def builds(contenders: List[Contender]) -> Dict[str, Tuple[float, Optional[float]]]:
    """Per lbsvc build, over every round of every process of it: median req/s and CPU per 10k requests."""
    results: Dict[str, Tuple[float, Optional[float]]] = {}
    for build in dict.fromkeys(c.build for c in contenders if c.build):
        mine = [c for c in contenders if c.build == build]
        together = Contender(build, "", mine[0].pid, rates=[r for c in mine for r in c.rates],
                             requests=sum(c.requests for c in mine), cpu=sum(c.cpu for c in mine))
        results[build] = together.result()
    return results


def report(results: Dict[str, Tuple[float, Optional[float]]]) -> None:
    """One row per contender and level, then lbsvc against the aiohttp proxy (the issue's goals) as ratios."""
    rows = []
    for level in LEVELS:
        ours, ours_cpu = results[f"lbsvc (access log on, the default), c{level}"]
        for name, (rate, cpu) in results.items():
            if not name.endswith(f", c{level}"):
                continue
            cpu_text = f"{cpu:.2f} CPU s/10k" if cpu is not None else "-"
            rows.append([f"proxy: {name}", f"{rate:,.0f} req/s", cpu_text, f"lbsvc is {ours / rate:.2f}x",
                         runtime(), machine()])
        aiohttp = results.get(f"aiohttp proxy (CPython), c{level}")
        if aiohttp is not None and aiohttp[1] and ours_cpu:
            print(f"c{level}: lbsvc ({runtime()}, log on) {ours:,.0f} req/s, {ours_cpu:.2f} CPU s/10k = "
                  f"{ours / aiohttp[0]:.2f}x the aiohttp proxy's req/s (CPython) at {ours_cpu / aiohttp[1]:.2f}x"
                  f" its CPU per request")
    record(rows)
    print(f"measured {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
