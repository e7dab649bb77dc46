"""Calls to the user database, each bounded by a deadline, with its faults named.

Every call runs in adbapi's threads, so the reactor never waits on it; a
locked, stuck or unreachable database answers :class:`StorageUnavailable`
(503 with ``Retry-After``) within :data:`DEADLINE` seconds, and a broken
uniqueness constraint answers :class:`Conflict`.  What any other exception
means is not this module's to guess: it goes on to the caller.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lbsvc.users.database import Conflict, IUserDatabase, StorageUnavailable

log = Logger()

DEADLINE = 1.5
"""Seconds a database call may take before the request is answered 503."""

T = TypeVar("T")


class Transactions:
    """Runs work on one database's connections: bounded, its faults translated, logged once."""

    def __init__(self, database: IUserDatabase, clock: IReactorTime) -> None:
        self.database = database
        self.clock = clock

    async def run(self, what: str, work: Callable[[Any], T], quiet: bool = False) -> T:
        """``work(cursor)`` in a transaction, bounded by :data:`DEADLINE`; faults →
        :class:`StorageUnavailable` (logged, unless ``quiet``: the caller reports them)."""
        database = self.database
        d: defer.Deferred[T] = database.pool.runInteraction(work)
        d.addTimeout(DEADLINE, self.clock)
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
