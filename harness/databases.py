"""User databases for gateways under test: a PostgreSQL database per test, the stored key hashes."""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any, List

POSTGRES = "postgresql://postgres@127.0.0.1:5432"
"""The development machines' PostgreSQL (trust auth); each test makes its own database."""


def _postgres(database: str = "postgres") -> Any:
    import pg8000.native

    return pg8000.native.Connection("postgres", host="127.0.0.1", port=5432, database=database, timeout=10)


def create_database() -> str:
    """A new, empty PostgreSQL database; its URL."""
    name = f"lbsvc_test_{uuid.uuid4().hex[:12]}"
    connection = _postgres()
    try:
        connection.run(f"CREATE DATABASE {name}")
    finally:
        connection.close()
    return f"{POSTGRES}/{name}"


def drop_database(url: str) -> None:
    """Drop a database made by :func:`create_database` (its connections are cut)."""
    connection = _postgres()
    try:
        connection.run(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")
    finally:
        connection.close()


def stored_key_hashes(database: str) -> List[str]:
    """Every key hash in the users' database (SQLite path or PostgreSQL URL)."""
    if database.startswith("postgresql://"):
        connection = _postgres(database.rsplit("/", 1)[1])
        try:
            return [r[0] for r in connection.run("SELECT key_hash FROM api_keys")]
        finally:
            connection.close()
    with sqlite3.connect(database) as connection:
        return [r[0] for r in connection.execute("SELECT key_hash FROM api_keys").fetchall()]
