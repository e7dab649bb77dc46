"""GET /get throughput of one gradesvc replica vs a bare twisted.web resource.

Both run under twistd on this runtime, on loopback, serving the same 10,000
users; wrk (one thread, 32 connections) measures each in turn.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    GradeReplica,
    delete_stream,
    free_port,
    machine,
    record,
    runtime,
    twistd_tac,
    unique_stream,
    wrk,
)

USERS = int(os.environ.get("BENCH_USERS", "10000"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
HERE = Path(__file__).resolve().parent


def load(replica: GradeReplica) -> None:
    for i in range(USERS):
        code, _ = replica.set({"user_id": str(i), "postpaid_limit": i, "spp": 2 * i, "shipping_fee": 20, "return_fee": 29})
        assert code == 200


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-get-"))
    stream = unique_stream()
    replica = GradeReplica(workdir, stream, "bench").start()
    port = free_port()
    bare = twistd_tac(HERE / "bare_get.tac", workdir, "bare", {"BENCH_PORT": str(port), "BENCH_USERS": str(USERS)}).start()
    try:
        replica.wait_ready()
        load(replica)
        script = str(HERE / "get_random.lua")
        env_users = {"BENCH_USERS": str(USERS)}
        os.environ.update(env_users)
        ours = wrk(f"{replica.read_url}/get", SECONDS, script=script)
        base = wrk(f"http://127.0.0.1:{port}/get", SECONDS, script=script)
        record([["GET /get req/s (gradesvc vs bare twisted.web)", f"{ours:,.0f}", f"{base:,.0f}",
                 f"{ours / base:.2f}x", runtime(), machine()]])
    finally:
        replica.stop()
        bare.stop()
        delete_stream(stream)


if __name__ == "__main__":
    main()
