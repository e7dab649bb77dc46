"""The snapshot format: produced in chunks, parsed in arbitrary pieces."""

from __future__ import annotations

import gzip
import re
from datetime import datetime, timezone

import pytest

from gradesvc.state.identity import Anchor, RowCheck, StateIdentity, StreamId
from gradesvc.state.snapshot import HEADER, SnapshotError, SnapshotReader, snapshot_chunks
from gradesvc.state.store import Grade, GradeStore

DIGEST = "ab" * 32
STREAM = StreamId("/", "grades")
AWKWARD = ["1", "a,b", 'quote"d', "new\nline", "cr\rlf\r\n", "ünïcødé 名", " spaced "]


def make_store() -> GradeStore:
    store = GradeStore()
    for i, user in enumerate(AWKWARD):
        store.apply_patch(user, {"spp": i, "return_fee": -i}, 100 + i)
    store.apply_patch("1", {"postpaid_limit": 2**63 - 1}, 500)
    return store


def dump(store: GradeStore, offset: int = 41, rows: int = 2) -> bytes:
    when = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=timezone.utc)
    identity = StateIdentity(STREAM, Anchor(offset, DIGEST))
    return b"".join(snapshot_chunks(store, identity, when, rows_per_chunk=rows))


def test_file_layout() -> None:
    text = gzip.decompress(dump(make_store())).decode()
    lines = text.split("\n")
    assert lines[0] == "2026-11-23T12:00:00.123456Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", lines[0])
    assert lines[1] == "stream_offset,41"
    assert lines[2:5] == ["stream_vhost,/", "stream_name,grades", f"anchor_sha256,{DIGEST}"]
    assert lines[5].split(",")[:5] == ["user_id", "postpaid_limit", "spp", "shipping_fee", "return_fee"]
    assert lines[5] == ",".join(HEADER)


@pytest.mark.parametrize("piece", [1, 7, 64, 10_000])
def test_round_trip_in_pieces(piece: int) -> None:
    source = make_store()
    data = dump(source)
    target = GradeStore()
    reader = SnapshotReader(target)
    for i in range(0, len(data), piece):
        reader.feed(data[i:i + piece])
    assert reader.finish() == StateIdentity(STREAM, Anchor(41, DIGEST))
    assert reader.rows == len(AWKWARD)
    assert {u: target.get(u) for u in target} == {u: source.get(u) for u in source}
    assert target.get("1") == Grade("1", (2**63 - 1, 0, 0, 0), (500, 100, -1, 100))


