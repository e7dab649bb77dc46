"""Users and API keys, kept in SQLite through ``twisted.enterprise.adbapi``.

API keys are UUID4s shown once at creation and stored only as their SHA-256
(a random 122-bit secret needs no salt or slow hash).  All users are loaded
into memory at start, so authenticating a proxied request never touches the
database.

Storage faults are loud, never silent:

* every database call has a deadline (:data:`DEADLINE`, with SQLite's own
  busy timeout shorter still): a locked or stuck database answers
  :class:`StorageUnavailable` (503 with ``Retry-After``) within two seconds,
  and the reactor never waits on it (calls run in adbapi's thread);
* :func:`check_database` opens the file synchronously at start, so a path
  that cannot be opened stops the daemon with a one-line reason;
* :meth:`UserStore.watch` notices the file being deleted or replaced while
  the daemon runs (writes would go to a file nobody reads): writes are then
  refused with 503 and ``/ready`` says why.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import time
import uuid
from typing import Any, Callable, Dict, Optional, Tuple, TypeVar

import attrs
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
DEFAULT_CAPACITY = 5
DEFAULT_RATE = 1.0
DEADLINE = 1.5
"""Seconds a database call may take before the request is answered 503."""
BUSY_TIMEOUT = 1.0
"""Seconds SQLite waits for a lock before giving up."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name VARCHAR(64) PRIMARY KEY,
    key_hash CHAR(64) NOT NULL UNIQUE,
    capacity INTEGER NOT NULL,
    rate_per_sec DOUBLE PRECISION NOT NULL
)
"""
MIGRATIONS = [
    # 1: several keys per user, each with an optional expiry (rotation with a
    # grace period); the users' existing keys become their first key.
    [
        """CREATE TABLE IF NOT EXISTS api_keys (
            key_hash CHAR(64) PRIMARY KEY,
            name VARCHAR(64) NOT NULL REFERENCES users(name),
            expires_at DOUBLE PRECISION
        )""",
        "INSERT OR IGNORE INTO api_keys (key_hash, name, expires_at) SELECT key_hash, name, NULL FROM users",
    ],
]
"""Schema changes in order; ``PRAGMA user_version`` records how many are applied."""


def migrate(cursor: Any) -> int:
    """Create the schema and apply the migrations not applied yet; the version reached."""
    cursor.execute(SCHEMA)
    cursor.execute("PRAGMA user_version")
    version = int(cursor.fetchone()[0])
    for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
        for statement in statements:
            cursor.execute(statement)
        cursor.execute(f"PRAGMA user_version = {number}")
        log.info("User database migrated to version {number}", number=number)
    return len(MIGRATIONS)

T = TypeVar("T")


class DuplicateUser(Exception):
    """A user with that name exists."""


class StorageUnavailable(Exception):
    """The user database cannot be used now (locked, gone, too slow)."""


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


def _sqlite_setup(connection: Any) -> None:
    # Close the cursor at once: PyPy does not finalise it by reference
    # counting, and an open statement blocks every later commit.
    connection.execute("PRAGMA journal_mode=WAL").close()


def _file_identity(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def check_database(path: str) -> None:
    """Open ``path`` and create the table now; ``StorageUnavailable`` saying why."""
    try:
        connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT)
        try:
            connection.execute(SCHEMA).close()
            connection.execute("SELECT count(*) FROM users").close()
            connection.commit()
        finally:
            connection.close()
    except sqlite3.Error as e:
        raise StorageUnavailable(f"cannot open the user database {path}: {e}") from None


class UserStore:
    """Users in SQL, mirrored in memory for the request path."""

    def __init__(self, pool: adbapi.ConnectionPool, clock: IReactorTime, path: Optional[str] = None,
                 wall: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.clock = clock
        self.wall = wall
        """Wall-clock seconds: key expiry times are stored, so they outlive the process."""
        self.path = path
        self.problem: Optional[str] = None
        """Why writes are refused (the file is gone), or None."""
        self._identity: Optional[Tuple[int, int]] = None
        self._by_name: Dict[str, User] = {}
        self._keys: Dict[str, Tuple[User, Optional[float]]] = {}
        """Key hash → its user and when it stops working (None: never)."""

    @classmethod
    def sqlite(cls, path: str, clock: IReactorTime, wall: Callable[[], float] = time.time) -> UserStore:
        """A store in the SQLite file ``path`` (one connection, one thread)."""
        pool = adbapi.ConnectionPool(
            "sqlite3", path, check_same_thread=False, cp_min=1, cp_max=1,
            cp_openfun=_sqlite_setup, timeout=BUSY_TIMEOUT,
        )
        return cls(pool, clock, path, wall)

    def __len__(self) -> int:
        return len(self._by_name)

    async def _call(self, what: str, call: Callable[[], defer.Deferred[T]]) -> T:
        """One database call, bounded by :data:`DEADLINE`; faults → ``StorageUnavailable``."""
        d = call()
        d.addTimeout(DEADLINE, self.clock)
        try:
            return await d
        except sqlite3.IntegrityError:
            raise
        except defer.TimeoutError:
            log.error("User database: {what} took more than {deadline}s", what=what, deadline=DEADLINE)
            raise StorageUnavailable("the user database is not answering") from None
        except sqlite3.OperationalError as e:
            log.error("User database: {what} failed: {error}", what=what, error=e)
            raise StorageUnavailable(f"the user database is unavailable ({e})") from None
        except sqlite3.DatabaseError as e:
            log.error("User database: {what} failed: {error}", what=what, error=e)
            raise StorageUnavailable("the user database failed") from None

    async def open(self) -> None:
        """Create or migrate the schema, then load every user and key."""
        self._identity = _file_identity(self.path) if self.path else None
        await self._call("migrate", lambda: self.pool.runInteraction(migrate))
        rows = await self._call("load users", lambda: self.pool.runQuery(
            "SELECT name, key_hash, capacity, rate_per_sec FROM users"))
        for name, key_hash, capacity, rate in rows:
            self._by_name[name] = User(name, key_hash, int(capacity), float(rate))
        keys = await self._call("load keys", lambda: self.pool.runQuery(
            "SELECT key_hash, name, expires_at FROM api_keys"))
        for key_hash, name, expires_at in keys:
            user = self._by_name.get(name)
            if user is not None:
                self._keys[key_hash] = (user, None if expires_at is None else float(expires_at))
        log.info("Loaded {count} users and {keys} keys", count=len(rows), keys=len(self._keys))

    def watch(self) -> None:
        """Check that the database file is still the one opened (run every second)."""
        if self.path is None or self._identity is None:
            return
        now = _file_identity(self.path)
        if now == self._identity:
            return
        problem = (f"the user database file {self.path} was deleted" if now is None
                   else f"the user database file {self.path} was replaced")
        if problem != self.problem:
            log.error("{problem} while running: refusing writes; restart lbsvc after"
                      " restoring it", problem=problem)
        self.problem = problem

    def _writable(self) -> None:
        self.watch()
        if self.problem is not None:
            raise StorageUnavailable(self.problem)

    def _remember(self, user: User) -> None:
        self._by_name[user.name] = user
        self._keys[user.key_hash] = (user, None)

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

    async def rotate(self, user: User, grace: float) -> str:
        """A new key for ``user``; its other keys stay valid ``grace`` seconds more."""
        self._writable()
        api_key = str(uuid.uuid4())
        new_hash = hash_key(api_key)
        now = self.wall()
        expires_at = now + grace

        def change(cursor: Any) -> None:
            cursor.execute("DELETE FROM api_keys WHERE name = ? AND expires_at IS NOT NULL AND expires_at <= ?",
                           (user.name, now))
            cursor.execute("UPDATE api_keys SET expires_at = ? WHERE name = ? AND"
                           " (expires_at IS NULL OR expires_at > ?)", (expires_at, user.name, expires_at))
            cursor.execute("INSERT INTO api_keys (key_hash, name, expires_at) VALUES (?, ?, NULL)",
                           (new_hash, user.name))
            cursor.execute("UPDATE users SET key_hash = ? WHERE name = ?", (new_hash, user.name))

        await self._call("rotate key", lambda: self.pool.runInteraction(change))
        self._writable()
        for key_hash, (owner, old_expiry) in list(self._keys.items()):
            if owner is user and (old_expiry is None or old_expiry > expires_at):
                self._keys[key_hash] = (user, expires_at)
        self._keys[new_hash] = (user, None)
        user.key_hash = new_hash
        return api_key

    async def delete(self, user: User) -> None:
        """Forget ``user`` and every key of it."""
        self._writable()

        def remove(cursor: Any) -> None:
            cursor.execute("DELETE FROM api_keys WHERE name = ?", (user.name,))
            cursor.execute("DELETE FROM users WHERE name = ?", (user.name,))

        await self._call("delete user", lambda: self.pool.runInteraction(remove))
        self._by_name.pop(user.name, None)
        for key_hash, (owner, _) in list(self._keys.items()):
            if owner is user:
                del self._keys[key_hash]

    async def create(self, name: str) -> Tuple[User, str]:
        """A new user with default limits, and its API key (shown only now)."""
        self._writable()
        if name in self._by_name:
            raise DuplicateUser(name)
        api_key = str(uuid.uuid4())
        user = User(name, hash_key(api_key), DEFAULT_CAPACITY, DEFAULT_RATE)
        try:
            def insert(cursor: Any) -> None:
                cursor.execute("INSERT INTO users (name, key_hash, capacity, rate_per_sec) VALUES (?, ?, ?, ?)",
                               (user.name, user.key_hash, user.capacity, user.rate_per_sec))
                cursor.execute("INSERT INTO api_keys (key_hash, name, expires_at) VALUES (?, ?, NULL)",
                               (user.key_hash, user.name))

            await self._call("insert user", lambda: self.pool.runInteraction(insert))
        except sqlite3.IntegrityError:
            raise DuplicateUser(name) from None
        self._writable()
        self._remember(user)
        return user, api_key

    async def change(self, user: User, capacity: int, rate: float) -> User:
        """Store new limits for ``user``."""
        self._writable()
        await self._call("update limits", lambda: self.pool.runOperation(
            "UPDATE users SET capacity = ?, rate_per_sec = ? WHERE name = ?",
            (capacity, rate, user.name),
        ))
        self._writable()
        user.capacity, user.rate_per_sec = capacity, rate
        return user

    def close(self) -> None:
        """Close the connection pool."""
        self.pool.close()
