"""Sustained writes: ``POST /set`` through one replica and through three, closed loop.

Each contender is a group of replicas of one build on a stream of its own:
``wrk`` keeps ``BENCH_CONNECTIONS`` (48) connections busy with ``POST /set``
of random users (``set_random.lua``), split evenly over the group's write
ports (three ``wrk`` processes at once for three replicas), for
``BENCH_SECONDS`` (10) after a warm-up (``BENCH_WARMUP``: 3 s, 20 on PyPy),
``BENCH_ROUNDS`` (3) rounds taken in turns.  Reported: the median writes a
second of the group, the median p50 and p99 of ``/set`` (wrk's latency
distribution; for a group, the worst replica's), and the broker's CPU per
1,000 writes (the broker's own CPU time, read from ``/proc``, over the
rounds).  The replicas' access logs are off; everything else is the default.

``BENCH_GROUPS`` chooses the group sizes (``1,3``), ``BENCH_PROTOCOLS`` the replicas' ``--stream-protocol``
(``stream,amqp``; ``auto`` leaves it to the build, as a previous release without the option needs).
``BENCH_PREVIOUS_TWISTD=/path/to/other/checkout/.venv/bin/twistd`` adds that
release as a contender; ``BENCH_COPIES=N`` starts N groups of each build (a
row per group, then one per build over all its groups' rounds): on this VM
two processes of one build differ by more than the changes being looked for.
Servers run on core 0 with the broker; ``wrk`` on core 1.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CLIENT_CPUS, GradeReplica, delete_stream, machine, pin_server, record, runtime, unique_stream

SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "20" if platform.python_implementation() == "PyPy" else "3"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "48"))
GROUPS = [int(n) for n in os.environ.get("BENCH_GROUPS", "1,3").split(",")]
PREVIOUS = os.environ.get("BENCH_PREVIOUS_TWISTD", "")
COPIES = int(os.environ.get("BENCH_COPIES", "1"))
PROTOCOLS = os.environ.get("BENCH_PROTOCOLS", "stream,amqp").split(",")
HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "set_random.lua")
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def broker_cpu() -> Optional[float]:
    """CPU seconds the broker (its Erlang VM) has used so far; None if it is not found."""
    try:
        pids = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True).stdout.split()
    except OSError:
        return None
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total if pids else None


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * UNITS[unit]


def wrk_many(urls: Sequence[str], seconds: int) -> Tuple[float, float, float]:
    """Writes a second summed over ``urls`` (one wrk each, at once), the worst p50 and p99 in ms."""
    per = max(1, CONNECTIONS // len(urls))
    runs = [subprocess.Popen([*CLIENT_CPUS, "wrk", "-t1", f"-c{per}", f"-d{seconds}s", "--latency", "-s", SCRIPT,
                              url + "/set"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for url in urls]
    rate, p50, p99 = 0.0, 0.0, 0.0
    for run in runs:
        out, _ = run.communicate()
        if run.returncode != 0 or "Non-2xx" in out:
            raise RuntimeError(f"wrk failed or saw errors:\n{out}")
        rate += float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        p50 = max(p50, _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)))  # type: ignore[union-attr]
        p99 = max(p99, _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)))  # type: ignore[union-attr]
    return rate, p50, p99


class Group:
    """Replicas of one build on one stream of their own."""

    def __init__(self, workdir: Path, name: str, size: int, twistd: Optional[str], protocol: str = "auto") -> None:
        self.name = name
        self.stream = unique_stream()
        self.replicas: List[GradeReplica] = []
        for n in range(size):
            replica = GradeReplica(workdir / f"{name}-{n}".replace(" ", "_").replace(",", ""), self.stream,
                                   f"w{n}", [r.read_url for r in self.replicas],
                                   extra_env={"GRADESVC_ACCESS_LOG": "off", "GRADESVC_STREAM_PROTOCOL": protocol})
            replica.workdir.mkdir(parents=True, exist_ok=True)
            if twistd:
                replica.twistd = twistd
            self.replicas.append(replica.start())
            replica.wait_ready()
            pin_server(replica)
        self.rounds: List[Tuple[float, float, float]] = []
        self.broker_seconds = 0.0

    def run(self, seconds: int) -> None:
        before = broker_cpu()
        result = wrk_many([r.write_url for r in self.replicas], seconds)
        after = broker_cpu()
        self.rounds.append(result)
        if before is not None and after is not None:
            self.broker_seconds += after - before

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop()
        delete_stream(self.stream)


def row(name: str, groups: Sequence[Group]) -> List[str]:
    rounds = [r for g in groups for r in g.rounds]
    rate = statistics.median(r[0] for r in rounds)
    p50 = statistics.median(r[1] for r in rounds)
    p99 = statistics.median(r[2] for r in rounds)
    writes = sum(r[0] * SECONDS for r in rounds)
    broker = sum(g.broker_seconds for g in groups) / writes * 1000 if writes else float("nan")
    return [name, f"{rate:,.0f}", f"{p50:.1f} ms", f"{p99:.1f} ms", f"{broker * 1000:.1f} ms", runtime(), machine()]


def main() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    workdir = Path(tempfile.mkdtemp(prefix="bench-writes-"))
    builds: List[Tuple[str, Optional[str], str]] = [(f"this build, {p}", None, p) for p in PROTOCOLS]
    if PREVIOUS:
        builds.insert(0, ("previous release", PREVIOUS, "auto"))
    rows = [["contender", "writes/s", "/set p50", "/set p99", "broker CPU / 1,000 writes", "runtime", "machine"]]
    for size in GROUPS:
        groups: Dict[str, List[Group]] = {}
        try:
            for build, twistd, protocol in builds:
                for copy in range(COPIES):
                    label = f"{build}, {size} replica{'s' if size > 1 else ''}"
                    if COPIES > 1:
                        label += f" #{copy + 1}"
                    groups.setdefault(build, []).append(Group(workdir, label, size, twistd, protocol))
            everyone = [g for gs in groups.values() for g in gs]
            for group in everyone:
                wrk_many([r.write_url for r in group.replicas], WARMUP)
            for _ in range(ROUNDS):
                for group in everyone:
                    group.run(SECONDS)
                    time.sleep(0.5)  # let the broker settle between contenders
            for build, gs in groups.items():
                if COPIES > 1:
                    rows += [row(g.name, [g]) for g in gs]
                rows.append(row(f"{build}, {size} replica{'s' if size > 1 else ''} (all rounds)", gs))
        finally:
            for gs in groups.values():
                for group in gs:
                    group.stop()
    record(rows)


if __name__ == "__main__":
    main()
