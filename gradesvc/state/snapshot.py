"""The snapshot file format (``/backup``): produced and parsed in chunks.

A gzip'd CSV (RFC 4180 quoting, ``\\n`` line ends)::

    2026-11-23T12:00:00.123456Z                  generation time, RFC 3339 UTC
    stream_offset,41                             last stream offset applied (-1: none)
    stream_vhost,/                               the stream's virtual host
    stream_name,user_grades                      the stream's name
    anchor_sha256,9f86d0...                      SHA-256 of the message body at stream_offset
    user_id,postpaid_limit,spp,shipping_fee,return_fee,postpaid_limit_offset,...,return_fee_offset
    1,254,2321,20,29,17,17,17,40                 one row per user

The ``*_offset`` columns are each field's version (the stream offset of the
message that wrote it; -1: never written), so a loader merges rows with the
same rule as stream messages: the later offset wins.  The three identity
lines (:mod:`gradesvc.state.identity`) say which stream and which life of it the
rows belong to; files of the previous release lack them.  A reader holds the
rows back until its owner has checked that identity (:meth:`SnapshotReader.release`),
so no row of a foreign state ever reaches the store.
"""

from __future__ import annotations

import csv
import io
import re
import struct
import zlib
from datetime import datetime, timezone
from typing import Dict, Iterable, Iterator, List, Optional

from gradesvc.state.identity import DIGEST_PATTERN, Anchor, RowCheck, StateIdentity, StreamId
from gradesvc.state.store import FIELDS, GradeStore

OFFSET_KEY = "stream_offset"
VHOST_KEY = "stream_vhost"
NAME_KEY = "stream_name"
DIGEST_KEY = "anchor_sha256"
IDENTITY_KEYS = (VHOST_KEY, NAME_KEY, DIGEST_KEY)
MAX_HEAD_LINES = 32
"""``key,value`` lines a reader takes before the column header (a peer may be hostile)."""
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


def snapshot_head(identity: StateIdentity, generated: datetime) -> str:
    """The lines before the rows: time, offset, identity, column header."""
    anchor, stream = identity.anchor, identity.stream
    lines = [rfc3339(generated), f"{OFFSET_KEY},{anchor.offset}"]
    if stream is not None:
        lines += [f"{VHOST_KEY},{csv_field(stream.vhost)}", f"{NAME_KEY},{csv_field(stream.name)}"]
    if anchor.sha256 is not None:
        lines.append(f"{DIGEST_KEY},{anchor.sha256}")
    lines.append(",".join(HEADER))
    return "\n".join(lines) + "\n"


