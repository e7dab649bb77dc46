"""Where users are stored: SQLite (embedded, the default) or PostgreSQL.

``--database`` is a SQLite path or a ``postgresql://user:password@host:port/db``
URL.  :func:`open_database` returns an :class:`IUserDatabase`: an adbapi
connection pool plus what differs between the two (placeholders, how the
schema version is kept, which driver exceptions mean what).  Both run the same
statements, written once with ``?`` placeholders.

PostgreSQL is reached through pg8000 (pure Python, DB-API 2, maintained; it
runs on CPython and PyPy alike) inside adbapi's threads: every call runs off
the reactor thread, bounded by the store's deadline.  psycopg 3 was the first
choice; its pure-Python implementation drives ``libpq`` through ctypes in a
way Debian's PyPy 3.9 cannot (``cannot create weak reference to 'weakref'
object`` on connect), and its C builds do not exist for PyPy.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Optional, Tuple, Type
from urllib.parse import unquote, urlsplit

from twisted.enterprise import adbapi
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

log = Logger()

BUSY_TIMEOUT = 1.0
"""Seconds SQLite waits for a lock (and PostgreSQL for a connection) before giving up."""

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
        ("INSERT INTO api_keys (key_hash, name, expires_at) SELECT key_hash, name, NULL FROM users"
         " WHERE key_hash NOT IN (SELECT key_hash FROM api_keys)"),
    ],
    # 2: a log of changed user names, which every gateway polls to see the
    # others' creates, changes, rotations and deletes.
    [
        ("CREATE TABLE IF NOT EXISTS user_changes (seq {serial}, name VARCHAR(64) NOT NULL,"
         " at DOUBLE PRECISION NOT NULL)"),
    ],
    # 3: a heartbeat counter per running gateway (lbsvc.limits.livegateways), so that
    # gateways with memory buckets see the others sharing their users.
    [
        "CREATE TABLE IF NOT EXISTS lbsvc_gateways (id VARCHAR(64) PRIMARY KEY, beats BIGINT NOT NULL)",
    ],
]
"""Schema changes in order; the database records how many are applied."""


class StorageUnavailable(Exception):
    """The user database cannot be used now (locked, gone, unreachable, too slow)."""


class Conflict(Exception):
    """A write broke a uniqueness constraint (a name or key that exists)."""


class IUserDatabase(Interface):
    """One kind of SQL database holding the users."""

    description = Attribute("What to call it in logs: a path, or a URL without its password.")
    pool = Attribute("The ``adbapi.ConnectionPool``.")
    unavailable_errors = Attribute("Exception types meaning the database cannot be used now.")

    def is_conflict(error: Exception) -> bool:
        """Whether ``error`` is a violated uniqueness constraint."""

    def describe(error: Exception) -> str:
        """A one-line reason for a log or an answer."""

    def sql(statement: str) -> str:
        """``statement`` (written with ``?`` placeholders) for this driver."""

    def migrate(cursor: Any) -> int:
        """Create the schema and apply pending migrations (in a transaction); the version."""

    def check() -> None:
        """Open the database once, synchronously, at start; :class:`StorageUnavailable` saying why."""

    def problem() -> Optional[str]:
        """Why writes must be refused now (the SQLite file was deleted or replaced), or None."""


def _apply(cursor: Any, version: int, serial: str) -> int:
    for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
        for statement in statements:
            cursor.execute(statement.format(serial=serial))
        log.info("User database migrated to version {number}", number=number)
    return len(MIGRATIONS)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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

    def __init__(self, path: str) -> None:
        self.path = self.description = path
        self.pool = adbapi.ConnectionPool(
            "sqlite3", path, check_same_thread=False, cp_min=1, cp_max=1,
            cp_openfun=_sqlite_setup, timeout=BUSY_TIMEOUT,
        )
        self._identity: Optional[Tuple[int, int]] = None

    def sql(self, statement: str) -> str:
        """SQLite takes ``?`` as it is."""
        return statement

    def is_conflict(self, error: Exception) -> bool:
        """``sqlite3.IntegrityError``."""
        return isinstance(error, sqlite3.IntegrityError)

    def describe(self, error: Exception) -> str:
        """The driver's message."""
        return _first_line(error)

    def migrate(self, cursor: Any) -> int:
        """Schema, then migrations; ``PRAGMA user_version`` counts them."""
        self._identity = _file_identity(self.path)
        cursor.execute(SCHEMA)
        cursor.execute("PRAGMA user_version")
        version = int(cursor.fetchone()[0])
        reached = _apply(cursor, version, "INTEGER PRIMARY KEY AUTOINCREMENT")
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


