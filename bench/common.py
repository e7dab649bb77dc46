"""Helpers for the benchmarks: processes, wrk, and the results table."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the harness package, shared with the integration tests

from harness.broker import delete_stream, unique_stream  # noqa: E402
from harness.daemon import Daemon  # noqa: E402
from harness.net import free_port, http, wait_until  # noqa: E402
from harness.replica import GradeReplica  # noqa: E402

__all__ = ["Daemon", "GradeReplica", "delete_stream", "free_port", "http", "unique_stream",
           "wait_until", "wrk", "runtime", "stop_all", "machine", "record", "twistd_tac", "lbsvc_with_user", "pin_server"]


SERVER_CPUS = {0}
CLIENT_CPUS = ["taskset", "-c", "1"] if (os.cpu_count() or 1) >= 2 and shutil.which("taskset") else []
"""Servers on core 0, the load generator on core 1, where the machine has two."""


def pin_server(daemon: Daemon) -> None:
    """Keep a server process on :data:`SERVER_CPUS` (when the load generator has its own core)."""
    if CLIENT_CPUS and daemon.process is not None:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(daemon.process.pid, SERVER_CPUS)
        else:  # PyPy 3.9 has no sched_setaffinity
            cpus = ",".join(map(str, sorted(SERVER_CPUS)))
            subprocess.run(["taskset", "-p", "-c", cpus, str(daemon.process.pid)], check=True, capture_output=True)


def runtime() -> str:
    """``CPython 3.11.7`` or ``PyPy 3.9.16``."""
    return f"{platform.python_implementation()} {platform.python_version()}"


def machine() -> str:
    """CPU model and core count."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def wrk(url: str, seconds: int = 5, connections: int = 32, header: Optional[str] = None,
        script: Optional[str] = None) -> float:
    """Requests per second that ``wrk`` measured (non-2xx answers fail the run)."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    command = [*CLIENT_CPUS, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if header:
        command += ["-H", header]
    if script:
        command += ["-s", script]
    run = subprocess.run(command + [url], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"wrk failed: {run.stdout}{run.stderr}")
    out = run.stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"non-2xx answers during the run:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def twistd_tac(tac: Path, workdir: Path, name: str, env: dict) -> Daemon:
    """A ``twistd -n -y file.tac`` process, logging like the daemons do."""
    daemon = Daemon("", ["-y", str(tac)], env, workdir, name)
    return daemon


def record(rows: List[List[str]]) -> None:
    """Print rows as a Markdown table and append them to $BENCH_RESULTS if set."""
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    print("\n".join(lines))
    target = os.environ.get("BENCH_RESULTS")
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def stop_all(daemons: List[Daemon], processes: List[subprocess.Popen]) -> None:
    """Stop the benchmark's daemons, then its other processes (nginx, Redis, aiohttp)."""
    for daemon in daemons:
        daemon.stop()
    for process in processes:
        process.terminate()
        process.wait(10)


def lbsvc_with_user(workdir: Path, backend_port: int, capacity: int, rate: float,
                    extra_env: Optional[dict] = None, twistd: Optional[str] = None) -> Tuple[Daemon, int, str]:
    """Start lbsvc in front of one backend, create a user with these limits.

    Returns the daemon, its port and the user's API key (the caller stops it).
    """
    lb_port, admin_port = free_port(), free_port()
    (workdir / "servers.yaml").write_text(f'servers:\n  - {{name: bench, url: "http://127.0.0.1:{backend_port}"}}\n'
                                          "health_check: {path: /, interval: 5.0}\n")
    lb = Daemon("lbsvc", [], {
        "LBSVC_ENDPOINT": f"tcp:{lb_port}:interface=127.0.0.1",
        "LBSVC_ADMIN_ENDPOINT": f"tcp:{admin_port}:interface=127.0.0.1",
        "LBSVC_SERVERS": str(workdir / "servers.yaml"),
        "LBSVC_DATABASE": str(workdir / "users.sqlite3"),
        **(extra_env or {}),
    }, workdir, "lbsvc")
    if twistd:
        lb.twistd = twistd
    lb.start()
    for port in (backend_port, admin_port):
        wait_until(lambda p=port: http("GET", f"http://127.0.0.1:{p}/")[0] in (200, 404), 30, f"port {port}")
    base = f"http://127.0.0.1:{lb_port}"
    key = json.loads(http("POST", f"{base}/user/create", b'{"name": "bench"}')[2])["api_key"]
    code, _, body = http("POST", f"{base}/user/tokens/change",
                         json.dumps({"capacity": capacity, "rate_per_sec": rate}).encode(), {"Authorization": key})
    if code != 200:
        raise RuntimeError(f"could not set the user's limits: {code} {body!r}")
    return lb, lb_port, key