def test_truncated_snapshot_is_detected() -> None:
    data = dump(make_store())
    reader = SnapshotReader(GradeStore())
    reader.feed(data[: len(data) // 2])
    with pytest.raises(SnapshotError):
        reader.finish()


def test_garbage_header_is_rejected() -> None:
    reader = SnapshotReader(GradeStore())
    with pytest.raises(SnapshotError):
        reader.feed(gzip.compress(b"2026\nnot,an,offset\n"))


def test_merging_a_snapshot_keeps_newer_local_values() -> None:
    target = GradeStore()
    target.apply_patch("1", {"spp": 99}, 10_000)
    reader = SnapshotReader(target)
    reader.feed(dump(make_store()))
    reader.finish()
    assert target.values("1") == (2**63 - 1, 99, 0, 0)


def test_plain_and_quoted_rows_in_one_chunk_round_trip() -> None:
    source = GradeStore()
    for i in range(500):
        source.apply_patch(str(i), {"postpaid_limit": i, "spp": -i}, 1000 + i)
    source.apply_patch('in "the" middle,\n', {"shipping_fee": 7}, 5)
    data = dump(source, rows=10_000)
    target = GradeStore()
    reader = SnapshotReader(target)
    for i in range(0, len(data), 333):
        reader.feed(data[i:i + 333])
    reader.finish()
    assert reader.rows == 501
    assert {u: target.get(u) for u in target} == {u: source.get(u) for u in source}


@pytest.mark.parametrize("row", [
    "1,2,3,4,5,6,7,8",  # a field short
    "1,2,3,4,5,6,7,8,9,extra",
    "1,x,3,4,5,6,7,8,9",  # not an integer
    "1,2,3,4,5,6,7,8,a",
])
def test_malformed_rows_are_rejected(row: str) -> None:
    header = ",".join(HEADER)
    body = f"2026-11-23T12:00:00.000000Z\nstream_offset,3\n{header}\n{row}\n".encode()
    reader = SnapshotReader(GradeStore())
    with pytest.raises(SnapshotError):
        reader.feed(gzip.compress(body))


def test_loading_a_row_follows_the_merge_rule() -> None:
    store = GradeStore()
    store.apply_patch("u", {"spp": 50}, 100)
    store.load("u", (1, 2, 3, 4), (10, 10, -1, 200))
    assert store.values("u") == (1, 50, 0, 4)
    assert store.get("u") == Grade("u", (1, 50, 0, 4), (10, 100, -1, 200))
    store.load("new", (1, 2, 3, 4), (10, 11, 12, 13))
    assert store.get("new") == Grade("new", (1, 2, 3, 4), (10, 11, 12, 13))


def test_rows_wait_outside_the_store_until_the_head_is_accepted() -> None:
    data = dump(make_store())
    target = GradeStore()
    reader = SnapshotReader(target, hold=True)
    for i in range(0, len(data), 5):
        reader.feed(data[i:i + 5])
    assert reader.waiting and reader.identity == StateIdentity(STREAM, Anchor(41, DIGEST))
    assert len(target) == 0 and reader.rows == 0
    reader.release()
    assert reader.finish() == StateIdentity(STREAM, Anchor(41, DIGEST))
    assert len(target) == len(AWKWARD) and not reader.waiting


def test_rows_never_released_are_no_snapshot() -> None:
    reader = SnapshotReader(GradeStore(), hold=True)
    reader.feed(dump(make_store()))
    with pytest.raises(SnapshotError):
        reader.finish()


def test_a_previous_release_snapshot_is_checked_by_its_newest_field() -> None:
    header = ",".join(HEADER)
    rows = ["a,1,2,3,4,5,6,7,8", "b,10,20,30,40,9,-1,12,-1", "c,0,0,0,0,-1,-1,-1,-1"]
    body = "\n".join(["2026-11-23T12:00:00.000000Z", "stream_offset,15", header, *rows]) + "\n"
    reader = SnapshotReader(GradeStore(), hold=True)
    reader.feed(gzip.compress(body.encode()))
    assert reader.identity == StateIdentity(None, Anchor(15))
    reader.release()
    assert reader.finish() == StateIdentity(None, Anchor(15, row=RowCheck(12, "b", "shipping_fee", 30)))


@pytest.mark.parametrize("head, complaint", [
    ("stream_vhost,/\nstream_name,g\n", "incomplete stream identity"),
    ("stream_vhost,/\nstream_name,g\nanchor_sha256,xyz\n", "not a SHA-256"),
    ("stream_name,g\nstream_name,h\n", "unexpected line"),
    ("Stream_Name,g\n", "unexpected line"),
])
def test_a_bad_identity_is_refused(head: str, complaint: str) -> None:
    body = f"2026-11-23T12:00:00.000000Z\nstream_offset,3\n{head}{','.join(HEADER)}\n"
    reader = SnapshotReader(GradeStore(), hold=True)
    with pytest.raises(SnapshotError, match=complaint):
        reader.feed(gzip.compress(body.encode()))


def test_a_later_release_key_is_ignored() -> None:
    head = f"stream_vhost,v\nstream_name,\"a,b\"\nanchor_sha256,{DIGEST}\nstream_epoch,7\n"
    body = f"2026-11-23T12:00:00.000000Z\nstream_offset,3\n{head}{','.join(HEADER)}\n"
    reader = SnapshotReader(GradeStore())
    reader.feed(gzip.compress(body.encode()))
    assert reader.finish() == StateIdentity(StreamId("v", "a,b"), Anchor(3, DIGEST))


def test_a_head_that_never_ends_is_refused() -> None:
    head = "".join(f"key_{i},v\n" for i in range(1000))
    reader = SnapshotReader(GradeStore(), hold=True)
    with pytest.raises(SnapshotError, match="more than 32 lines"):
        reader.feed(gzip.compress(f"2026-11-23T12:00:00.000000Z\nstream_offset,3\n{head}".encode()))
