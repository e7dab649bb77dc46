"""Durability figures: a checkpoint of BENCH_USERS users, a restart from it, a broker node lost.

1. BENCH_USERS writes are published straight to a fresh stream; replica A
   replays them, then writes its first checkpoint (interval 20 s): how long
   the checkpoint took (A's ``gradesvc_checkpoint_seconds``) and ``/get``
   p99 measured while it ran.
2. A is killed with SIGKILL and started again with no peers: time from start
   to ready, loading its own checkpoint.
3. On a local 3-node cluster (``scripts/rabbitmq-cluster``), replica C writes
   at a steady pace while the node it is connected to is killed: the longest
   time writes failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_replication import client, percentile, publish, request
from common import GradeReplica, delete_stream, free_port, machine, record, runtime, unique_stream

from harness.net import basic, metric

USERS = int(os.environ.get("BENCH_USERS", "1000000"))
ROOT = Path(__file__).resolve().parent.parent


def checkpoint_and_restart(workdir: Path) -> List[List[str]]:
    stream = unique_stream()
    env = {"GRADESVC_CHECKPOINT_INTERVAL": "20", "GRADESVC_DATA_DIR": str(workdir / "data")}
    a = GradeReplica(workdir, stream, "a", extra_env=env)
    try:
        publish(stream)
        a.start().wait_ready(timeout=1800)
        metrics = a.read_url + "/metrics"
        ready_at = a.ready()["applied_offset"]
        latencies: List[tuple] = []
        conn = client(a.read_url)
        while metric(metrics, "gradesvc_checkpoint_offset") < ready_at:  # the first one written once ready
            t = time.monotonic()
            request(conn, "GET", "/get?user_id=1")
            latencies.append((t, time.monotonic() - t))
            time.sleep(0.005)
        done = time.monotonic()
        seconds = metric(metrics, "gradesvc_checkpoint_seconds")
        during = sorted(lat for t, lat in latencies if t >= done - seconds - 0.1)
        p99 = percentile(during, 0.99) * 1000 if during else float("nan")
        a.kill()
        started = time.monotonic()
        a.restart().wait_ready(timeout=600)
        restart = time.monotonic() - started
        assert "Loaded checkpoint" in a.log()
        rt, mc = runtime(), machine()
        return [
            [f"checkpoint of {USERS:,} users to disk (s)", f"{seconds:.1f}", "-", "-", rt, mc],
            [f"/get p99 during the checkpoint, {len(during)} probes (ms, goal 50)", f"{p99:.1f}", "50",
             f"{p99 / 50:.2f}x of goal", rt, mc],
            [f"restart after kill -9 with {USERS:,} users, own checkpoint to ready (s, goal 5)",
             f"{restart:.1f}", "5", f"{restart / 5:.2f}x of goal", rt, mc],
        ]
    finally:
        a.stop()
        delete_stream(stream)


def cluster_outage(workdir: Path) -> List[List[str]]:
    base = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    base.chmod(0o755)
    port = free_port()
    while port > 45000:
        port = free_port()
    env = {**os.environ, "CLUSTER_PORT": str(port), "CLUSTER_DIR": str(base)}
    script = str(ROOT / "scripts" / "rabbitmq-cluster")
    urls = subprocess.run([script, "start"], env=env, capture_output=True, text=True, check=True).stdout.split()[-1]
    c = GradeReplica(workdir, unique_stream(), "c", amqp_url=urls)
    try:
        c.start().wait_ready(timeout=120)
        connected = int(c.ready()["broker_node"].rsplit(":", 1)[1].split("/")[0])
        pid = int(Path(base, f"n{connected - port + 1}", "pid").read_text())
        failing: Optional[float] = None
        longest = 0.0
        killed_at = time.monotonic() + 3
        killed = False
        auth = {"Content-Type": "application/json", **basic("admin", "admin")}
        i = 0
        while time.monotonic() < killed_at + 30:
            if not killed and time.monotonic() >= killed_at:
                os.kill(pid, signal.SIGKILL)
                killed = True
            try:
                conn = client(c.write_url)
                code = request(conn, "POST", "/set", json.dumps({"user_id": f"w{i}", "spp": i}).encode(), auth)[0]
            except OSError:
                code = 0
            now = time.monotonic()
            if code == 200 and failing is not None:
                longest = max(longest, now - failing)
                failing = None
            elif code != 200 and failing is None:
                failing = now
            i += 1
            time.sleep(0.01)
        return [["writes unavailable after the connected cluster node is killed (s, goal 10)",
                 f"{longest:.1f}", "10", f"{longest / 10:.2f}x of goal", runtime(), machine()]]
    finally:
        c.stop()
        subprocess.run([script, "stop"], env=env, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-durability-"))
    rows = checkpoint_and_restart(workdir)
    rows += cluster_outage(workdir)
    record(rows)


if __name__ == "__main__":
    main()
