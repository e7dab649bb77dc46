"""Losing every replica at once: local checkpoints bring them back (contract 2.5)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable, Dict, List

import pika
import pytest

from harness.broker import BROKER_URL, tiny_stream
from harness.net import basic, http, wait_until
from harness.replica import GradeReplica, set_with_offset
from tests.integration.test_replication import expect_and_converge

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stream_protocol")]

Make = Callable[..., GradeReplica]
FAST = {"GRADESVC_CHECKPOINT_INTERVAL": "0.5"}


def stream_start(stream: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        for _, properties, _ in channel.consume(stream, arguments={"x-stream-offset": "first"},
                                                 inactivity_timeout=5):
            return int(properties.headers["x-stream-offset"])
        raise AssertionError("empty stream")
    finally:
        connection.close()


def checkpointed(replica: GradeReplica, offset: int) -> bool:
    return replica.metric("gradesvc_checkpoint_offset") >= offset


def test_kill_all_replicas_at_once_past_retention(replicas: Make, stream: str) -> None:
    tiny_stream(stream, max_bytes=150_000, segment=15_000)
    a = replicas("a", extra_env=FAST).wait_ready()
    b = replicas("b", [a], extra_env=FAST).wait_ready()
    c = replicas("c", [a, b], extra_env=FAST).wait_ready()
    trio = [a, b, c]
    acked: Dict[str, Dict[str, int]] = {}
    for i in range(1500):  # several times the retention: the first segments are gone
        user = f"u{i % 400}"
        set_with_offset(trio[i % 3], {"user_id": user, "spp": i})
        acked[user] = {"spp": i}
    assert stream_start(stream) > 0
    stop = threading.Event()
    flowing: List[int] = []

    def load() -> None:
        i = 0
        while not stop.is_set():
            try:
                code, _, _ = http("POST", a.write_url + "/set", json.dumps({"user_id": f"f{i}", "spp": i}).encode(),
                                  {"Content-Type": "application/json", **basic("admin", "admin")})
            except OSError:  # killed mid-request: not acknowledged
                code = 0
            if code == 200:
                acked[f"f{i}"] = {"spp": i}
                flowing.append(i)
            i += 1

    last = max(r.ready()["applied_offset"] for r in trio)
    wait_until(lambda: all(checkpointed(r, last) for r in trio), 30, "checkpoints of recent state")
    writer = threading.Thread(target=load)
    writer.start()
    wait_until(lambda: len(flowing) > 20, 30, "writes flowing")
    for r in trio:
        r.kill()  # all at once, mid-write
    stop.set()
    writer.join()
    for r in trio:
        r.restart()
    for r in trio:
        r.wait_ready(timeout=60)
    for r in trio:
        assert "Loaded checkpoint" in r.log()
        assert r.ready()["phase"] == "ready" and "retention_gap" not in r.ready()
    expect_and_converge(trio, acked)


def test_a_replica_killed_comes_back_from_its_checkpoint_without_peers(replicas: Make, stream: str) -> None:
    tiny_stream(stream, max_bytes=60_000, segment=6_000)
    solo = replicas("solo", extra_env=FAST).wait_ready()
    acked: Dict[str, Dict[str, int]] = {}
    for i in range(800):
        offset = set_with_offset(solo, {"user_id": f"s{i % 100}", "return_fee": i})
        acked[f"s{i % 100}"] = {"return_fee": i}
    assert stream_start(stream) > 0  # replaying from 0 alone could not rebuild it
    wait_until(lambda: checkpointed(solo, offset), 30, "a checkpoint")
    solo.kill()
    solo.restart().wait_ready(timeout=60)
    expect_and_converge([solo], acked)


def test_a_torn_checkpoint_is_ignored(replicas: Make, tmp_path: Path, stream: str) -> None:
    a = replicas("a", extra_env=FAST).wait_ready()
    b = replicas("b", [a], extra_env=FAST).wait_ready()
    acked: Dict[str, Dict[str, int]] = {}
    for i in range(200):
        offset = set_with_offset(a, {"user_id": f"t{i}", "spp": i})
        acked[f"t{i}"] = {"spp": i}
    wait_until(lambda: checkpointed(b, offset), 30, "b's checkpoint")
    b.stop()
    path = tmp_path / "gradesvc-data" / stream / "b" / f"checkpoint-%2F-{stream}.csv.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    b.restart().wait_ready(timeout=60)
    assert "is unusable" in b.log() and "ignoring it" in b.log()
    expect_and_converge([a, b], acked)
