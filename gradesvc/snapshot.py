"""The snapshot file format (``/backup``): produced and parsed in chunks.

A gzip'd CSV (RFC 4180 quoting, ``\\n`` line ends)::

    2026-11-23T12:00:00.123456Z                  generation time, RFC 3339 UTC
    stream_offset,41                             last stream offset applied (-1: none)
    user_id,postpaid_limit,spp,shipping_fee,return_fee,postpaid_limit_offset,...,return_fee_offset
    1,254,2321,20,29,17,17,17,40                 one row per user

The ``*_offset`` columns are each field's version (the stream offset of the
message that wrote it; -1: never written), so a loader merges rows with the
same rule as stream messages: the later offset wins.
"""

from __future__ import annotations

import csv
import io
import re
import struct
import zlib
from datetime import datetime, timezone
from typing import Iterable, Iterator, List, Optional

from gradesvc.storage import FIELDS, GradeStore

OFFSET_KEY = "stream_offset"
HEADER: List[str] = ["user_id", *FIELDS, *(f"{name}_offset" for name in FIELDS)]
ROWS_PER_CHUNK = 1000

# Rows are formatted and parsed by hand rather than through the csv module:
# a million rows are the measured hot path of /backup and bootstrap, and the
# general machinery costs twice as much.  The field order below is HEADER's.
if len(FIELDS) != 4:  # pragma: no cover - the contract fixes four fields
    raise ImportError("snapshot row format assumes four fields")
_needs_quotes = re.compile(r'[",\r\n]').search


class SnapshotError(ValueError):
    """A snapshot that does not follow the format."""


def rfc3339(moment: datetime) -> str:
    """``moment`` in UTC as ``2026-11-23T12:00:00.123456Z``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def csv_field(text: str) -> str:
    """``text`` as one CSV field, quoted only when RFC 4180 requires it."""
    if _needs_quotes(text):
        return '"' + text.replace('"', '""') + '"'
    return text


def format_rows(store: GradeStore, user_ids: Iterable[str]) -> str:
    """The CSV lines of these users (users no longer present are left out)."""
    packed = store.packed
    lines = []
    for user_id in user_ids:
        f = packed(user_id)
        if f is None:
            continue
        v1, v2, v3, v4, o1, o2, o3, o4 = f
        if not user_id.isalnum():  # most ids are; only the others need the regex
            user_id = csv_field(user_id)
        lines.append(f"{user_id},{v1},{v2},{v3},{v4},{o1},{o2},{o3},{o4}\n")
    return "".join(lines)


def snapshot_chunks(
    store: GradeStore,
    offset: int,
    generated: datetime,
    rows_per_chunk: int = ROWS_PER_CHUNK,
) -> Iterator[bytes]:
    """Yield the gzip'd snapshot a thousand rows at a time.

    The user ids are listed first (a list of references, not copies); each row
    is read when its chunk is produced, so memory does not grow with the data
    and concurrent writes never break the iteration.
    """
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    head = f"{rfc3339(generated)}\n{OFFSET_KEY},{offset}\n{','.join(HEADER)}\n"
    pending = compressor.compress(head.encode("utf-8"))
    user_ids = store.user_ids()
    for start in range(0, len(user_ids), rows_per_chunk):
        text = format_rows(store, user_ids[start:start + rows_per_chunk])
        data = pending + compressor.compress(text.encode("utf-8"))
        pending = b""
        if data:
            yield data
    yield pending + compressor.flush()


class SnapshotReader:
    """Parse a snapshot as its bytes arrive and merge each row into ``store``.

    Only complete records are parsed: a record ends at a newline outside
    quotes, so ``user_id`` values with newlines, commas and quotes survive.
    """

    def __init__(self, store: GradeStore) -> None:
        self.store = store
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
                raise SnapshotError("snapshot is not UTF-8") from None
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
        if self.offset is None or not self._header_seen or '"' in text:
            for record in csv.reader(io.StringIO(text, newline="")):
                self._record(record)
        else:
            # The hot path of a checkpoint or bootstrap: plain rows, parsed
            # and stored in one call each (GradeStore.load_lines).
            lines = text.split("\n")[:-1]
            try:
                self.store.load_lines(lines)
            except (ValueError, TypeError, struct.error):
                for line in lines:  # again, slowly, to say which row is wrong
                    self._apply(line.split(","))
                raise SnapshotError("malformed row") from None
            self.rows += len(lines)

    def _record(self, record: List[str]) -> None:
        if self.offset is None:
            if len(record) != 2 or record[0] != OFFSET_KEY:
                raise SnapshotError("second line must be stream_offset,N")
            try:
                self.offset = int(record[1])
            except ValueError:
                raise SnapshotError("second line must be stream_offset,N") from None
        elif not self._header_seen:
            if record[: len(HEADER)] != HEADER:
                raise SnapshotError(f"unexpected header {record!r}")
            self._header_seen = True
        else:
            self._apply(record)

    def _apply(self, r: List[str]) -> None:
        if len(r) != len(HEADER):
            raise SnapshotError(f"row of {len(r)} fields, not {len(HEADER)}: {r[:1]!r}")
        try:
            values = (int(r[1]), int(r[2]), int(r[3]), int(r[4]))
            offsets = (int(r[5]), int(r[6]), int(r[7]), int(r[8]))
        except ValueError:
            raise SnapshotError(f"row with a non-integer value: {r[:1]!r}") from None
        try:
            self.store.load(r[0], values, offsets)
        except struct.error:
            raise SnapshotError(f"row with a value out of range: {r[:1]!r}") from None
        self.rows += 1

    def finish(self) -> int:
        """Check the snapshot ended cleanly; return its stream offset."""
        if not self._decompressor.eof or self._pending or self._undecoded:
            raise SnapshotError("snapshot ended early")
        if self.offset is None or not self._header_seen:
            raise SnapshotError("snapshot has no header")
        return self.offset
