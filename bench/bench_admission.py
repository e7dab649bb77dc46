"""Admission accuracy: 100 concurrent connections hammer one user's bucket.

wrk runs for BENCH_SECONDS against lbsvc with capacity C=10 and rate R=50/s;
admitted requests (2xx) must never exceed C + R*t, t being the time from the
first to the last request (bounded here by the wrk duration plus 1 s).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, http, lbsvc_with_user, machine, record, runtime, twistd_tac, wait_until

SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
CAPACITY, RATE = 10, 50
HERE = Path(__file__).resolve().parent


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-admission-"))
    backend_port = free_port()
    backend = twistd_tac(HERE / "bare_backend.tac", workdir, "backend", {"BENCH_PORT": str(backend_port)}).start()
    lb, lb_port, key = lbsvc_with_user(workdir, backend_port, CAPACITY, RATE)
    try:
        profile = f"http://127.0.0.1:{lb_port}/user/tokens/profile"
        wait_until(lambda: json.loads(http("GET", profile, headers={"Authorization": key})[2])["current_capacity"] == CAPACITY,
                   10, "a full bucket (the worst case)")
        out = subprocess.run(["wrk", "-t2", "-c100", f"-d{SECONDS}s", "-H", f"Authorization: {key}",
                              f"http://127.0.0.1:{lb_port}/"], capture_output=True, text=True, check=True).stdout
        total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        limited = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        admitted = total - (int(limited.group(1)) if limited else 0)
        bound = CAPACITY + RATE * (SECONDS + 1)
        record([[f"admitted of {total:,} requests, 100 connections, {SECONDS}s, C={CAPACITY} R={RATE} (bound C+R·t)",
                 f"{admitted:,}", f"{bound:,}", f"{admitted / bound:.2f}x (over-admission: {max(0, admitted - bound)})",
                 runtime(), machine()]])
    finally:
        lb.stop()
        backend.stop()


if __name__ == "__main__":
    main()
