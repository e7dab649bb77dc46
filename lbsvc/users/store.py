"""Users and API keys in SQL (:mod:`lbsvc.users.database`), mirrored in memory.

All users and keys are loaded into memory at start (:mod:`lbsvc.users.index`),
so authenticating a proxied request never touches the database.

Several gateways share one database: every write also appends the user's
name to ``user_changes``, and each gateway polls that log every
:data:`SYNC_INTERVAL` seconds (:meth:`UserStore.sync`), reloading the users
named there, so a create, change, rotation or delete made through one gateway
is seen by every other within a second.  Polling a log, rather than
PostgreSQL's ``LISTEN/NOTIFY``, works the same on both databases (two
gateways may share a SQLite file on one machine), needs no extra connection,
and a gateway that lost the database catches up from where it was.

Storage faults are loud, never silent:

* every database call has a deadline (:mod:`lbsvc.users.transactions`): a
  locked, stuck or unreachable database answers :class:`StorageUnavailable`
  (503 with ``Retry-After``) within two seconds, and the reactor never waits
  on it;
* :meth:`IUserDatabase.check` opens the database at start, so a SQLite path
  that cannot be opened (or bad PostgreSQL credentials) stops the daemon with
  a one-line reason;
* :meth:`UserStore.watch` notices a SQLite file deleted or replaced while the
  daemon runs: writes are then refused with 503 and ``/ready`` says why.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, List, Optional, Tuple, TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lbsvc.users.changelog import ChangeCursor
from lbsvc.users.database import Conflict, IUserDatabase, StorageUnavailable
from lbsvc.users.index import KeyIndex, User, hash_key
from lbsvc.users.transactions import Transactions

log = Logger()

DEFAULT_CAPACITY = 5
DEFAULT_RATE = 1.0
SYNC_INTERVAL = 0.25
"""Seconds between two polls of the change log."""
CHANGES_KEPT = 3600.0
"""Seconds of change log kept; older entries are deleted now and then."""
NEWEST_KEPT = 10_000
"""Changes never deleted, however old they look: the newest this many.  Entry times are the writers' clocks
and the age is judged by the pruner's; a gateway whose clock is an hour ahead would otherwise delete changes
the moment they are written, before the other gateways read them."""

T = TypeVar("T")


class DuplicateUser(Exception):
    """A user with that name exists."""


class UserStore:
    """Users in SQL, mirrored in memory for the request path."""

    def __init__(self, database: IUserDatabase, clock: IReactorTime,
                 wall: Callable[[], float] = time.time) -> None:
        self.database = database
        self.transactions = Transactions(database, clock)
        self.clock = clock
        self.wall = wall
        """Wall-clock seconds: key expiry times are stored, so they outlive the process."""
        self.index = KeyIndex(wall)
        """Every user and working key, in memory (what :meth:`authenticate` reads)."""
        self.problem: Optional[str] = None
        """Why writes are refused (the file is gone), or None."""
        self.on_deleted: Callable[[str], None] = lambda name: None
        """Called with the name of a user deleted (here or through another gateway)."""
        self.synced_at: Optional[float] = None
        """When the change log was last read (the clock's seconds), or None before."""
        self.changes = ChangeCursor(clock)
        """Where this process is in the change log (:mod:`lbsvc.users.changelog`)."""
        self._pruned_at = 0.0

    def __len__(self) -> int:
        return len(self.index)

    def authenticate(self, api_key: str) -> Optional[User]:
        """The user owning ``api_key``, or None (unknown, or past its grace period)."""
        return self.index.authenticate(api_key)

    @property
    def applied(self) -> int:
        """The position in the change log up to which every change is applied here."""
        return self.changes.position

    def _sql(self, statement: str) -> str:
        return str(self.database.sql(statement))

    def _interaction(self, what: str, work: Callable[[Any], T], quiet: bool = False) -> Any:
        return self.transactions.run(what, work, quiet)

    async def open(self) -> None:
        """Create or migrate the schema, then load every user and key."""
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
        self.index.load(users, keys)
        self.synced_at = self.clock.seconds()
        log.info("Loaded {count} users and {keys} keys from {db}", count=len(users), keys=self.index.key_count,
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
                cursor.execute(sql("DELETE FROM user_changes WHERE at < ? AND seq <= (SELECT max(seq) FROM"
                                   " user_changes) - ?"), (now - CHANGES_KEPT, NEWEST_KEPT))
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
        for deleted in self.index.reload(names, users, keys):
            self.on_deleted(deleted)
        self.changes.seen(seq for seq, _ in changes)
        return len(names)

    # --- the request path -----------------------------------------------

    def watch(self) -> None:
        """Check that the database is still the one opened (run every second)."""
        problem = self.database.problem()
        if problem is not None and problem != self.problem:
            log.error("{problem} while running: refusing writes; restart lbsvc after"
                      " restoring it", problem=problem)
        if problem is not None:
            self.problem = problem

    def _writable(self) -> None:
        self.watch()
        if self.problem is not None:
            raise StorageUnavailable(self.problem)

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
        self.index.rotated(user, new_hash, expires_at)
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
        self.index.forget(user)

    async def create(self, name: str) -> Tuple[User, str]:
        """A new user with default limits, and its API key (shown only now)."""
        self._writable()
        if name in self.index:
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
        self.index.remember(user)
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
        self.database.pool.close()
