"""The upstream client's idle connections: per backend, most recently used first.

Up to ``pool_size`` idle connections are kept per backend (scheme, host, port
and CA file: :data:`~lbsvc.proxying.upstream.Key`) and handed out most
recently used first; a backend with none idle gets a new connection, over TLS
for ``https`` (:mod:`lbsvc.backends.tls`).  A connection that failed to be
made is a :class:`~lbsvc.proxying.upstream.ConnectFailed`: nothing was sent.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from lbsvc.backends.backend import Backend
from lbsvc.backends.tls import BackendTLS
from lbsvc.proxying.upstream import ConnectFailed, IConnectionKeeper, Key, UpstreamConnection
from svckit.endpoints import client_endpoint


class _ConnectionFactory(Factory):
    noisy = False  # no "Starting factory" line for every new connection

    def __init__(self, pool: UpstreamConnections, key: Key) -> None:
        self.pool = pool
        self.key = key

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self.pool, self.key)


@implementer(IConnectionKeeper)
class UpstreamConnections:
    """Idle connections per backend, and new ones when none is idle."""

    def __init__(self, reactor: Any, connect_timeout: float, pool_size: int = 64,
                 endpoint_for: Optional[Callable[[Backend], IStreamClientEndpoint]] = None,
                 tls: Optional[BackendTLS] = None) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.pool_size = pool_size
        self.tls = tls or BackendTLS()
        self._endpoint_for = endpoint_for or self._endpoint
        self._idle: Dict[Key, List[UpstreamConnection]] = {}
        self._endpoints: Dict[Key, IStreamClientEndpoint] = {}

    def _endpoint(self, backend: Backend) -> IStreamClientEndpoint:
        """TCP to the backend, with TLS on top for ``https``."""
        endpoint = client_endpoint(self.reactor, backend.host, backend.port, self.connect_timeout)
        if backend.scheme == b"https":
            return self.tls.wrap(endpoint, backend.host, backend.ca_file)
        return endpoint

    @property
    def idle(self) -> int:
        """Idle connections, all backends together."""
        return sum(len(v) for v in self._idle.values())

    def idle_connection(self, backend: Backend) -> Optional[UpstreamConnection]:
        """The most recently used idle connection to ``backend``, taken out of the pool; ``None`` if there is
        none (the data path asks this first: no ``Deferred`` when a connection is at hand)."""
        idle = self._idle.get((backend.scheme, backend.host, backend.port, backend.ca_file))
        while idle:
            connection = idle.pop()
            if connection.connected:
                return connection
        return None

    def connection(self, backend: Backend, fresh: bool = False) -> defer.Deferred[UpstreamConnection]:
        """An idle connection to ``backend`` (unless ``fresh``), else a new one."""
        connection = None if fresh else self.idle_connection(backend)
        if connection is not None:
            return defer.succeed(connection)
        key = (backend.scheme, backend.host, backend.port, backend.ca_file)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._endpoint_for(backend)
        d = endpoint.connect(_ConnectionFactory(self, key))

        def failed(reason: Failure) -> Failure:
            if reason.check(defer.CancelledError):
                return reason
            return Failure(ConnectFailed(reason.getErrorMessage()))

        d.addErrback(failed)
        return d  # type: ignore[return-value]

    def release(self, connection: UpstreamConnection) -> None:
        """A connection is free again: keep it, or close it if the pool is full."""
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.pool_size:
            connection.transport.loseConnection()  # type: ignore[union-attr]
        else:
            idle.append(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        """A connection closed: it is no longer idle."""
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        """Close every idle connection (the gateway is stopping)."""
        for idle in self._idle.values():
            for connection in list(idle):
                connection.transport.loseConnection()  # type: ignore[union-attr]
        self._idle.clear()
