"""Client endpoints from a host and port: an IP address directly, a name through ``HostnameEndpoint``."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import endpoints
from twisted.internet.interfaces import IStreamClientEndpoint


def client_endpoint(reactor: Any, host: bytes, port: int, timeout: float) -> IStreamClientEndpoint:
    """A TCP client endpoint: an IP address directly, a name through ``HostnameEndpoint``."""
    name = host.decode("ascii")
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return endpoints.HostnameEndpoint(reactor, name, port, timeout=timeout)
    kind = endpoints.TCP4ClientEndpoint if address.version == 4 else endpoints.TCP6ClientEndpoint
    endpoint: IStreamClientEndpoint = kind(reactor, name, port, timeout=timeout)
    return endpoint
