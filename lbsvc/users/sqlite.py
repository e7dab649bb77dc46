"""The users in a SQLite file (the default ``--database``): embedded, one connection, one thread.

Several gateways on one machine may share the file (WAL journal; a writer
waits :data:`~lbsvc.users.database.BUSY_TIMEOUT` for a lock).  The file is
watched: deleted or replaced while the daemon runs, writes are refused
(:meth:`SQLiteDatabase.problem`), since they would go to a file nobody reads.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Optional, Tuple, Type

from twisted.enterprise import adbapi
from zope.interface import implementer

from lbsvc.users.database import BUSY_TIMEOUT, SCHEMA, IUserDatabase, StorageUnavailable, apply_migrations, first_line


def _file_identity(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _sqlite_setup(connection: Any) -> None:
    # Close the cursor at once: PyPy does not finalise it by reference
    # counting, and an open statement blocks every later commit.
    connection.execute("PRAGMA journal_mode=WAL").close()


@implementer(IUserDatabase)
class SQLiteDatabase:
    """A SQLite file: one connection, one thread; the version in ``PRAGMA user_version``."""

    unavailable_errors: Tuple[Type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, path: str, pool: Optional[Any] = None) -> None:
        self.path = self.description = path
        self.pool = pool if pool is not None else adbapi.ConnectionPool(
            "sqlite3", path, check_same_thread=False, cp_min=1, cp_max=1,
            cp_openfun=_sqlite_setup, timeout=BUSY_TIMEOUT,
        )
        """adbapi's pool in its threads (a test may give one that runs inline: :mod:`lbsvc.testing`)."""
        self._identity: Optional[Tuple[int, int]] = None

    def sql(self, statement: str) -> str:
        """SQLite takes ``?`` as it is."""
        return statement

    def is_conflict(self, error: Exception) -> bool:
        """``sqlite3.IntegrityError``."""
        return isinstance(error, sqlite3.IntegrityError)

    def describe(self, error: Exception) -> str:
        """The driver's message."""
        return first_line(error)

    def migrate(self, cursor: Any) -> int:
        """Schema, then migrations; ``PRAGMA user_version`` counts them."""
        self._identity = _file_identity(self.path)
        cursor.execute(SCHEMA)
        cursor.execute("PRAGMA user_version")
        version = int(cursor.fetchone()[0])
        reached = apply_migrations(cursor, version, "INTEGER PRIMARY KEY AUTOINCREMENT")
        if reached != version:
            cursor.execute(f"PRAGMA user_version = {reached}")
        return reached

    def check(self) -> None:
        """Open the file and create the first table now."""
        try:
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT)
            try:
                connection.execute(SCHEMA).close()
                connection.execute("SELECT count(*) FROM users").close()
                connection.commit()
            finally:
                connection.close()
        except sqlite3.Error as e:
            raise StorageUnavailable(f"cannot open the user database {self.path}: {e}") from None

    def problem(self) -> Optional[str]:
        """The file deleted or replaced since it was opened (writes would be lost)."""
        if self._identity is None:
            return None
        now = _file_identity(self.path)
        if now == self._identity:
            return None
        return (f"the user database file {self.path} was deleted" if now is None
                else f"the user database file {self.path} was replaced")
