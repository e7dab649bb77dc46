"""The snapshot file format (``/backup``): produced and parsed in chunks.

A gzip'd CSV (RFC 4180 quoting, ``\\n`` line ends)::

    2026-11-23T12:00:00.123456Z                  generation time, RFC 3339 UTC
    stream_offset,41                             last stream offset applied (-1: none)
    user_id,postpaid_limit,spp,shipping_fee,return_fee,postpaid_limit_ts,postpaid_limit_replica,...
    1,254,2321,20,29,114...,replica-a,...        one row per user

The ``*_ts``/``*_replica`` columns are each field's version, so a loader merges
rows with the same last-writer-wins rule as stream messages.
"""

from __future__ import annotations

import csv
import io
import zlib
from datetime import datetime, timezone
from typing import Iterator, List, Optional, Sequence

from gradesvc.storage import FIELDS, GradeStore

OFFSET_KEY = "stream_offset"
HEADER: List[str] = ["user_id", *FIELDS]
for _name in FIELDS:
    HEADER += [f"{_name}_ts", f"{_name}_replica"]
ROWS_PER_CHUNK = 2000


class SnapshotError(ValueError):
    """A snapshot that does not follow the format."""


def rfc3339(moment: datetime) -> str:
    """``moment`` in UTC as ``2026-11-23T12:00:00.123456Z``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def snapshot_chunks(
    store: GradeStore,
    offset: int,
    generated: datetime,
    rows_per_chunk: int = ROWS_PER_CHUNK,
) -> Iterator[bytes]:
    """Yield the gzip'd snapshot a few thousand rows at a time.

    The user ids are listed first (a list of references, not copies); each row
    is read when its chunk is produced, so memory does not grow with the data
    and concurrent writes never break the iteration.
    """
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    buffer.write(rfc3339(generated) + "\n")
    writer.writerow([OFFSET_KEY, offset])
    writer.writerow(HEADER)
    user_ids = store.user_ids()
    row = store.row
    for start in range(0, len(user_ids), rows_per_chunk):
        writer.writerows(
            r for r in map(row, user_ids[start:start + rows_per_chunk]) if r is not None
        )
        data = compressor.compress(buffer.getvalue().encode("utf-8"))
        buffer.seek(0)
        buffer.truncate()
        if data:
            yield data
    yield compressor.compress(buffer.getvalue().encode("utf-8")) + compressor.flush()


class SnapshotReader:
    """Parse a snapshot as its bytes arrive and merge each row into ``store``.

    Only complete records are parsed: a record ends at a newline outside
    quotes, so ``user_id`` values with newlines, commas and quotes survive.
    """

    def __init__(self, store: GradeStore) -> None:
        self.store = store
        self.max_timestamp = 0
        self.generated: Optional[str] = None
        self.offset: Optional[int] = None
        self.rows = 0
        self._header_seen = False
        self._decompressor = zlib.decompressobj(31)
        self._pending = ""
        self._undecoded = b""

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the gzip stream."""
        raw = self._undecoded + self._decompressor.decompress(data)
        try:
            text = raw.decode("utf-8")
            self._undecoded = b""
        except UnicodeDecodeError as e:
            if len(raw) - e.start > 3:
                raise SnapshotError("snapshot is not UTF-8")
            text, self._undecoded = raw[: e.start].decode("utf-8"), raw[e.start:]
        self._pending += text
        cut = self._pending.rfind("\n")
        if cut < 0 or self._pending.count('"', 0, cut) % 2:
            return
        complete, self._pending = self._pending[: cut + 1], self._pending[cut + 1:]
        self._records(complete)

    def _records(self, text: str) -> None:
        if self.generated is None:
            line, _, text = text.partition("\n")
            self.generated = line
        for record in csv.reader(io.StringIO(text, newline="")):
            if self.offset is None:
                if len(record) != 2 or record[0] != OFFSET_KEY:
                    raise SnapshotError("second line must be stream_offset,N")
                self.offset = int(record[1])
            elif not self._header_seen:
                if record[: len(HEADER)] != HEADER:
                    raise SnapshotError(f"unexpected header {record!r}")
                self._header_seen = True
            else:
                self._apply(record)

    def _apply(self, record: Sequence[str]) -> None:
        if len(record) < len(HEADER):
            raise SnapshotError(f"short row {record[:1]!r}")
        updates = []
        n = len(FIELDS)
        for i in range(n):
            timestamp = int(record[1 + n + 2 * i])
            if timestamp:
                updates.append((i, int(record[1 + i]), timestamp, record[2 + n + 2 * i]))
                if timestamp > self.max_timestamp:
                    self.max_timestamp = timestamp
        self.store.merge(record[0], updates)
        self.rows += 1

    def finish(self) -> int:
        """Check the snapshot ended cleanly; return its stream offset."""
        if not self._decompressor.eof or self._pending or self._undecoded:
            raise SnapshotError("snapshot ended early")
        if self.offset is None or not self._header_seen:
            raise SnapshotError("snapshot has no header")
        return self.offset
