"""Checkpoints on a real disk: written atomically, loaded, and refused when torn."""

from __future__ import annotations

from pathlib import Path
from typing import Awaitable, Callable, Optional

import pytest
import pytest_twisted
from twisted.internet import reactor

from gradesvc.state.checkpoint import Checkpoints
from gradesvc.state.datadir import DataDir
from gradesvc.state.identity import Anchor, StreamId
from gradesvc.state.phase import Phase, ReplicaStatus
from gradesvc.state.retention import RetentionWatch
from gradesvc.state.store import GradeStore
from tests.conftest import LoggedErrors

STREAM = StreamId("/", "grades")
DIGEST = "cd" * 32


async def verified(anchor: Anchor) -> Optional[str]:
    return None


def replica(tmp_path: Path, users: int = 3000) -> Checkpoints:
    store = GradeStore()
    for i in range(users):
        store.apply_patch(f"u{i}", {"spp": i, "return_fee": -i}, i)
    store.apply_patch('odd "one",\n', {"postpaid_limit": 2**63 - 1}, users)
    status = ReplicaStatus(phase=Phase.READY, connected=True, applied_offset=users)
    return Checkpoints(store, status, DataDir(tmp_path / "data", STREAM, "r1"),
                       lambda: Anchor(status.applied_offset, DIGEST), verified,
                       clock=reactor, wall=lambda: 1_800_000_000.0)


def fresh(source: Checkpoints, verify: Callable[[Anchor], Awaitable[Optional[str]]] = verified,
          stream: StreamId = STREAM) -> Checkpoints:
    return Checkpoints(GradeStore(), ReplicaStatus(), DataDir(source.data_dir.path, stream, "r1"),
                       lambda: None, verify, clock=reactor, wall=lambda: 1_800_000_000.0)


@pytest_twisted.ensureDeferred
async def test_written_then_loaded_is_the_same_state(tmp_path: Path) -> None:
    source = replica(tmp_path)
    assert await source.write() == 3000
    assert source.path.name == "checkpoint-%2F-grades.csv.gz"
    assert source.path.exists() and [p.name for p in source.data_dir.path.iterdir()] == [source.path.name]
    assert await source.write() is None  # nothing changed since
    target = fresh(source)
    assert await target.load() == Anchor(3000, DIGEST)
    assert {u: target.store.get(u) for u in target.store} == {u: source.store.get(u) for u in source.store}


@pytest_twisted.ensureDeferred
async def test_no_checkpoint_while_loading(tmp_path: Path) -> None:
    source = replica(tmp_path)
    source.status.phase = Phase.LOADING_SNAPSHOT
    assert await source.write() is None and not source.path.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
@pytest_twisted.ensureDeferred
async def test_a_torn_or_corrupt_checkpoint_is_ignored(tmp_path: Path, damage: str,
                                                        logged_errors: LoggedErrors) -> None:
    source = replica(tmp_path)
    await source.write()
    data = source.path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data = data[:-40] + bytes(b ^ 0xFF for b in data[-40:-20]) + data[-20:]
    else:
        data = b""
    source.path.write_bytes(data)
    target = fresh(source)
    assert await target.load() is None
    assert len(target.store) == 0  # nothing of it was kept
    assert ["unusable" in e["log_format"] for e in logged_errors.flush()] == [True]


@pytest_twisted.ensureDeferred
async def test_no_file_is_no_checkpoint(tmp_path: Path) -> None:
    assert await fresh(replica(tmp_path)).load() is None


def test_retention_watch_warns_when_retention_nears_the_checkpoint(logged_errors: LoggedErrors) -> None:
    watch = RetentionWatch()
    watch.update(1000, 0)
    assert watch.margin == 1001 and watch.intervals is None
    watch.update(2000, 0)  # 1000 writes an interval, 2001 offsets of margin: 2 intervals
    assert watch.intervals == pytest.approx(2.001)
    watch.update(3000, 3500)
    assert watch.margin == -499
    assert [e["log_level"].name for e in logged_errors.flush()] == ["critical"]
