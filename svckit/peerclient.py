"""An HTTP client for a daemon's own peers: ``https://`` verified against the operator's CA.

``treq``'s :class:`~treq.client.HTTPClient` over an ``Agent`` whose TLS
policy is a :class:`~svckit.clienttls.ClientTLS`: the peer's certificate
must chain to the CA file given (or the system's CAs) and name the peer's
host; a client certificate goes along when one is configured.  Its ``get``
takes the same arguments as ``treq.get`` (``auth=(user, password)`` sends
Basic credentials), so it stands in for the module wherever a peer is asked.
"""

from __future__ import annotations

from typing import Any, Dict

from treq.client import HTTPClient
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from svckit.clienttls import ClientTLS


@implementer(IPolicyForHTTPS)
class PeerPolicy:
    """Every ``https://`` peer verified by one :class:`ClientTLS`; the options made once per host (the
    files are read then, not on every new connection)."""

    def __init__(self, tls: ClientTLS) -> None:
        self.tls = tls
        self._creators: Dict[bytes, IOpenSSLClientConnectionCreator] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """The connection options for the peer at ``hostname``."""
        creator = self._creators.get(hostname)
        if creator is None:
            creator = self._creators[hostname] = self.tls.creator(hostname.decode("idna"))
        return creator


def peer_client(reactor: Any, tls: ClientTLS) -> HTTPClient:
    """A pooled HTTP client whose ``https://`` requests are verified by ``tls``."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    return HTTPClient(Agent(reactor, contextFactory=PeerPolicy(tls), pool=pool))
