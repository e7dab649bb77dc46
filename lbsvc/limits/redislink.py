"""One connection to Redis, kept up: what the Redis buckets and the heartbeat talk through.

The client is ``txredisapi``'s ``RedisProtocol`` (Twisted-native, pure
Python, runs on PyPy) on one connection kept up by Twisted's
``ClientService`` with a back-off.  :meth:`RedisLink.current` is the connected
protocol, or None while Redis is away, so a caller can decide at once
instead of queueing behind a reconnect.
"""

from __future__ import annotations

from typing import Any, Tuple
from urllib.parse import urlsplit

import txredisapi
from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from svckit.endpoints import client_endpoint

log = Logger()


def parse_redis_url(url: str) -> Tuple[str, int, int]:
    """``redis://host[:port][/db]`` → (host, port, db); ``ValueError`` saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"expected redis://host[:port][/db], not {url!r}")
    db_part = parts.path.strip("/") or "0"
    if not db_part.isdigit():
        raise ValueError(f"the database of {url!r} must be a number")
    return parts.hostname, parts.port or 6379, int(db_part)


class _ProtocolFactory(Factory):
    """Builds ``txredisapi`` protocols for :class:`RedisLink` (and takes their error reports)."""

    noisy = False
    isLazy = True  # read by the protocol when AUTH or SELECT fails

    def __init__(self, db: int) -> None:
        self.db = db

    def buildProtocol(self, addr: Any) -> Any:
        protocol = txredisapi.RedisProtocol(dbid=self.db, convertNumbers=False)
        protocol.factory = self
        return protocol

    def stopTrying(self) -> None:
        """Called by the protocol on a refused SELECT; the link keeps trying anyway."""

    def connectionError(self, message: str) -> None:
        """Called by the protocol on a refused SELECT."""
        log.error("Redis refused the connection's setup: {message}", message=message)


class RedisLink(service.Service):
    """One connection to Redis, kept up by ``ClientService``; the protocol while it is up."""

    def __init__(self, reactor: Any, url: str, connect_timeout: float = 1.0) -> None:
        host, port, db = parse_redis_url(url)
        self.client = ClientService(
            client_endpoint(reactor, host.encode("idna"), port, connect_timeout), _ProtocolFactory(db),
            retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=2.0), clock=reactor,
            prepareConnection=self._prepare,
        )
        self.protocol: Any = None

    def _prepare(self, protocol: Any) -> defer.Deferred[Any]:
        ready: defer.Deferred[Any] = protocol.whenConnected()  # after SELECT
        return ready.addCallback(self._ready)

    def _ready(self, protocol: Any) -> Any:
        self.protocol = protocol
        return protocol

    def current(self) -> Any:
        """The connected protocol, or None while Redis is away."""
        protocol = self.protocol
        if protocol is not None and protocol.connected:
            return protocol
        return None

    def connected(self) -> defer.Deferred[Any]:
        """The connected protocol now, or once the next attempt connects (failing if it does not)."""
        protocol = self.current()
        if protocol is not None:
            return defer.succeed(protocol)
        d: defer.Deferred[Any] = self.client.whenConnected(failAfterFailures=1)
        return d.addCallback(lambda _: self.protocol)

    def startService(self) -> None:
        """Connect, and keep reconnecting."""
        super().startService()
        self.client.startService()

    def stopService(self) -> defer.Deferred[None]:
        """Disconnect."""
        super().stopService()
        d: defer.Deferred[None] = self.client.stopService()
        return d
