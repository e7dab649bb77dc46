"""One connection to Redis, kept up: what the Redis buckets and the heartbeat talk through.

The client is ``txredisapi``'s ``RedisProtocol`` (Twisted-native, pure
Python, runs on PyPy) on one connection kept up by Twisted's
``ClientService`` with a back-off.  :meth:`RedisLink.current` is the connected
protocol, or None while Redis is away, so a caller can decide at once
instead of queueing behind a reconnect.

**Who may connect.**  ``redis://[[user]:password@]host[:port][/db]``: with a
password, every new connection sends ``AUTH [user] password`` (an ACL user
when one is named) before ``SELECT``, and then a ``PING`` that a server
wanting a password refuses with ``NOAUTH``; so a connection that is not
allowed to work is never handed to the buckets.  ``rediss://`` is the same
over TLS, the server verified (system CAs, or ``?ssl_ca_certs=FILE``; a client
certificate with ``ssl_certfile`` and ``ssl_keyfile``; the query names are
redis-py's).  A refusal (wrong password, TLS failure) is one error line,
repeated only when the reason changes; meanwhile the buckets decide by
their fallback, and the link retries with back-off.
"""

from __future__ import annotations

from typing import Any, Callable, Coroutine, Dict, List, Optional
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import attrs
import txredisapi
from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from svckit.clienttls import ClientTLS, describe_tls_failure
from svckit.endpoints import client_endpoint
from svckit.supervisor import backoff

log = Logger()

SETUP_TIMEOUT = 3.0
"""Seconds a new connection may take to be set up (TLS handshake, AUTH, SELECT, PING) before it is dropped."""

TLS_QUERY = {"ssl_ca_certs": "ca_file", "ssl_certfile": "cert_file", "ssl_keyfile": "key_file"}
"""The query arguments of a ``rediss://`` URL (redis-py's names) → :class:`ClientTLS` fields."""


@attrs.frozen
class RedisAddress:
    """Where Redis is and how to log in: a ``redis://`` or ``rediss://`` URL parsed."""

    host: str
    port: int
    db: int
    username: Optional[str] = None
    """An ACL user; None: the default user."""
    password: Optional[str] = attrs.field(default=None, repr=False)
    tls: Optional[ClientTLS] = None
    """None: cleartext (``redis://``)."""

    def describe(self) -> str:
        """The URL without its password (logs, pages)."""
        scheme = "rediss" if self.tls is not None else "redis"
        user = f"{quote(self.username or '', safe='')}:***@" if self.password is not None else ""
        return f"{scheme}://{user}{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis[s]://[[user]:password@]host[:port][/db][?ssl_ca_certs=...]``; ``ValueError`` saying what is wrong
    (never quoting the password)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError("expected redis://[[user]:password@]host[:port][/db] or rediss://...")
    db_part = parts.path.strip("/") or "0"
    if not db_part.isdigit():
        raise ValueError("the database of a Redis URL must be a number")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("the port of a Redis URL must be a number") from None
    if parts.username and parts.password is None:
        raise ValueError("a Redis user needs a password (redis://user:password@host)")
    tls_files: Dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in TLS_QUERY:
            raise ValueError(f"unknown Redis URL argument {key!r} (known: {', '.join(TLS_QUERY)})")
        tls_files[TLS_QUERY[key]] = value
    if tls_files and parts.scheme != "rediss":
        raise ValueError("TLS arguments need a rediss:// URL")
    tls = ClientTLS(**tls_files) if parts.scheme == "rediss" else None
    return RedisAddress(parts.hostname, port, int(db_part), unquote(parts.username) if parts.username else None,
                        unquote(parts.password) if parts.password is not None else None, tls)


def replication_id(info: Any) -> str:
    """``master_replid`` from the text of ``INFO replication`` ('' if it is not there)."""
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("master_replid:"):
            return line.split(":", 1)[1].strip()
    return ""


class RedisRefused(Exception):
    """Redis (or the TLS handshake) refused this connection's setup."""


class _Protocol(txredisapi.RedisProtocol):  # type: ignore[misc]
    """``RedisProtocol`` that remembers why its connection ended (a TLS failure says why there)."""

    lost_reason: Any = None

    def connectionLost(self, why: Any) -> None:
        self.lost_reason = why
        super().connectionLost(why)


