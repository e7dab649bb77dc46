"""TLS to ``https://`` backends: certificates and host names verified, SNI sent.

Each ``https`` backend is reached through Twisted's ``wrapClientTLS`` around
the same TCP endpoint a plain backend uses, with connection options from
``optionsForClientTLS``: the backend's certificate must chain to the system's
CAs (``platformTrust``) or, when the backend names one, to the certificates
in its ``ca_file``; its host name (or IP address) must match the
certificate (``service_identity``); the host name goes out as SNI.  Pooled
connections stay TLS connections: the handshake is paid once per connection,
not per request.

:class:`BackendTLS` makes those options once per (host, CA file) and hands
them to the upstream pool and, as an ``IPolicyForHTTPS``, to the health
checks' agent, so both verify a backend the same way.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from svckit.clienttls import ClientTLS


class BackendTLS:
    """Client TLS options for backends, made once per (host, CA file)."""

    def __init__(self) -> None:
        self._creators: Dict[Tuple[bytes, Optional[str]], IOpenSSLClientConnectionCreator] = {}

    def creator(self, host: bytes, ca_file: Optional[str]) -> IOpenSSLClientConnectionCreator:
        """The connection options for a backend at ``host`` trusting ``ca_file`` (None: the system's CAs)."""
        key = (host, ca_file)
        creator = self._creators.get(key)
        if creator is None:
            creator = self._creators[key] = ClientTLS(ca_file).creator(host.decode("idna"))
        return creator

    def wrap(self, endpoint: IStreamClientEndpoint, host: bytes, ca_file: Optional[str]) -> IStreamClientEndpoint:
        """``endpoint`` with TLS on top, verified for ``host``."""
        return wrapClientTLS(self.creator(host, ca_file), endpoint)


@implementer(IPolicyForHTTPS)
class ProbePolicy:
    """The health checks' TLS policy: a backend's own CA file, else the system's CAs."""

    def __init__(self, tls: BackendTLS, ca_file_of: Callable[[bytes, int], Optional[str]]) -> None:
        self.tls = tls
        self.ca_file_of = ca_file_of

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """Options for the backend at ``hostname:port``."""
        return self.tls.creator(hostname, self.ca_file_of(hostname, port))