class _QuietConnection(adbapi.Connection):
    """A pooled connection that, after a failed call, is dropped (without a traceback) unless it still works."""

    def rollback(self) -> None:
        connection: Any = self._connection
        try:
            connection.rollback()
            cursor = connection.cursor()  # is it still alive? (adbapi's own check)
            cursor.execute(self._pool.good_sql)
            cursor.close()
            connection.commit()
            return
        except Exception:
            pass
        self._pool.disconnect(connection)
        raise adbapi.ConnectionLost()


class ReconnectingConnectionPool(adbapi.ConnectionPool):
    """adbapi's pool, reconnecting after a lost server without logging tracebacks.

    ``cp_reconnect`` logs "Rollback failed" with two tracebacks for every call
    made while the server is away; the store logs one line for such a call
    and ``/ready`` says what is wrong, which is what an operator can act on.
    """

    connectionFactory = _QuietConnection

    def _close(self, conn: Any) -> None:
        try:
            conn.close()
        except Exception:
            pass  # the server is gone already: nothing to close

    def _runInteraction(self, interaction: Any, *args: Any, **kw: Any) -> Any:
        conn = self.connectionFactory(self)
        trans = self.transactionFactory(self, conn)
        try:
            result = interaction(trans, *args, **kw)
            trans.close()
            conn.commit()
            return result
        except BaseException:
            try:
                conn.rollback()
            except adbapi.ConnectionLost:
                pass
            raise


@implementer(IUserDatabase)
class PostgresDatabase:
    """A PostgreSQL database through pg8000; the version in ``lbsvc_schema``."""

    def __init__(self, url: str) -> None:
        import pg8000.dbapi  # only needed for PostgreSQL

        parts = urlsplit(url)
        self.connect_args = {
            "user": unquote(parts.username or "postgres"),
            "password": unquote(parts.password) if parts.password else None,
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or 5432,
            "database": unquote(parts.path.lstrip("/")) or None,
            "timeout": 5,
        }
        netloc = f"{self.connect_args['host']}:{self.connect_args['port']}"
        self.description = f"postgresql://{self.connect_args['user']}@{netloc}{parts.path}"
        self._driver = pg8000.dbapi
        self.unavailable_errors: Tuple[Type[Exception], ...] = (pg8000.dbapi.Error, OSError)
        self.pool = ReconnectingConnectionPool("pg8000.dbapi", cp_min=1, cp_max=4, cp_reconnect=True, cp_noisy=False,
                                     **self.connect_args)

    def sql(self, statement: str) -> str:
        """pg8000's placeholders are ``%s``."""
        return statement.replace("?", "%s")

    def is_conflict(self, error: Exception) -> bool:
        """SQLSTATE class 23: integrity constraint violation."""
        details = error.args[0] if error.args else None
        return isinstance(error, self._driver.DatabaseError) and isinstance(details, dict) \
            and str(details.get("C", "")).startswith("23")

    def describe(self, error: Exception) -> str:
        """The server's message, or the driver's."""
        details = error.args[0] if error.args else None
        if isinstance(details, dict) and "M" in details:
            return str(details["M"])
        return _first_line(error)

    def migrate(self, cursor: Any) -> int:
        """Schema, then migrations, under an advisory lock (gateways may start together)."""
        cursor.execute("SELECT pg_advisory_xact_lock(7416)")
        cursor.execute(SCHEMA)
        cursor.execute("CREATE TABLE IF NOT EXISTS lbsvc_schema (version INTEGER NOT NULL)")
        cursor.execute("SELECT version FROM lbsvc_schema")
        row = cursor.fetchone()
        version = int(row[0]) if row else 0
        reached = _apply(cursor, version, "BIGSERIAL PRIMARY KEY")
        if row is None:
            cursor.execute("INSERT INTO lbsvc_schema (version) VALUES (%s)", (reached,))
        elif reached != version:
            cursor.execute("UPDATE lbsvc_schema SET version = %s", (reached,))
        return reached

    def check(self) -> None:
        """Connect once; an unreachable server is not fatal (the store retries), a refusal is."""
        try:
            self._driver.connect(**{**self.connect_args, "timeout": 2}).close()
        except self._driver.DatabaseError as e:  # the server answered: wrong password, no such database
            raise StorageUnavailable(f"cannot open the user database {self.description}:"
                                     f" {self.describe(e)}") from None
        except (self._driver.Error, OSError) as e:
            log.warn("User database {db} not reachable yet ({error}); retrying", db=self.description,
                     error=self.describe(e))

    def problem(self) -> Optional[str]:
        """Nothing to watch: the server owns its files."""
        return None


def open_database(spec: str) -> IUserDatabase:
    """The database ``--database`` names: a ``postgresql://`` URL, else a SQLite path."""
    if spec.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(spec)
    return SQLiteDatabase(spec)