class _ProtocolFactory(Factory):
    """Builds the protocols of :class:`RedisLink`, each set up (AUTH, SELECT, PING) by the link."""

    noisy = False

    def __init__(self, setup: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
        self.setup = setup

    def buildProtocol(self, addr: Any) -> Any:
        # Set-up runs beside ClientService rather than as its prepareConnection: a connection that drops
        # while being prepared (a TLS handshake refused) would wedge ClientService's state machine.
        protocol = _Protocol(convertNumbers=False)
        protocol.factory = self
        defer.ensureDeferred(self.setup(protocol))
        return protocol


class RedisLink(service.Service):
    """One connection to Redis, kept up by ``ClientService``; the protocol while it is up and set up."""

    def __init__(self, reactor: Any, url: str, connect_timeout: float = 1.0) -> None:
        self.reactor = reactor
        self.address = address = parse_redis_url(url)
        endpoint = client_endpoint(reactor, address.host.encode("idna"), address.port, connect_timeout)
        if address.tls is not None:
            endpoint = address.tls.wrap(endpoint, address.host)
        self.client = ClientService(endpoint, _ProtocolFactory(self._setup), retryPolicy=self._delay, clock=reactor)
        self.protocol: Any = None
        self.refusal: Optional[str] = None
        """Why the last connection's setup was refused (logged once per reason); None once one worked."""
        self._refused = 0
        """Set-ups refused in a row: the back-off goes on counting them (a connection that was made and then
        refused resets ``ClientService``'s own count)."""
        self._waiting: List[defer.Deferred[Any]] = []
        self.epoch = ""
        """The replication id (``master_replid``) of the Redis this link last set up a connection to: a new one
        when Redis restarted without its data, or a replica took over."""
        self.previous_epoch = ""
        """The one before :attr:`epoch`, when it differed ('' if this process has only known one Redis)."""

    def _delay(self, attempts: int) -> float:
        return backoff(max(attempts, self._refused), initial=0.1, maximum=2.0)

    async def _setup(self, protocol: Any) -> None:
        setup = defer.ensureDeferred(self._login(protocol))
        setup.addTimeout(SETUP_TIMEOUT, self.reactor)
        try:
            epoch = await setup
        except defer.TimeoutError:
            what = "the TLS handshake and login" if self.address.tls is not None else "the login"
            hint = " (does this port speak TLS?)" if self.address.tls is not None else ""
            self._refuse(protocol, f"{what} not answered within {SETUP_TIMEOUT:g}s{hint}")
            return
        except Exception as e:
            self._refuse(protocol, describe_tls_failure(protocol.lost_reason) if protocol.lost_reason else str(e))
            return
        if self.refusal is not None:
            log.info("Redis at {url} accepts this gateway again", url=self.address.describe())
        self.refusal, self._refused = None, 0
        if epoch != self.epoch:
            self.previous_epoch, self.epoch = self.epoch, epoch
        self.protocol = protocol
        self._answer_waiting(protocol)

    async def _login(self, protocol: Any) -> str:
        address = self.address
        await protocol.whenConnected()
        if address.password is not None:
            login = [address.username] if address.username is not None else []
            await protocol.execute_command("AUTH", *login, address.password)
        if address.db:
            await protocol.execute_command("SELECT", address.db)
        await protocol.execute_command("PING")  # NOAUTH here: Redis wants a password we were not given
        return replication_id(await protocol.execute_command("INFO", "replication"))

    def _refuse(self, protocol: Any, reason: str) -> None:
        self._refused += 1
        if protocol.transport is not None:
            protocol.transport.abortConnection()  # not loseConnection: a TLS close waits for the handshake
        if reason != self.refusal:
            self.refusal = reason
            log.error("Redis at {url} refused this gateway: {reason}; retrying, the buckets decide by their"
                      " fallback meanwhile", url=self.address.describe(), reason=reason)
        self._answer_waiting(Failure(RedisRefused(reason)))

    def _answer_waiting(self, outcome: Any) -> None:
        """Tell every caller of :meth:`connected` the protocol set up, or the ``Failure`` why none was."""
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    def current(self) -> Any:
        """The connected protocol, or None while Redis is away."""
        protocol = self.protocol
        if protocol is not None and protocol.connected:
            return protocol
        return None

    def connected(self) -> defer.Deferred[Any]:
        """The connected protocol now, or once the next connection is set up (failing if it is refused or
        cannot be made)."""
        protocol = self.current()
        if protocol is not None:
            return defer.succeed(protocol)
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiting.append(d)
        attempt: defer.Deferred[Any] = self.client.whenConnected(failAfterFailures=1)
        attempt.addErrback(self._unreachable, d)
        return d

    def _unreachable(self, failure: Any, d: defer.Deferred[Any]) -> None:
        if d in self._waiting:
            self._waiting.remove(d)
            d.errback(failure)

    def startService(self) -> None:
        """Connect, and keep reconnecting."""
        super().startService()
        self.client.startService()

    def stopService(self) -> defer.Deferred[None]:
        """Disconnect."""
        super().stopService()
        self._answer_waiting(Failure(RedisRefused("the gateway is stopping")))
        stopped: defer.Deferred[None] = self.client.stopService()
        return stopped
