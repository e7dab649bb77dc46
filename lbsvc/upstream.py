"""Connections to backends: persistent, and with Nagle's algorithm off.

``twisted.web.client.Agent`` is built over an endpoint factory whose
connections set ``TCP_NODELAY``, so small requests and their final chunks go
out at once instead of waiting for the backend's delayed ACK.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from twisted.internet import endpoints
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web import client
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer


@implementer(IStreamClientEndpoint)
class _NoDelayEndpoint:
    def __init__(self, wrapped: Any) -> None:
        self._wrapped = wrapped

    def connect(self, factory: Any) -> Any:
        def nodelay(protocol: Any) -> Any:
            if hasattr(protocol.transport, "setTcpNoDelay"):
                protocol.transport.setTcpNoDelay(True)
            return protocol

        return self._wrapped.connect(factory).addCallback(nodelay)


@implementer(IAgentEndpointFactory)
class NoDelayEndpointFactory:
    """Plain-HTTP endpoints (``HostnameEndpoint``) with ``TCP_NODELAY``.

    The agent asks for an endpoint on every request, even when its pool has
    a connection to reuse; building a ``HostnameEndpoint`` runs IDNA encoding
    of the host name, a measurable share of a proxied request, so one
    endpoint per backend is kept.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self._endpoints: Dict[Tuple[Any, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        """The endpoint for a backend URI."""
        key = (uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            host = uri.host.decode("ascii") if isinstance(uri.host, bytes) else uri.host
            endpoint = _NoDelayEndpoint(
                endpoints.HostnameEndpoint(self.reactor, host, uri.port, timeout=self.connect_timeout)
            )
            self._endpoints[key] = endpoint
        return endpoint


def upstream_agent(reactor: Any, persistent: bool = True, connect_timeout: float = 5.0) -> IAgent:
    """An agent for backends, with a persistent pool when ``persistent``."""
    pool = client.HTTPConnectionPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = 64
    agent: IAgent = client.Agent.usingEndpointFactory(
        reactor, NoDelayEndpointFactory(reactor, connect_timeout), pool=pool
    )
    return agent
