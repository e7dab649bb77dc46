"""GET /get throughput of gradesvc, with each access log choice, vs a bare twisted.web resource.

Replica ``log`` keeps the default access log (``-``: batched into the daemon's
log), ``file`` writes it to a file, ``json`` writes it to a file as JSON lines,
``off`` writes none; the last three load their users from the first one's
snapshot.  A bare ``twisted.web`` resource
under twistd (with Twisted's own access log) serves the same 10,000 users.
Every server runs on core 0, wrk on core 1 (when there are two), and each is
warmed up before it is timed (``BENCH_WARMUP`` seconds; 20 on PyPy, for its JIT);
then ``BENCH_ROUNDS`` (3) rounds of ``BENCH_SECONDS`` (5) each, in turns, and
the median of each.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    GradeReplica,
    delete_stream,
    free_port,
    http,
    machine,
    pin_server,
    record,
    runtime,
    twistd_tac,
    unique_stream,
    wait_until,
    wrk,
)

USERS = int(os.environ.get("BENCH_USERS_GET", "10000"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "20" if platform.python_implementation() == "PyPy" else "3"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
PREVIOUS = os.environ.get("BENCH_PREVIOUS_TWISTD", "")
"""The ``twistd`` of another gradesvc release (its own venv) to measure alongside."""
COPIES = int(os.environ.get("BENCH_COPIES", "1"))
"""Processes of each build beside the previous release (one row per build over all its processes' rounds)."""
HERE = Path(__file__).resolve().parent


def load(replica: GradeReplica) -> None:
    for i in range(USERS):
        code, _ = replica.set({"user_id": str(i), "postpaid_limit": i, "spp": 2 * i, "shipping_fee": 20,
                               "return_fee": 29})
        assert code == 200


def measure(urls: Dict[str, str]) -> Dict[str, float]:
    """Each server's median req/s over :data:`ROUNDS` rounds taken in turns.

    In turns, so a slower minute of a shared machine hits every contender
    alike; each is warmed up before its first round.
    """
    script = str(HERE / "get_random.lua")
    for url in urls.values():
        wrk(url, WARMUP, script=script)
    rates: Dict[str, List[float]] = {name: [] for name in urls}
    for _ in range(ROUNDS):
        for name, url in urls.items():
            rates[name].append(wrk(url, SECONDS, script=script))
    return {name: statistics.median(r) for name, r in rates.items()}


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-get-"))
    stream = unique_stream()
    logged = GradeReplica(workdir, stream, "log").start()
    port = free_port()
    bare = twistd_tac(HERE / "bare_get.tac", workdir, "bare", {"BENCH_PORT": str(port), "BENCH_USERS": str(USERS)})
    others = []
    try:
        logged.wait_ready()
        load(logged)
        others = [
            GradeReplica(workdir, stream, "file", [logged.read_url],
                         extra_env={"GRADESVC_ACCESS_LOG": str(workdir / "access.log")}).start(),
            GradeReplica(workdir, stream, "off", [logged.read_url], extra_env={"GRADESVC_ACCESS_LOG": "off"}).start(),
            GradeReplica(workdir, stream, "json", [logged.read_url],
                         extra_env={"GRADESVC_ACCESS_LOG": str(workdir / "access.json"),
                                    "GRADESVC_ACCESS_LOG_FORMAT": "json"}).start(),
        ]
        builds: Dict[str, List[GradeReplica]] = {"previous": [], "this": []}
        if PREVIOUS:  # fair pairs: all bootstrapped from the first replica, all with the default access log
            for copy in range(COPIES):
                previous = GradeReplica(workdir, stream, f"previous{copy}", [logged.read_url])
                previous.twistd = PREVIOUS
                builds["previous"].append(previous.start())
                builds["this"].append(GradeReplica(workdir, stream, f"this{copy}", [logged.read_url]).start())
            others += builds["previous"] + builds["this"]
        for replica in others:
            replica.wait_ready()
        bare.start()
        wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/get?user_id=1")[0] == 200, 30, "the bare resource")
        os.environ["BENCH_USERS"] = str(USERS)
        for daemon in [logged, bare, *others]:
            pin_server(daemon)
        urls = {"bare": f"http://127.0.0.1:{port}/get", "log": f"{logged.read_url}/get",
                "file": f"{others[0].read_url}/get", "off": f"{others[1].read_url}/get",
                "json": f"{others[2].read_url}/get"}
        for build, replicas in builds.items():
            for copy, replica in enumerate(replicas):
                urls[f"{build}{copy}"] = f"{replica.read_url}/get"
        rates = measure(urls)
        base, to_log, to_file, off, as_json = (rates[k] for k in ("bare", "log", "file", "off", "json"))
        rows = [
            ["GET /get req/s (gradesvc, default access log, vs bare twisted.web)", f"{to_log:,.0f}", f"{base:,.0f}",
             f"{to_log / base:.2f}x", runtime(), machine()],
            ["GET /get req/s, access log to the daemon's log vs off (goal >= 0.90)", f"{to_log:,.0f}", f"{off:,.0f}",
             f"{to_log / off:.2f}x", runtime(), machine()],
            ["GET /get req/s, access log to a file vs off (goal >= 0.90)", f"{to_file:,.0f}", f"{off:,.0f}",
             f"{to_file / off:.2f}x", runtime(), machine()],
            ["GET /get req/s, JSON access log to a file vs off (goal >= 0.90)", f"{as_json:,.0f}", f"{off:,.0f}",
             f"{as_json / off:.2f}x", runtime(), machine()],
        ]
        if PREVIOUS:
            this = statistics.median(rates[f"this{c}"] for c in range(COPIES))
            previous = statistics.median(rates[f"previous{c}"] for c in range(COPIES))
            spread = ", ".join(f"{rates[f'{b}{c}']:,.0f}" for b in builds for c in range(COPIES))
            rows.append([(f"GET /get req/s, this build vs the previous release ({COPIES} process(es) a build,"
                         f" previous then this: {spread})"), f"{this:,.0f}", f"{previous:,.0f}",
                         f"{this / previous:.2f}x", runtime(), machine()])
        record(rows)
    finally:
        for daemon in [logged, bare, *others]:
            daemon.stop()
        delete_stream(stream)


if __name__ == "__main__":
    main()
