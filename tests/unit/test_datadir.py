"""The data directory: one process at a time, the stream in the checkpoint's name, refused files kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gradesvc.state.datadir import DataDir, DataDirInUse, default_data_dir
from gradesvc.state.identity import StreamId

STREAM = StreamId("/", "user_grades")


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    first = DataDir(tmp_path / "d", STREAM, "a")
    first.lock()
    second = DataDir(tmp_path / "d", StreamId("/", "other"), "b")
    with pytest.raises(DataDirInUse, match=f"in use by process {os.getpid()} \\(replica 'a'"):
        second.lock()
    first.unlock()
    second.lock()  # free again once the first lets go (or its process dies)
    second.unlock()


def test_names_carry_the_stream() -> None:
    data = DataDir(Path("x"), StreamId("prod/eu", "grades v2"), "r1", [Path("old")])
    assert data.checkpoint == Path("x/checkpoint-prod%2Feu-grades%20v2.csv.gz")
    assert data.legacy_checkpoints == [Path("x/checkpoint-r1.csv.gz"), Path("old/checkpoint-r1.csv.gz")]
    assert default_data_dir("user_grades", "host/1") == str(Path("gradesvc-data/user_grades/host%2F1"))


def test_a_refused_file_is_moved_aside_never_deleted(tmp_path: Path) -> None:
    data = DataDir(tmp_path, STREAM, "a")
    data.checkpoint.write_bytes(b"state")
    target = data.move_aside(data.checkpoint)
    assert target is not None and target.read_bytes() == b"state" and not data.checkpoint.exists()
    assert target.name.startswith(data.checkpoint.name + ".refused-")
    assert data.move_aside(data.checkpoint) is None  # nothing there: nothing moved
