"""Users and API keys, kept in SQL through ``twisted.enterprise.adbapi``.

The embedded default is SQLite (one file; users survive restarts).  The SQL
is plain and portable, with the parameter style chosen per driver, so a
PostgreSQL DSN can follow.  API keys are UUID4s shown once at creation and
stored only as their SHA-256 (a random 122-bit secret needs no salt or slow
hash).  All users are loaded into memory at start, so authenticating a
proxied request never touches the database.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import uuid
from typing import Any, Dict, Optional, Tuple

import attrs
from twisted.enterprise import adbapi
from twisted.logger import Logger

log = Logger()

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
DEFAULT_CAPACITY = 5
DEFAULT_RATE = 1.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name VARCHAR(64) PRIMARY KEY,
    key_hash CHAR(64) NOT NULL UNIQUE,
    capacity INTEGER NOT NULL,
    rate_per_sec DOUBLE PRECISION NOT NULL
)
"""


class DuplicateUser(Exception):
    """A user with that name exists."""


@attrs.define
class User:
    """A user's name and limits."""

    name: str
    key_hash: str
    capacity: int
    rate_per_sec: float


def hash_key(api_key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def valid_name(name: Any) -> bool:
    """1-64 letters, digits, and ``_ . @ -``."""
    return isinstance(name, str) and NAME_PATTERN.match(name) is not None


def _sqlite_setup(connection: Any) -> None:
    # Close the cursor at once: PyPy does not finalise it by reference
    # counting, and an open statement blocks every later commit.
    connection.execute("PRAGMA journal_mode=WAL").close()


class UserStore:
    """Users in SQL, mirrored in memory for the request path."""

    def __init__(self, pool: adbapi.ConnectionPool, paramstyle: str = "qmark") -> None:
        self.pool = pool
        self._p = "?" if paramstyle == "qmark" else "%s"
        self._by_name: Dict[str, User] = {}
        self._by_key: Dict[str, User] = {}

    @classmethod
    def sqlite(cls, path: str) -> "UserStore":
        """A store in the SQLite file ``path`` (one connection, one thread)."""
        pool = adbapi.ConnectionPool(
            "sqlite3", path, check_same_thread=False, cp_min=1, cp_max=1,
            cp_openfun=_sqlite_setup,
        )
        return cls(pool)

    def __len__(self) -> int:
        return len(self._by_name)

    async def open(self) -> None:
        """Create the table if needed and load every user."""
        await self.pool.runOperation(SCHEMA)
        rows = await self.pool.runQuery("SELECT name, key_hash, capacity, rate_per_sec FROM users")
        for name, key_hash, capacity, rate in rows:
            self._remember(User(name, key_hash, int(capacity), float(rate)))
        log.info("Loaded {count} users", count=len(rows))

    def _remember(self, user: User) -> None:
        self._by_name[user.name] = user
        self._by_key[user.key_hash] = user

    def authenticate(self, api_key: str) -> Optional[User]:
        """The user owning ``api_key``, or None."""
        return self._by_key.get(hash_key(api_key))

    async def create(self, name: str) -> Tuple[User, str]:
        """A new user with default limits, and its API key (shown only now)."""
        if name in self._by_name:
            raise DuplicateUser(name)
        api_key = str(uuid.uuid4())
        user = User(name, hash_key(api_key), DEFAULT_CAPACITY, DEFAULT_RATE)
        p = self._p
        try:
            await self.pool.runOperation(
                f"INSERT INTO users (name, key_hash, capacity, rate_per_sec) VALUES ({p}, {p}, {p}, {p})",
                (user.name, user.key_hash, user.capacity, user.rate_per_sec),
            )
        except sqlite3.IntegrityError:
            raise DuplicateUser(name)
        self._remember(user)
        return user, api_key

    async def change(self, user: User, capacity: int, rate: float) -> User:
        """Store new limits for ``user``."""
        p = self._p
        await self.pool.runOperation(
            f"UPDATE users SET capacity = {p}, rate_per_sec = {p} WHERE name = {p}",
            (capacity, rate, user.name),
        )
        user.capacity, user.rate_per_sec = capacity, rate
        return user

    def close(self) -> None:
        """Close the connection pool."""
        self.pool.close()
