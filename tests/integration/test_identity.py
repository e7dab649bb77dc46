"""State knows its stream: the operator's day with real replicas on the shared broker.

Each test plays one scenario of issue 17: a replica pointed at another
stream over the same disk, a stream deleted and declared again while a
replica is down (before and after the new stream grows past the old
checkpoint), a peer serving another stream, two processes on one data dir,
and a previous release's checkpoint.  In each the replica ends ready with
exactly its own stream's acknowledged writes, or says why it cannot.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest

from harness.broker import BROKER_URL, delete_stream, unique_stream
from harness.net import wait_until
from harness.replica import GradeReplica, set_with_offset
from tests.integration.test_replication import expect_and_converge

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stream_protocol")]

Make = Callable[..., GradeReplica]
FAST = {"GRADESVC_CHECKPOINT_INTERVAL": "0.5"}


@pytest.fixture
def other_stream() -> Iterator[str]:
    name = unique_stream()
    yield name
    delete_stream(name, BROKER_URL)


def checkpoint_file(data_dir: Path, stream: str) -> Path:
    return data_dir / f"checkpoint-%2F-{stream}.csv.gz"


def write(replica: GradeReplica, prefix: str, count: int, acked: Dict[str, Dict[str, int]]) -> int:
    offset = -1
    for i in range(count):
        offset = set_with_offset(replica, {"user_id": f"{prefix}{i}", "spp": i})
        acked[f"{prefix}{i}"] = {"spp": i}
    return offset


def checkpointed(replica: GradeReplica, offset: int) -> None:
    wait_until(lambda: replica.metric("gradesvc_checkpoint_offset") >= offset, 30, f"{replica.name}'s checkpoint")


def holds_exactly(replica: GradeReplica, acked: Dict[str, Dict[str, int]], foreign: List[str]) -> None:
    assert replica.metric("gradesvc_users") == len(acked)
    for user in foreign:
        assert replica.get(user)[0] == 404, user


def refusals(replica: GradeReplica) -> List[str]:
    return [line for line in replica.log().splitlines() if "Refusing" in line]


def test_another_streams_checkpoint_on_the_same_disk_is_never_loaded(
        replicas: Make, stream: str, other_stream: str, tmp_path: Path) -> None:
    shared = tmp_path / "shared-data"
    env = {**FAST, "GRADESVC_DATA_DIR": str(shared)}
    first = replicas("a", extra_env=env).wait_ready()
    checkpointed(first, write(first, "old", 30, {}))
    first.stop()
    # The same replica id and data dir on another stream: its own checkpoint name, nothing loaded.
    second = replicas("a", stream=other_stream, extra_env=env).wait_ready(timeout=60)
    acked: Dict[str, Dict[str, int]] = {}
    write(second, "new", 5, acked)
    holds_exactly(second, acked, ["old0", "old29"])
    assert checkpoint_file(shared, stream).exists()  # the first stream's checkpoint is left alone
    second.stop()
    # Someone copies the first stream's checkpoint over the second's: refused by its identity.
    shutil.copy(checkpoint_file(shared, stream), checkpoint_file(shared, other_stream))
    second.restart().wait_ready(timeout=60)
    holds_exactly(second, acked, ["old0", "old29"])
    [line] = refusals(second)[-1:]
    assert stream in line and other_stream in line  # both identities named
    assert second.ready()["state_refused"]["source"] == "checkpoint"
    assert list(shared.glob(f"checkpoint-%2F-{other_stream}.csv.gz.refused-*"))  # kept aside


def test_a_stream_recreated_while_replicas_are_down(replicas: Make, stream: str) -> None:
    a = replicas("a", extra_env=FAST).wait_ready()
    b = replicas("b", [a], extra_env=FAST).wait_ready()
    c = replicas("c", [a], extra_env=FAST).wait_ready()
    old = write(a, "old", 150, {})
    checkpointed(b, old)
    checkpointed(c, old)
    b.stop()
    c.stop()
    delete_stream(stream)  # a sees its consumer cancelled, declares the stream again, refuses its state
    wait_until(lambda: "state_refused" in a.ready() and a.ready()["ready"], 60, "a to rebuild on the new stream")
    acked: Dict[str, Dict[str, int]] = {}
    write(a, "new", 20, acked)
    holds_exactly(a, acked, ["old0", "old149"])
    # b's checkpoint reaches past the new stream's end: refused, rebuilt from a.
    b.restart().wait_ready(timeout=60)
    assert refusals(b) and "ends before offset" in refusals(b)[-1]
    expect_and_converge([a, b], acked)
    holds_exactly(b, acked, ["old0", "old149"])
    # The new stream grows past the old checkpoint's offset: c's anchor names another message.
    newer = write(a, "more", 200, acked)
    assert newer > old
    c.restart().wait_ready(timeout=60)
    assert refusals(c) and ("another message" in refusals(c)[-1] or "holds no message" in refusals(c)[-1])
    expect_and_converge([a, b, c], acked)
    holds_exactly(c, acked, ["old0", "old149"])
    assert ".refused-" in c.ready()["state_refused"]["moved_to"]


def test_a_peer_of_another_stream_is_refused_at_its_header(
        replicas: Make, stream: str, other_stream: str) -> None:
    staging = replicas("staging", stream=other_stream).wait_ready()
    write(staging, "staged", 80, {})
    prod = replicas("prod", [staging]).wait_ready(timeout=60)
    acked: Dict[str, Dict[str, int]] = {}
    write(prod, "p", 3, acked)
    holds_exactly(prod, acked, ["staged0", "staged79"])
    assert prod.ready()["state_refused"]["source"] == f"peer {staging.read_url}"
    refused = [line for line in prod.log().splitlines() if "Refusing the snapshot of peer" in line]
    assert len(refused) == 1 and other_stream in refused[0] and staging.read_url in refused[0]
    assert prod.metric("gradesvc_bootstrap_rows_loaded") == 0  # not a row of it was stored


def test_two_processes_on_one_data_dir(replicas: Make, stream: str, tmp_path: Path) -> None:
    a = replicas("a").wait_ready()
    # The same replica id and stream from the same working directory: the same default data dir.
    twin = replicas("a")
    assert twin.process is not None
    assert twin.process.wait(30) != 0
    [line] = [line for line in twin.log().splitlines() if "is in use by" in line]
    assert f"process {a.process.pid}" in line  # type: ignore[union-attr]
    assert a.ready()["ready"]
    # Other replica ids in the same directory are other data dirs: they run side by side.
    replicas("b", [a]).wait_ready()


def test_a_previous_release_checkpoint_is_adopted_only_when_the_stream_confirms_it(
        replicas: Make, stream: str, tmp_path: Path) -> None:
    a = replicas("a", extra_env=FAST).wait_ready()
    acked: Dict[str, Dict[str, int]] = {}
    checkpointed(a, write(a, "u", 40, acked))
    a.stop()
    data_dir = tmp_path / "gradesvc-data" / stream / "a"
    current = checkpoint_file(data_dir, stream)
    lines = gzip.decompress(current.read_bytes()).decode().split("\n")
    legacy_lines = [lines[0], lines[1], *lines[5:]]  # the previous release: no identity lines
    legacy = data_dir / "checkpoint-a.csv.gz"
    legacy.write_bytes(gzip.compress("\n".join(legacy_lines).encode()))
    current.unlink()
    a.restart().wait_ready(timeout=60)
    assert "of the previous release verified" in a.log()
    assert current.exists() and not legacy.exists()  # adopted under the new name
    expect_and_converge([a], acked)
    a.stop()
    # A legacy file whose newest row the stream does not confirm is moved aside, not loaded.
    forged = [*legacy_lines[:3], *(line.replace(",39,", ",12345,", 1) for line in legacy_lines[3:])]
    legacy.write_bytes(gzip.compress("\n".join(forged).encode()))
    current.unlink()
    a.restart().wait_ready(timeout=60)
    assert refusals(a) and "previous release" in refusals(a)[-1]
    assert list(data_dir.glob("checkpoint-a.csv.gz.refused-*"))
    expect_and_converge([a], acked)  # rebuilt from the stream, which still holds its start


def test_a_stalled_phase_says_why(tmp_path: Path, stream: str) -> None:
    """A broker that never answers: /ready names what the replica waits for, within seconds."""
    dead = GradeReplica(tmp_path, stream, "lonely", amqp_url="amqp://guest:guest@127.0.0.1:9/%2F?stream_port=9")
    dead.start()
    try:
        def stalled() -> bool:
            try:
                return "stalled" in dead.ready()
            except OSError:
                return False
        wait_until(stalled, 30, "the stall to be reported")
        report = dead.ready()["stalled"]
        assert report["waiting_for"] and report["seconds"] >= 10 and not dead.ready()["ready"]
        assert "No progress for" in dead.log()
    finally:
        dead.stop()
