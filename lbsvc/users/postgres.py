"""The users in PostgreSQL (``--database postgresql://user:password@host:port/db``).

PostgreSQL is reached through pg8000 (pure Python, DB-API 2, maintained; it
runs on CPython and PyPy alike) inside adbapi's threads: every call runs off
the reactor thread, bounded by the store's deadline.  psycopg 3 was the first
choice; its pure-Python implementation drives ``libpq`` through ctypes in a
way Debian's PyPy 3.9 cannot (``cannot create weak reference to 'weakref'
object`` on connect), and its C builds do not exist for PyPy.

**TLS.**  The URL's query takes libpq's ``sslmode`` and ``sslrootcert``
(and ``sslcert``/``sslkey`` for a client certificate), with libpq's
meanings: ``prefer`` (the default, as before and as libpq's: TLS when the
server offers it, unverified, else cleartext), ``disable`` (cleartext),
``require`` (encrypted, or no connection; the server's certificate checked
against ``sslrootcert`` only when one is given, as libpq does),
``verify-ca`` (the certificate must chain to ``sslrootcert``, else the
system's CAs) and ``verify-full`` (and name the host).  From ``require`` up,
a server that refuses TLS is refused in turn (pg8000: "Server refuses
SSL").  ``allow`` (cleartext first) and any other query argument are refused
at start: this driver cannot honour them.
"""

from __future__ import annotations

import ssl
from typing import Any, Dict, Optional, Tuple, Type, Union
from urllib.parse import parse_qsl, unquote, urlsplit

from twisted.enterprise import adbapi
from twisted.logger import Logger
from zope.interface import implementer

from lbsvc.users.database import SCHEMA, IUserDatabase, StorageUnavailable, apply_migrations, first_line
from svckit.clienttls import ClientTLS

log = Logger()


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


SSL_MODES = ("disable", "prefer", "require", "verify-ca", "verify-full")
"""libpq's ``sslmode`` values this driver honours (not ``allow``: cleartext first)."""
QUERY = ("sslmode", "sslrootcert", "sslcert", "sslkey")


def tls_context(url: str) -> Union[ssl.SSLContext, None, bool]:
    """What pg8000's ``ssl_context`` must be for the TLS a ``postgresql://`` URL asks for: False for
    ``disable``, None for ``prefer`` (the default), else a context; ``ValueError`` with one line when the
    URL asks for what cannot be honoured, or names files that do not load."""
    query: Dict[str, str] = {}
    for key, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key not in QUERY:
            raise ValueError(f"the database URL's argument {key!r} is not supported (known: {', '.join(QUERY)})")
        query[key] = value
    mode = query.get("sslmode", "prefer")
    if mode not in SSL_MODES:
        raise ValueError(f"sslmode must be one of {', '.join(SSL_MODES)}, not {mode!r}")
    if mode in ("disable", "prefer"):
        if len(query) > 1:
            raise ValueError("sslrootcert, sslcert and sslkey need sslmode=require, verify-ca or verify-full")
        return False if mode == "disable" else None
    tls = ClientTLS(query.get("sslrootcert"), query.get("sslcert"), query.get("sslkey"))
    tls.check()
    verify = mode != "require" or tls.ca_file is not None  # libpq: require with a root certificate verifies it
    return tls.context(check_hostname=mode == "verify-full", verify=verify)


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
            "ssl_context": tls_context(url),
        }
        netloc = f"{self.connect_args['host']}:{self.connect_args['port']}"
        mode = dict(parse_qsl(parts.query)).get("sslmode")
        self.description = f"postgresql://{self.connect_args['user']}@{netloc}{parts.path}" + (
            f"?sslmode={mode}" if mode else "")
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
        return first_line(error)

    def migrate(self, cursor: Any) -> int:
        """Schema, then migrations, under an advisory lock (gateways may start together)."""
        cursor.execute("SELECT pg_advisory_xact_lock(7416)")
        cursor.execute(SCHEMA)
        cursor.execute("CREATE TABLE IF NOT EXISTS lbsvc_schema (version INTEGER NOT NULL)")
        cursor.execute("SELECT version FROM lbsvc_schema")
        row = cursor.fetchone()
        version = int(row[0]) if row else 0
        reached = apply_migrations(cursor, version, "BIGSERIAL PRIMARY KEY")
        if row is None:
            cursor.execute("INSERT INTO lbsvc_schema (version) VALUES (%s)", (reached,))
        elif reached != version:
            cursor.execute("UPDATE lbsvc_schema SET version = %s", (reached,))
        return reached

    def check(self) -> None:
        """Connect once; an unreachable server is not fatal (the store retries), a refusal is: a wrong
        password, no such database, TLS refused or not verified."""
        try:
            self._driver.connect(**{**self.connect_args, "timeout": 2}).close()
        except (self._driver.Error, OSError) as e:
            refusal = self.refusal(e)
            if refusal is not None:
                raise StorageUnavailable(f"cannot open the user database {self.description}: {refusal}") from None
            log.warn("User database {db} not reachable yet ({error}); retrying", db=self.description,
                     error=self.describe(e))

    def refusal(self, error: Exception) -> Optional[str]:
        """Why the server (or its TLS) refused us, or None when it was not reached."""
        if isinstance(error, self._driver.DatabaseError):  # the server answered: wrong password, no database
            return self.describe(error)
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"TLS: certificate verify failed: {error.verify_message}"
        if isinstance(error, ssl.SSLError):
            return f"TLS: {error.reason or error}"
        if isinstance(error, self._driver.InterfaceError) and "SSL" in str(error):
            return f"{error} (the URL asks for TLS)"
        return None

    def problem(self) -> Optional[str]:
        """Nothing to watch: the server owns its files."""
        return None
