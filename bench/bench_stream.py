"""Catch-up and bulk import, on each protocol: replay of a 1,000,000-record stream, 1,000,000 grades imported.

1. **Replay.**  ``BENCH_RECORDS`` (1,000,000) gradesvc writes are published to a fresh stream by this
   benchmark over the stream protocol, a sub-entry batch of ``BENCH_BATCH`` (500) a frame, as replicas
   under load write them; then a replica with no peers starts on it and replays it all.  Reported: the
   replica's own ``bootstrap_seconds`` (from its start to ready: the whole stream applied) and records a
   second, and the broker's CPU seconds, for a replica on each protocol (``BENCH_PROTOCOLS``).
2. **Bulk import.**  Three replicas on one fresh stream; ``BENCH_IMPORT`` (1,000,000) grades sent as
   arrays of 1,000 in bulk ``POST /set``, by three clients, one per replica, at once; timed until every
   replica has applied the last array.  Reported: seconds and grades a second.

Servers (and the broker) on core 0, the clients on core 1.  No separate warm-up: a million records warm
PyPy's JIT within the run.  ``python bench_stream.py [replay|bulk]`` runs one part.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_writes import broker_cpu
from common import GradeReplica, delete_stream, machine, pin_server, record, runtime, unique_stream, wait_until
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint

import txrabbitstream
from txrabbitstream import amqp10, frames

RECORDS = int(os.environ.get("BENCH_RECORDS", "1000000"))
BATCH = int(os.environ.get("BENCH_BATCH", "500"))
IMPORT = int(os.environ.get("BENCH_IMPORT", "1000000"))
ARRAY = 1000
PROTOCOLS = os.environ.get("BENCH_PROTOCOLS", "stream,amqp").split(",")
AUTH = {"Authorization": "Basic YWRtaW46YWRtaW4=", "Content-Type": "application/json"}


def write_record(i: int) -> bytes:
    body = json.dumps({"replica": "loader", "id": f"l{i}", "at": 0, "user_id": str(i % 200_000),
                       "patch": {"postpaid_limit": i, "spp": 2 * i, "shipping_fee": 20, "return_fee": 29}},
                      separators=(",", ":")).encode()
    return amqp10.encode(body, {"x-basic-type": "write"})


async def publish(reactor: object, stream: str, count: int) -> float:
    """``count`` writes in sub-entry batches; the seconds it took, all confirmed."""
    client = await txrabbitstream.connect(TCP4ClientEndpoint(reactor, "127.0.0.1", 5552), "guest", "guest",
                                          clock=reactor)  # type: ignore[arg-type]
    await client.create(stream)
    await client.declare_publisher(1, "", stream)
    outstanding = [0]
    drained: List[defer.Deferred[None]] = []

    def confirmed(publisher: int, ids: List[int]) -> None:
        outstanding[0] -= len(ids)
        if outstanding[0] < 50 and drained:
            drained.pop().callback(None)

    client.on_confirm = confirmed
    started = time.monotonic()
    for first in range(0, count, BATCH):
        client.publish(1, [frames.sub_entry(first // BATCH + 1, [write_record(i) for i in
                                                                 range(first, min(count, first + BATCH))])])
        outstanding[0] += 1
        if outstanding[0] >= 200:
            waiting: defer.Deferred[None] = defer.Deferred()
            drained.append(waiting)
            await waiting
    while outstanding[0]:
        await task.deferLater(reactor, 0.01, lambda: None)  # type: ignore[arg-type]
    seconds = time.monotonic() - started
    await client.close()
    return seconds


def replay() -> List[List[str]]:
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    stream = unique_stream()
    out = subprocess.run([sys.executable, __file__, "publish", stream, str(RECORDS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    print(out.stdout.strip(), flush=True)
    try:
        for protocol in PROTOCOLS:
            replica = GradeReplica(workdir / protocol, stream, f"replay-{protocol}",
                                   extra_env={"GRADESVC_STREAM_PROTOCOL": protocol, "GRADESVC_ACCESS_LOG": "off"})
            replica.workdir.mkdir(parents=True)
            before = broker_cpu() or 0.0
            replica.start()
            pin_server(replica)
            replica.wait_ready(timeout=900)
            broker = (broker_cpu() or 0.0) - before
            seconds = replica.ready()["bootstrap_seconds"]
            replica.stop()
            print(f"{protocol}: {RECORDS / seconds:,.0f} records/s ({seconds:.1f} s)", flush=True)
            rows.append([f"replay of {RECORDS:,} records, replica on {protocol}", f"{seconds:.1f} s",
                         f"{RECORDS / seconds:,.0f} records/s", f"broker CPU {broker:.1f} s", runtime(), machine()])
    finally:
        delete_stream(stream)
    return rows


def importer(url: str, arrays: List[List[dict]], offsets: List[int]) -> None:
    host, port = url.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    for array in arrays:
        conn.request("POST", "/set", json.dumps(array, separators=(",", ":")).encode(), AUTH)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        offsets.append(int(response.getheader("X-Stream-Offset")))


def bulk() -> List[List[str]]:
    rows = []
    for protocol in PROTOCOLS:
        workdir = Path(tempfile.mkdtemp(prefix="bench-bulk-"))
        stream = unique_stream()
        replicas: List[GradeReplica] = []
        try:
            for n in range(3):
                replica = GradeReplica(workdir, stream, f"bulk{n}", [r.read_url for r in replicas],
                                       extra_env={"GRADESVC_STREAM_PROTOCOL": protocol, "GRADESVC_ACCESS_LOG": "off"})
                replicas.append(replica.start())
                replica.wait_ready()
                pin_server(replica)
            arrays = [[{"user_id": str(i + j), "postpaid_limit": i + j, "spp": j, "shipping_fee": 20, "return_fee": 29}
                       for j in range(ARRAY)] for i in range(0, IMPORT, ARRAY)]
            offsets: List[int] = []
            started = time.monotonic()
            threads = [threading.Thread(target=importer, args=(r.write_url, arrays[n::3], offsets))
                       for n, r in enumerate(replicas)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            last = max(offsets)
            wait_until(lambda last=last, group=replicas: all(r.ready()["applied_offset"] >= last for r in group),
                       600, "all replicas")
            seconds = time.monotonic() - started
            assert all(r.get(str(IMPORT - 1))[0] == 200 for r in replicas)
            rows.append([f"bulk import of {IMPORT:,} grades (arrays of {ARRAY}) through 3 replicas on {protocol}",
                         f"{seconds:.1f} s", f"{IMPORT / seconds:,.0f} grades/s", "applied on all three", runtime(),
                         machine()])
        finally:
            for replica in replicas:
                replica.stop()
            delete_stream(stream)
    return rows


def main() -> None:
    if sys.argv[1:2] == ["publish"]:
        stream, count = sys.argv[2], int(sys.argv[3])
        task.react(lambda reactor: defer.ensureDeferred(publish(reactor, stream, count)).addCallback(
            lambda s: print(f"published {count:,} records in {s:.1f} s ({count / s:,.0f}/s)")))
        return
    parts = sys.argv[1:] or ["replay", "bulk"]
    rows = [["what", "time", "rate", "note", "runtime", "machine"]]
    if "replay" in parts:
        rows += replay()
    if "bulk" in parts:
        rows += bulk()
    record(rows)


if __name__ == "__main__":
    main()
