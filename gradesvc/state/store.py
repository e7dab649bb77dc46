"""In-memory grades with a version per field: the stream offset that wrote it.

The stream is the order.  Every write reaches every replica as one message
of the stream, and a field takes a message's value only when the message's
offset is greater than the offset that wrote the field's current value.  So
every replica, applying the same messages, ends in the same state whatever
their clocks say; applying a message twice, or an old one late, changes
nothing; partial writes merge (a field absent from a write keeps its value,
and its version); and snapshot rows, which carry the per-field offsets, merge
with replayed messages by the same rule.

Each user is one packed ``bytes`` value (four signed 64-bit values and four
64-bit offsets: 64 bytes), which keeps a million users near 200 bytes each
on CPython.
"""

from __future__ import annotations

import struct
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import attrs

FIELDS: Tuple[str, ...] = ("postpaid_limit", "spp", "shipping_fee", "return_fee")
FIELD_INDEX: Mapping[str, int] = {name: i for i, name in enumerate(FIELDS)}
NEVER = -1
"""The version of a field never written (stream offsets start at 0)."""
_N = len(FIELDS)
_RECORD = struct.Struct(f"<{_N}q{_N}q")
_EMPTY = _RECORD.pack(*([0] * _N), *([NEVER] * _N))
_EMPTY_FIELDS = _RECORD.unpack(_EMPTY)
_pack, _unpack = _RECORD.pack, _RECORD.unpack
if _N != 4:  # pragma: no cover - load_lines writes the four fields out
    raise ImportError("the record layout assumes four fields")


@attrs.frozen
class Grade:
    """One user's values and the stream offset that wrote each of them."""

    user_id: str
    values: Tuple[int, ...]
    offsets: Tuple[int, ...]


FieldUpdate = Tuple[int, int, int]
"""``(field_index, value, offset)``: one field's new value and version."""


class GradeStore:
    """All users' grades, keyed by ``user_id``."""

    def __init__(self) -> None:
        self._records: Dict[str, bytes] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._records

    def get(self, user_id: str) -> Optional[Grade]:
        """The user's grade, or None for a user never written."""
        record = self._records.get(user_id)
        if record is None:
            return None
        fields = _RECORD.unpack(record)
        return Grade(user_id, fields[:_N], fields[_N:])

    def values(self, user_id: str) -> Optional[Tuple[int, ...]]:
        """Just the four values (the hot path of ``GET /get``)."""
        record = self._records.get(user_id)
        if record is None:
            return None
        values: Tuple[int, ...] = _RECORD.unpack_from(record)[:_N]
        return values

    def merge(self, user_id: str, updates: Sequence[FieldUpdate]) -> int:
        """Apply the updates written at a later offset than the stored value.

        Returns how many fields changed.  A user appears once any update is
        offered, even if it carries no newer field.
        """
        fields = list(_RECORD.unpack(self._records.get(user_id, _EMPTY)))
        changed = 0
        for i, value, offset in updates:
            if offset > fields[_N + i]:
                fields[i] = value
                fields[_N + i] = offset
                changed += 1
        if changed or user_id not in self._records:
            self._records[user_id] = _RECORD.pack(*fields)
        return changed

    def apply_patch(self, user_id: str, patch: Mapping[str, int], offset: int) -> int:
        """Apply a partial write carried by the stream message at ``offset`` (the consumer's hot path: the
        merge of :meth:`merge` written out for a patch)."""
        records = self._records
        record = records.get(user_id)
        if record is None:  # a new user: every field of the patch is newer than never
            fields = list(_EMPTY_FIELDS)
            for name, value in patch.items():
                i = FIELD_INDEX[name]
                fields[i] = value
                fields[i + _N] = offset
            records[user_id] = _pack(*fields)
            return len(patch)
        fields = list(_unpack(record))
        changed = 0
        for name, value in patch.items():
            i = FIELD_INDEX[name]
            if offset > fields[i + _N]:
                fields[i] = value
                fields[i + _N] = offset
                changed += 1
        if changed:
            records[user_id] = _pack(*fields)
        return changed

    def apply_row(self, user_id: str, values: Sequence[Optional[int]], offset: int) -> int:
        """Apply the four values of a bulk write's row at ``offset`` (None: the row leaves the field alone)."""
        records = self._records
        record = records.get(user_id)
        fields = list(_unpack(record) if record is not None else _EMPTY_FIELDS)
        changed = 0
        for i in range(_N):
            value = values[i]
            if value is not None and offset > fields[i + _N]:
                fields[i] = value
                fields[i + _N] = offset
                changed += 1
        if changed or record is None:
            records[user_id] = _pack(*fields)
        return changed

    def packed(self, user_id: str) -> Optional[Tuple[int, ...]]:
        """The raw record: 4 values, then 4 offsets (the fast path of snapshots)."""
        record = self._records.get(user_id)
        if record is None:
            return None
        fields: Tuple[int, ...] = _RECORD.unpack(record)
        return fields

    def load(self, user_id: str, values: Sequence[int], offsets: Sequence[int]) -> int:
        """Merge a whole row (one value and offset per field), as snapshots hold.

        Equivalent to :meth:`merge` with every written field; a user not yet
        present is stored without comparing, the fast path of loading a
        snapshot into an empty store.
        """
        if user_id not in self._records:
            self._records[user_id] = _RECORD.pack(*values, *offsets)
            return _N
        return self.merge(
            user_id, [(i, values[i], offsets[i]) for i in range(_N) if offsets[i] != NEVER]
        )

    def load_lines(self, lines: Sequence[str]) -> None:
        """:meth:`load` of snapshot rows as text: ``user_id,4 values,4 offsets`` each.

        The hot path of a checkpoint or bootstrap, so the loop is written out
        here.  ``ValueError`` (or ``struct.error``) for a row that is not that;
        rows before it are loaded.
        """
        records = self._records
        pack = _RECORD.pack
        fields = 1 + 2 * _N
        for line in lines:
            r = line.split(",")
            if len(r) != fields:
                raise ValueError(f"row of {len(r)} fields")
            user_id = r[0]
            if user_id in records:
                numbers = [int(x) for x in r[1:]]
                self.load(user_id, numbers[:_N], numbers[_N:])
            else:
                records[user_id] = pack(int(r[1]), int(r[2]), int(r[3]), int(r[4]),
                                        int(r[5]), int(r[6]), int(r[7]), int(r[8]))

    def clear(self) -> None:
        """Forget every user (a load that turned out to be unusable)."""
        self._records.clear()

    def user_ids(self) -> List[str]:
        """A list of the user ids present now (for snapshots)."""
        return list(self._records)

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)
