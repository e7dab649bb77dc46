"""Users and API keys in SQL (:mod:`lbsvc.users.database`), mirrored in memory.

API keys are UUID4s shown once at creation and stored only as their SHA-256
(a random 122-bit secret needs no salt or slow hash).  All users are loaded
into memory at start, so authenticating a proxied request never touches the
database.

Several gateways share one database: every write also appends the user's
name to ``user_changes``, and each gateway polls that log every
:data:`SYNC_INTERVAL` seconds (:meth:`UserStore.sync`), reloading the users
named there, so a create, change, rotation or delete made through one gateway
is seen by every other within a second.  Polling a log, rather than
PostgreSQL's ``LISTEN/NOTIFY``, works the same on both databases (two
gateways may share a SQLite file on one machine), needs no extra connection,
and a gateway that lost the database catches up from where it was.

Storage faults are loud, never silent:

* every database call has a deadline (:data:`DEADLINE`): a locked, stuck or
  unreachable database answers :class:`StorageUnavailable` (503 with
  ``Retry-After``) within two seconds, and the reactor never waits on it
  (calls run in adbapi's threads);
* :meth:`IUserDatabase.check` opens the database at start, so a SQLite path
  that cannot be opened (or bad PostgreSQL credentials) stops the daemon with
  a one-line reason;
* :meth:`UserStore.watch` notices a SQLite file deleted or replaced while the
  daemon runs: writes are then refused with 503 and ``/ready`` says why.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, TypeVar

import attrs
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lbsvc.users.changelog import ChangeCursor
from lbsvc.users.database import Conflict, IUserDatabase, SQLiteDatabase, StorageUnavailable, open_database

log = Logger()

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
DEFAULT_CAPACITY = 5
DEFAULT_RATE = 1.0
DEADLINE = 1.5
"""Seconds a database call may take before the request is answered 503."""
SYNC_INTERVAL = 0.25
"""Seconds between two polls of the change log."""
CHANGES_KEPT = 3600.0
"""Seconds of change log kept; older entries are deleted now and then."""

T = TypeVar("T")

__all__ = ["StorageUnavailable", "open_database"]


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
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()


def valid_name(name: Any) -> bool:
    """1-64 letters, digits, and ``_ . @ -`` (nothing else, no trailing newline)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


