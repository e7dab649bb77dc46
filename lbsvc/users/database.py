"""What every user database is: the interface, the schema and its migrations, the faults.

``--database`` is a SQLite path (:mod:`lbsvc.users.sqlite`) or a
``postgresql://user:password@host:port/db`` URL (:mod:`lbsvc.users.postgres`);
:func:`lbsvc.users.open_database` picks one.  Each is an adbapi connection
pool plus what differs between the two (placeholders, how the schema version
is kept, which driver exceptions mean what).  Both run the same statements,
written once with ``?`` placeholders.

Calls are made through :class:`lbsvc.users.transactions.Transactions`, which
bounds each one and names its faults.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.logger import Logger
from zope.interface import Attribute, Interface

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


def apply_migrations(cursor: Any, version: int, serial: str) -> int:
    for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
        for statement in statements:
            cursor.execute(statement.format(serial=serial))
        log.info("User database migrated to version {number}", number=number)
    return len(MIGRATIONS)


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
