"""An osiris chunk, as a ``Deliver`` frame carries it: its header checked, its records cut out.

A chunk (``osiris_log.erl``) is a 48-byte header, then (newer brokers) a
Bloom filter of the size its first reserved byte says, then the data: entries
that are single records (``[0:1 Size:31] Body``) or sub-entry batches
(``[1:1 Compression:3 Reserved:4] Records:u16 UncompressedSize:u32 Size:u32
Body``, the body a run of ``[Size:u32] Record``), then a trailer of tracking
data, which is not ours.  Offsets count records, not entries: the chunk's
first record is at ``ChunkFirstOffset``, the next at + 1, through a
sub-entry's records too.

The data's CRC-32 is checked before a single record is handed out; a chunk
that is truncated, fails its CRC, or does not hold as many records as its
header says is a :class:`ChunkError`, and nothing of it is used.  Chunk types
other than user data (tracking deltas and snapshots) occupy offsets and are
given with no records.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from typing import List

USER = 0
"""Chunk type of user data; 1 and 2 are tracking chunks."""
HEADER = struct.Struct(">BBHIqQQIIII")
"""magic and version, type, entries, records, timestamp, epoch, first offset, CRC, data size, trailer size,
reserved (its first byte: the Bloom filter's size)"""
MAGIC = 0x5
_U32 = struct.Struct(">I")
_SUB = struct.Struct(">BHII")
COMPRESSION_NONE = 0
COMPRESSION_GZIP = 1
COMPRESSION_NAMES = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


class ChunkError(Exception):
    """A chunk that cannot be trusted: truncated, a bad CRC, or records that do not add up."""


class Chunk:
    """One chunk: where it starts in the stream, what kind it is, its records in offset order."""

    __slots__ = ("kind", "first_offset", "record_count", "timestamp", "epoch", "records")

    def __init__(self, kind: int, first_offset: int, record_count: int, timestamp: int, epoch: int,
                 records: List[bytes]) -> None:
        self.kind = kind
        self.first_offset = first_offset
        self.record_count = record_count
        """Offsets the chunk occupies (its records, for a user chunk)."""
        self.timestamp = timestamp
        """When the broker wrote it, in milliseconds since the epoch."""
        self.epoch = epoch
        self.records = records
        """The user records, the first at :attr:`first_offset` (empty for a tracking chunk)."""

    @property
    def next_offset(self) -> int:
        """The offset just after this chunk."""
        return self.first_offset + self.record_count

    def __repr__(self) -> str:
        return f"Chunk(kind={self.kind}, first_offset={self.first_offset}, records={self.record_count})"


def parse_chunk(data: bytes, position: int = 0) -> Chunk:
    """The chunk at ``position`` in ``data`` (a ``Deliver`` frame's bytes after its subscription id)."""
    if len(data) - position < HEADER.size:
        raise ChunkError("truncated chunk header")
    (magic_version, kind, entries, record_count, timestamp, epoch, first, crc, size, _trailer,
     reserved) = HEADER.unpack_from(data, position)
    if magic_version >> 4 != MAGIC:
        raise ChunkError(f"not a chunk (magic {magic_version >> 4:#x})")
    start = position + HEADER.size + (reserved >> 24)
    end = start + size
    if end > len(data):
        raise ChunkError(f"chunk at offset {first} truncated: {len(data) - start} of {size} data bytes")
    body = data[start:end]
    if zlib.crc32(body) != crc:
        raise ChunkError(f"chunk at offset {first}: CRC mismatch")
    if kind != USER:
        return Chunk(kind, first, record_count, timestamp, epoch, [])
    records = _records(body, entries)
    if len(records) != record_count:
        raise ChunkError(f"chunk at offset {first} holds {len(records)} records, its header says {record_count}")
    return Chunk(kind, first, record_count, timestamp, epoch, records)


def _records(body: bytes, entries: int) -> List[bytes]:
    records: List[bytes] = []
    append = records.append
    unpack = _U32.unpack_from
    position, end = 0, len(body)
    try:
        for _ in range(entries):
            header = unpack(body, position)[0]
            if header & 0x80000000 == 0:
                position += 4
                stop = position + header
                if stop > end:
                    raise ChunkError("an entry runs past the chunk's data")
                append(body[position:stop])
                position = stop
                continue
            kind, count, uncompressed, size = _SUB.unpack_from(body, position)
            position += _SUB.size
            stop = position + size
            if stop > end:
                raise ChunkError("a sub-entry batch runs past the chunk's data")
            records.extend(_sub_records(body[position:stop], (kind >> 4) & 0x7, count, uncompressed))
            position = stop
    except struct.error as e:
        raise ChunkError("an entry header runs past the chunk's data") from e
    if position != end:
        raise ChunkError(f"{end - position} bytes after the chunk's last entry")
    return records


def _sub_records(batch: bytes, compression: int, count: int, uncompressed: int) -> List[bytes]:
    if compression == COMPRESSION_GZIP:
        try:
            batch = gzip.decompress(batch)
        except (OSError, EOFError, zlib.error) as e:
            raise ChunkError(f"a gzip sub-entry batch that does not decompress: {e}") from e
    elif compression != COMPRESSION_NONE:
        name = COMPRESSION_NAMES.get(compression, str(compression))
        raise ChunkError(f"a sub-entry batch compressed with {name}, which this client does not read")
    if len(batch) != uncompressed:
        raise ChunkError(f"a sub-entry batch of {len(batch)} bytes, its header says {uncompressed}")
    records: List[bytes] = []
    position, end = 0, len(batch)
    unpack = _U32.unpack_from
    for _ in range(count):
        if end - position < 4:
            raise ChunkError("a sub-entry batch holds fewer records than it says")
        size = unpack(batch, position)[0] & 0x7FFFFFFF
        position += 4
        if position + size > end:
            raise ChunkError("a record runs past its sub-entry batch")
        records.append(batch[position:position + size])
        position += size
    if position != end:
        raise ChunkError("bytes after a sub-entry batch's last record")
    return records


def build_chunk(first_offset: int, entries: List[List[bytes]], kind: int = USER, timestamp: int = 0,
                epoch: int = 1, compression: int = COMPRESSION_NONE, filter_size: int = 0,
                trailer: bytes = b"") -> bytes:
    """A chunk as osiris writes it (for tests and fakes): each entry a single record (a list of one)
    or a sub-entry batch (several, or one with ``compression``)."""
    parts: List[bytes] = []
    records = 0
    for entry in entries:
        records += len(entry)
        if len(entry) == 1 and compression == COMPRESSION_NONE:
            parts.append(_U32.pack(len(entry[0])) + entry[0])
            continue
        raw = b"".join(_U32.pack(len(r)) + r for r in entry)
        packed = gzip.compress(raw) if compression == COMPRESSION_GZIP else raw
        parts.append(_SUB.pack(0x80 | (compression << 4), len(entry), len(raw), len(packed)) + packed)
    data = b"".join(parts)
    header = HEADER.pack((MAGIC << 4) | 1, kind, len(entries), records, timestamp, epoch, first_offset,
                         zlib.crc32(data), len(data), len(trailer), filter_size << 24)
    return header + b"\x00" * filter_size + data + trailer
