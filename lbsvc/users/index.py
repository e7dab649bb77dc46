"""The users and their working keys in memory: what authenticating a proxied request reads.

API keys are UUID4s shown once at creation and kept only as their SHA-256
(a random 122-bit secret needs no salt or slow hash).  A key may carry an
expiry (the old key of a rotation, within its grace period); expiry times are
wall-clock seconds because they are stored and outlive the process.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import attrs

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")

UserRow = Sequence[Any]
"""``(name, key_hash, capacity, rate_per_sec)`` as the ``users`` table holds it."""
KeyRow = Sequence[Any]
"""``(key_hash, name, expires_at)`` as the ``api_keys`` table holds it."""


@attrs.define
class User:
    """A user's name and limits."""

    name: str
    key_hash: str
    capacity: int
    rate_per_sec: float


def hash_key(api_key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()


def valid_name(name: Any) -> bool:
    """1-64 letters, digits, and ``_ . @ -`` (nothing else, no trailing newline)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


class KeyIndex:
    """Users by name, and each working key's hash with its user and expiry."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self.wall = wall
        """Wall-clock seconds, against which key expiry is judged."""
        self._by_name: Dict[str, User] = {}
        self._keys: Dict[str, Tuple[User, Optional[float]]] = {}
        """Key hash → its user and when it stops working (None: never)."""

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def key_count(self) -> int:
        """Keys that may still work (some may be past their expiry until next asked)."""
        return len(self._keys)

    def remember(self, user: User) -> None:
        """Add ``user`` with its current key, which never expires."""
        self._by_name[user.name] = user
        self._keys[user.key_hash] = (user, None)

    def load(self, users: Iterable[UserRow], keys: Iterable[KeyRow]) -> None:
        """Add the users and keys of these rows (a key of an unknown user is ignored)."""
        for name, key_hash, capacity, rate in users:
            self._by_name[name] = User(name, key_hash, int(capacity), float(rate))
        self._add_keys(keys)

    def reload(self, names: Iterable[str], users: List[UserRow], keys: List[KeyRow]) -> List[str]:
        """Make the copy of ``names`` what these rows (the database's) say; the names deleted."""
        rows = {row[0]: row for row in users}
        deleted: List[str] = []
        for name in names:
            row = rows.get(name)
            current = self._by_name.get(name)
            if row is None:
                if current is not None:
                    self.forget(current)
                    deleted.append(name)
                continue
            _, key_hash, capacity, rate = row
            if current is None:
                current = self._by_name[name] = User(name, key_hash, int(capacity), float(rate))
            else:
                current.key_hash, current.capacity, current.rate_per_sec = key_hash, int(capacity), float(rate)
            for stale, (owner, _) in list(self._keys.items()):
                if owner.name == name:
                    del self._keys[stale]
        self._add_keys(keys)
        return deleted

    def _add_keys(self, keys: Iterable[KeyRow]) -> None:
        for key_hash, name, expires_at in keys:
            user = self._by_name.get(name)
            if user is not None:
                self._keys[key_hash] = (user, None if expires_at is None else float(expires_at))

    def forget(self, user: User) -> None:
        """Drop ``user`` and every key of it."""
        self._by_name.pop(user.name, None)
        for key_hash, (owner, _) in list(self._keys.items()):
            if owner is user:
                del self._keys[key_hash]

    def rotated(self, user: User, new_hash: str, expires_at: float) -> None:
        """``user``'s key is now ``new_hash``; its other keys stop working at ``expires_at`` (or before)."""
        for key_hash, (owner, old_expiry) in list(self._keys.items()):
            if owner is user and (old_expiry is None or old_expiry > expires_at):
                self._keys[key_hash] = (user, expires_at)
        self._keys[new_hash] = (user, None)
        user.key_hash = new_hash

    def authenticate(self, api_key: str) -> Optional[User]:
        """The user owning ``api_key``, or None (unknown, or past its grace period)."""
        key_hash = hash_key(api_key)
        entry = self._keys.get(key_hash)
        if entry is None:
            return None
        user, expires_at = entry
        if expires_at is not None and self.wall() >= expires_at:
            del self._keys[key_hash]
            return None
        return user
