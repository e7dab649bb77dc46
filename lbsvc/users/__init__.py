"""Users and their API keys.

The memory copy the request path reads (:mod:`.index`), kept in step with SQL
by the store (:mod:`.store`) through bounded calls (:mod:`.transactions`); its
place in the change log other gateways write (:mod:`.changelog`); the
databases (:mod:`.database`, :mod:`.sqlite`, :mod:`.postgres`); the key guard
(:mod:`.keys`) and the user API (:mod:`.api`).
"""

from __future__ import annotations

from lbsvc.users.database import IUserDatabase
from lbsvc.users.postgres import PostgresDatabase
from lbsvc.users.sqlite import SQLiteDatabase


def open_database(spec: str) -> IUserDatabase:
    """The database ``--database`` names: a ``postgresql://`` URL, else a SQLite path."""
    if spec.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(spec)
    return SQLiteDatabase(spec)