class UserStore:
    """Users in SQL, mirrored in memory for the request path."""

    def __init__(self, database: Optional[IUserDatabase], clock: IReactorTime,
                 wall: Callable[[], float] = time.time) -> None:
        self.database = database
        self.pool = database.pool if database is not None else None
        self.clock = clock
        self.wall = wall
        """Wall-clock seconds: key expiry times are stored, so they outlive the process."""
        self.problem: Optional[str] = None
        """Why writes are refused (the file is gone), or None."""
        self.on_deleted: Callable[[str], None] = lambda name: None
        """Called with the name of a user deleted (here or through another gateway)."""
        self.synced_at: Optional[float] = None
        """When the change log was last read (the clock's seconds), or None before."""
        self._by_name: Dict[str, User] = {}
        self._keys: Dict[str, Tuple[User, Optional[float]]] = {}
        """Key hash → its user and when it stops working (None: never)."""
        self.changes = ChangeCursor(clock)
        """Where this process is in the change log (:mod:`lbsvc.users.changelog`)."""
        self._pruned_at = 0.0

    @classmethod
    def sqlite(cls, path: str, clock: IReactorTime, wall: Callable[[], float] = time.time) -> UserStore:
        """A store in the SQLite file ``path``."""
        return cls(SQLiteDatabase(path), clock, wall)

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def applied(self) -> int:
        """The position in the change log up to which every change is applied here."""
        return self.changes.position

    def _sql(self, statement: str) -> str:
        assert self.database is not None
        return str(self.database.sql(statement))

    async def _call(self, what: str, call: Callable[[], defer.Deferred[T]], quiet: bool = False) -> T:
        """One database call, bounded by :data:`DEADLINE`; faults → ``StorageUnavailable``
        (logged, unless ``quiet``: the caller reports them)."""
        assert self.database is not None
        d = call()
        d.addTimeout(DEADLINE, self.clock)
        database = self.database
        try:
            return await d
        except defer.TimeoutError:
            if not quiet:
                log.error("User database: {what} took more than {deadline}s", what=what, deadline=DEADLINE)
            raise StorageUnavailable("the user database is not answering") from None
        except Exception as e:
            if database.is_conflict(e):
                raise Conflict(database.describe(e)) from None
            if not isinstance(e, (*database.unavailable_errors, adbapi.ConnectionLost)):
                raise
            reason = database.describe(e)
            if not quiet:
                log.error("User database: {what} failed: {error}", what=what, error=reason)
            raise StorageUnavailable(f"the user database is unavailable ({reason})") from None

    def _interaction(self, what: str, work: Callable[[Any], T], quiet: bool = False) -> Any:
        assert self.pool is not None
        return self._call(what, lambda: self.pool.runInteraction(work), quiet)  # type: ignore[union-attr]

    async def open(self) -> None:
        """Create or migrate the schema, then load every user and key."""
        assert self.database is not None
        database = self.database
        await self._interaction("migrate", database.migrate)
        sql = self._sql

        def load(cursor: Any) -> Tuple[int, List[Any], List[Any]]:
            cursor.execute("SELECT max(seq) FROM user_changes")
            cursor_at = cursor.fetchone()[0] or 0
            cursor.execute(sql("SELECT name, key_hash, capacity, rate_per_sec FROM users"))
            users = cursor.fetchall()
            cursor.execute(sql("SELECT key_hash, name, expires_at FROM api_keys"))
            return int(cursor_at), users, cursor.fetchall()

        position, users, keys = await self._interaction("load users", load)
        self.changes = ChangeCursor(self.clock, position)
        for name, key_hash, capacity, rate in users:
            self._by_name[name] = User(name, key_hash, int(capacity), float(rate))
        for key_hash, name, expires_at in keys:
            user = self._by_name.get(name)
            if user is not None:
                self._keys[key_hash] = (user, None if expires_at is None else float(expires_at))
        self.synced_at = self.clock.seconds()
        log.info("Loaded {count} users and {keys} keys from {db}", count=len(users), keys=len(self._keys),
                 db=database.description)

    # --- seeing other gateways' changes ---------------------------------

    async def sync(self) -> int:
        """Read the change log past what was seen; reload the users named there.

        Returns how many users were reloaded.  Run every
        :data:`SYNC_INTERVAL` seconds (under a supervisor that logs a failure
        and keeps trying).
        """
        if self.synced_at is None:
            return 0  # not loaded yet
        sql = self._sql
        after = self.changes.position
        now = self.wall()
        prune = now - self._pruned_at > CHANGES_KEPT / 6
        seen = frozenset(self.changes.ahead)

        def read(cursor: Any) -> Tuple[List[Any], List[Any], List[Any]]:
            if prune:
                cursor.execute(sql("DELETE FROM user_changes WHERE at < ?"), (now - CHANGES_KEPT,))
            cursor.execute(sql("SELECT seq, name FROM user_changes WHERE seq > ? ORDER BY seq LIMIT 10000"),
                           (after,))
            changes = [(int(seq), name) for seq, name in cursor.fetchall() if int(seq) not in seen]
            names = sorted({name for _, name in changes})
            users: List[Any] = []
            keys: List[Any] = []
            for start in range(0, len(names), 500):
                part = names[start:start + 500]
                marks = ", ".join("?" * len(part))
                cursor.execute(sql(f"SELECT name, key_hash, capacity, rate_per_sec FROM users WHERE name IN ({marks})"),
                               part)
                users += cursor.fetchall()
                cursor.execute(sql(f"SELECT key_hash, name, expires_at FROM api_keys WHERE name IN ({marks})"), part)
                keys += cursor.fetchall()
            return changes, users, keys

        changes, users, keys = await self._interaction("read changes", read, quiet=True)
        if prune:
            self._pruned_at = now
        self.synced_at = self.clock.seconds()
        if not changes:
            self.changes.wait_for_holes()
            return 0
        names = {name for _, name in changes}
        self._reload(names, users, keys)
        self.changes.seen(seq for seq, _ in changes)
        return len(names)

    def _reload(self, names: Iterable[str], users: List[Any], keys: List[Any]) -> None:
        """Make the memory copy of ``names`` what the database says."""
        rows = {row[0]: row for row in users}
        for name in names:
            row = rows.get(name)
            current = self._by_name.get(name)
            if row is None:
                if current is not None:
                    self._forget(current)
                    self.on_deleted(name)
                continue
            _, key_hash, capacity, rate = row
            if current is None:
                current = self._by_name[name] = User(name, key_hash, int(capacity), float(rate))
            else:
                current.key_hash, current.capacity, current.rate_per_sec = key_hash, int(capacity), float(rate)
            for stale, (owner, _) in list(self._keys.items()):
                if owner.name == name:
                    del self._keys[stale]
        for key_hash, name, expires_at in keys:
            user = self._by_name.get(name)
            if user is not None:
                self._keys[key_hash] = (user, None if expires_at is None else float(expires_at))

    def _forget(self, user: User) -> None:
        self._by_name.pop(user.name, None)
        for key_hash, (owner, _) in list(self._keys.items()):
            if owner is user:
                del self._keys[key_hash]

    # --- the request path -----------------------------------------------

    def watch(self) -> None:
        """Check that the database is still the one opened (run every second)."""
        problem = self.database.problem() if self.database is not None else None
        if problem is not None and problem != self.problem:
            log.error("{problem} while running: refusing writes; restart lbsvc after"
                      " restoring it", problem=problem)
        if problem is not None:
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

    def _changed(self, cursor: Any, name: str) -> None:
        cursor.execute(self._sql("INSERT INTO user_changes (name, at) VALUES (?, ?)"), (name, self.wall()))

    async def rotate(self, user: User, grace: float) -> str:
        """A new key for ``user``; its other keys stay valid ``grace`` seconds more."""
        self._writable()
        api_key = str(uuid.uuid4())
        new_hash = hash_key(api_key)
        now = self.wall()
        expires_at = now + grace
        sql = self._sql

        def change(cursor: Any) -> None:
            cursor.execute(sql("DELETE FROM api_keys WHERE name = ? AND expires_at IS NOT NULL AND expires_at <= ?"),
                           (user.name, now))
            cursor.execute(sql("UPDATE api_keys SET expires_at = ? WHERE name = ? AND"
                               " (expires_at IS NULL OR expires_at > ?)"), (expires_at, user.name, expires_at))
            cursor.execute(sql("INSERT INTO api_keys (key_hash, name, expires_at) VALUES (?, ?, NULL)"),
                           (new_hash, user.name))
            cursor.execute(sql("UPDATE users SET key_hash = ? WHERE name = ?"), (new_hash, user.name))
            self._changed(cursor, user.name)

        await self._interaction("rotate key", change)
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
        sql = self._sql

        def remove(cursor: Any) -> None:
            cursor.execute(sql("DELETE FROM api_keys WHERE name = ?"), (user.name,))
            cursor.execute(sql("DELETE FROM users WHERE name = ?"), (user.name,))
            self._changed(cursor, user.name)

        await self._interaction("delete user", remove)
        self._forget(user)

    async def create(self, name: str) -> Tuple[User, str]:
        """A new user with default limits, and its API key (shown only now)."""
        self._writable()
        assert self.database is not None
        if name in self._by_name:
            raise DuplicateUser(name)
        api_key = str(uuid.uuid4())
        user = User(name, hash_key(api_key), DEFAULT_CAPACITY, DEFAULT_RATE)
        sql = self._sql

        def insert(cursor: Any) -> None:
            cursor.execute(sql("INSERT INTO users (name, key_hash, capacity, rate_per_sec) VALUES (?, ?, ?, ?)"),
                           (user.name, user.key_hash, user.capacity, user.rate_per_sec))
            cursor.execute(sql("INSERT INTO api_keys (key_hash, name, expires_at) VALUES (?, ?, NULL)"),
                           (user.key_hash, user.name))
            self._changed(cursor, user.name)

        try:
            await self._interaction("insert user", insert)
        except Conflict:
            raise DuplicateUser(name) from None
        self._writable()
        self._remember(user)
        return user, api_key

    async def change(self, user: User, capacity: int, rate: float) -> User:
        """Store new limits for ``user``."""
        self._writable()
        sql = self._sql

        def update(cursor: Any) -> None:
            cursor.execute(sql("UPDATE users SET capacity = ?, rate_per_sec = ? WHERE name = ?"),
                           (capacity, rate, user.name))
            self._changed(cursor, user.name)

        await self._interaction("update limits", update)
        self._writable()
        user.capacity, user.rate_per_sec = capacity, rate
        return user

    def close(self) -> None:
        """Close the connection pool."""
        if self.pool is not None:
            self.pool.close()