def snapshot_chunks(
    store: GradeStore,
    identity: StateIdentity,
    generated: datetime,
    rows_per_chunk: int = ROWS_PER_CHUNK,
) -> Iterator[bytes]:
    """Yield the gzip'd snapshot of a state with ``identity``, a thousand rows at a time.

    The user ids are listed first (a list of references, not copies); each row
    is read when its chunk is produced, so memory does not grow with the data
    and concurrent writes never break the iteration.
    """
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    pending = compressor.compress(snapshot_head(identity, generated).encode("utf-8"))
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
    With ``hold``, rows wait (unparsed, outside the store) from the column
    header on until :meth:`release`: :attr:`identity` is known by then, so the
    owner checks it before a single row is stored.
    """

    def __init__(self, store: GradeStore, hold: bool = False) -> None:
        self.store = store
        self.generated: Optional[str] = None
        self.offset: Optional[int] = None
        self.identity: Optional[StateIdentity] = None
        """What the head declares; set when the column header is read."""
        self.rows = 0
        self._meta: Dict[str, str] = {}
        self._released = not hold
        self._held: List[str] = []
        self._newest: Optional[RowCheck] = None
        self._decompressor = zlib.decompressobj(31)
        self._pending = ""
        self._undecoded = b""

    @property
    def waiting(self) -> bool:
        """The head is read and the rows wait for :meth:`release`."""
        return self.identity is not None and not self._released

    def release(self) -> None:
        """The identity is accepted: store the rows held so far, and the rest as they come."""
        self._released = True
        held, self._held = "".join(self._held), []
        if held:
            self._rows(held)

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
        if self.identity is None:
            complete = self._head(complete)
        if self._released:
            self._rows(complete)
        elif complete:
            self._held.append(complete)

    def _head(self, text: str) -> str:
        """Parse head lines up to the column header; return the text after them."""
        if self.generated is None:
            line, _, text = text.partition("\n")
            self.generated = line
        buffer = io.StringIO(text, newline="")
        records = csv.reader(buffer)
        while self.identity is None:
            record = next(records, None)
            if record is None:
                return ""
            self._head_record(record)
        return text[buffer.tell():]

    def _head_record(self, record: List[str]) -> None:
        if self.offset is None:
            if len(record) != 2 or record[0] != OFFSET_KEY:
                raise SnapshotError("second line must be stream_offset,N")
            try:
                self.offset = int(record[1])
            except ValueError:
                raise SnapshotError("second line must be stream_offset,N") from None
        elif record[: len(HEADER)] == HEADER:
            self.identity = self._declared_identity(self.offset)
        elif len(record) == 2 and _META_KEY(record[0]) and record[0] not in self._meta:
            if len(self._meta) >= MAX_HEAD_LINES:
                raise SnapshotError(f"more than {MAX_HEAD_LINES} lines before the header")
            self._meta[record[0]] = record[1]  # unknown keys are a later release's: ignored
        else:
            raise SnapshotError(f"unexpected line before the header: {record[:1]!r}")

    def _declared_identity(self, offset: int) -> StateIdentity:
        present = [key for key in IDENTITY_KEYS if key in self._meta]
        if not present:
            return StateIdentity(None, Anchor(offset))
        if len(present) != len(IDENTITY_KEYS):
            raise SnapshotError(f"incomplete stream identity: only {', '.join(present)}")
        digest = self._meta[DIGEST_KEY]
        if not DIGEST_PATTERN.fullmatch(digest):
            raise SnapshotError("anchor_sha256 is not a SHA-256 in hex")
        return StateIdentity(StreamId(self._meta[VHOST_KEY], self._meta[NAME_KEY]), Anchor(offset, digest))

    def _rows(self, text: str) -> None:
        legacy = self.identity is not None and self.identity.stream is None
        if '"' in text:
            for record in csv.reader(io.StringIO(text, newline="")):
                self._apply(record)
            return
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
        if legacy:
            for line in lines:
                self._note_newest(line.split(","))

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
        if self.identity is not None and self.identity.stream is None:
            self._note_newest(r)

    def _note_newest(self, r: List[str]) -> None:
        """A previous release's file: remember the field written last, to check it in the stream."""
        offsets = [int(x) for x in r[5:9]]
        newest = max(offsets)
        if newest >= 0 and (self._newest is None or newest > self._newest.offset):
            i = offsets.index(newest)
            self._newest = RowCheck(newest, r[0], FIELDS[i], int(r[1 + i]))

    def finish(self) -> StateIdentity:
        """Check the snapshot ended cleanly; return its identity.

        For a previous release's file (no identity lines) the anchor carries the
        row check of the newest field instead of a digest (none when no field was
        ever written at or before the file's offset).
        """
        if not self._decompressor.eof or self._pending or self._undecoded:
            raise SnapshotError("snapshot ended early")
        if self.identity is None or self.offset is None:
            raise SnapshotError("snapshot has no header")
        if self._held:
            raise SnapshotError("snapshot rows were never released")
        if self.identity.stream is None:
            row = self._newest if self._newest is not None and self._newest.offset <= self.offset else None
            return StateIdentity(None, Anchor(self.offset, row=row))
        return self.identity


_META_KEY = re.compile(r"[a-z0-9_]{1,64}").fullmatch
