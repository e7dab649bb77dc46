"""In-memory grades with a version per field, merged last-writer-wins.

Each user is one packed ``bytes`` value (four signed 64-bit values, four 64-bit
hybrid-logical-clock timestamps and four 16-bit replica indexes: 72 bytes),
which keeps a million users near 200 bytes each on CPython.

A field changes only when the incoming version ``(timestamp, replica_id)`` is
greater than the stored one.  The same rule applies local writes, other
replicas' messages, snapshot rows and replays, so applying anything twice, or
late, changes nothing, and every replica converges to the same state.
"""

from __future__ import annotations

import struct
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import attrs

FIELDS: Tuple[str, ...] = ("postpaid_limit", "spp", "shipping_fee", "return_fee")
FIELD_INDEX: Mapping[str, int] = {name: i for i, name in enumerate(FIELDS)}
_N = len(FIELDS)
_RECORD = struct.Struct(f"<{_N}q{_N}Q{_N}H")
_EMPTY = _RECORD.pack(*([0] * (3 * _N)))

Version = Tuple[int, str]
"""``(hlc_timestamp, replica_id)``; ``(0, "")`` means never written."""


@attrs.frozen
class Grade:
    """One user's values and the version of each field."""

    user_id: str
    values: Tuple[int, ...]
    versions: Tuple[Version, ...]


FieldUpdate = Tuple[int, int, int, str]
"""``(field_index, value, timestamp, replica)``: one field's new value and version."""


class GradeStore:
    """All users' grades, keyed by ``user_id``."""

    def __init__(self) -> None:
        self._records: Dict[str, bytes] = {}
        self._replicas: List[str] = [""]
        self._replica_index: Dict[str, int] = {"": 0}

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._records

    def _intern(self, replica: str) -> int:
        index = self._replica_index.get(replica)
        if index is None:
            index = len(self._replicas)
            if index > 0xFFFF:
                raise ValueError("too many distinct replica ids")
            self._replicas.append(replica)
            self._replica_index[replica] = index
        return index

    def get(self, user_id: str) -> Optional[Grade]:
        """The user's grade, or None for a user never written."""
        record = self._records.get(user_id)
        if record is None:
            return None
        fields = _RECORD.unpack(record)
        names = self._replicas
        versions = tuple(
            (fields[_N + i], names[fields[2 * _N + i]]) for i in range(_N)
        )
        return Grade(user_id, fields[:_N], versions)

    def values(self, user_id: str) -> Optional[Tuple[int, ...]]:
        """Just the four values (the hot path of ``GET /get``)."""
        record = self._records.get(user_id)
        if record is None:
            return None
        return _RECORD.unpack_from(record)[:_N]

    def merge(self, user_id: str, updates: Sequence[FieldUpdate]) -> int:
        """Apply the updates whose version beats the stored one.

        Returns how many fields changed.  A user appears once any update is
        offered, even if it carries no newer field.
        """
        fields = list(_RECORD.unpack(self._records.get(user_id, _EMPTY)))
        names = self._replicas
        changed = 0
        for i, value, timestamp, replica in updates:
            stored_ts = fields[_N + i]
            if timestamp > stored_ts or (
                timestamp == stored_ts and replica > names[fields[2 * _N + i]]
            ):
                fields[i] = value
                fields[_N + i] = timestamp
                fields[2 * _N + i] = self._intern(replica)
                changed += 1
        if changed or user_id not in self._records:
            self._records[user_id] = _RECORD.pack(*fields)
        return changed

    def apply_patch(
        self, user_id: str, patch: Mapping[str, int], timestamp: int, replica: str
    ) -> int:
        """Apply a partial write made at version ``(timestamp, replica)``."""
        return self.merge(
            user_id,
            [(FIELD_INDEX[k], v, timestamp, replica) for k, v in patch.items()],
        )

    def is_applied(
        self, user_id: str, fields: Sequence[str], timestamp: int, replica: str
    ) -> bool:
        """Whether every field already holds a version at least this new."""
        grade = self.get(user_id)
        if grade is None:
            return False
        return all(grade.versions[FIELD_INDEX[f]] >= (timestamp, replica) for f in fields)

    def packed(self, user_id: str) -> Optional[Tuple[int, ...]]:
        """The raw record: 4 values, 4 timestamps, 4 indexes into :attr:`replica_names`.

        The fast path of snapshots, which format millions of these.
        """
        record = self._records.get(user_id)
        if record is None:
            return None
        return _RECORD.unpack(record)

    @property
    def replica_names(self) -> Sequence[str]:
        """Replica ids by the index :meth:`packed` gives (index 0: never written)."""
        return self._replicas

    def load(
        self,
        user_id: str,
        values: Sequence[int],
        timestamps: Sequence[int],
        replicas: Sequence[str],
    ) -> int:
        """Merge a whole row (one value and version per field), as snapshots hold.

        Equivalent to :meth:`merge` with every written field; a user not yet
        present whose fields are all written is stored without comparing, the
        fast path of loading a snapshot into an empty store.
        """
        if user_id not in self._records and all(timestamps):
            intern = self._intern
            self._records[user_id] = _RECORD.pack(*values, *timestamps, *map(intern, replicas))
            return _N
        return self.merge(
            user_id,
            [(i, values[i], timestamps[i], replicas[i]) for i in range(_N) if timestamps[i]],
        )

    def user_ids(self) -> List[str]:
        """A list of the user ids present now (for snapshots)."""
        return list(self._records)

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)
