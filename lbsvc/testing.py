"""Test doubles for lbsvc, shipped with the code they fake (as ``twisted.internet.testing`` is).

* :func:`memory_database`: the real schema and statements on SQLite in
  memory, every call run at once (:class:`svckit.testing.InlinePool`);
* :class:`ScriptedBackends`: dials backends in memory; each connection is a
  real :class:`~lbsvc.proxying.upstream.UpstreamConnection` on its own
  ``StringTransport`` (or a refusal, or a connect that never ends), so a test
  sees exactly which addresses were dialled and what was sent, and plays the
  backend's answer byte by byte;
* :func:`memory_gateway`: a gateway built by the daemon's own
  :func:`~lbsvc.build.build_gateway` on those, with a ``Clock``.

The HTTP answer helper is :func:`svckit.testing.response`.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import defer, error
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from lbsvc.backends.backend import Backend
from lbsvc.backends.servers import ServersConfig
from lbsvc.build import Gateway, build_gateway
from lbsvc.proxying.upstream import UpstreamConnection
from lbsvc.settings import default_settings
from lbsvc.users.sqlite import SQLiteDatabase
from svckit.testing import InlinePool

Address = Tuple[bytes, int]

REFUSE = "refuse"
"""A backend mode: the connection is refused."""
HANG = "hang"
"""A backend mode: the connection attempt never ends."""


def memory_database() -> SQLiteDatabase:
    """A user database in memory whose every call has fired when it returns."""
    return SQLiteDatabase(":memory:", pool=InlinePool(sqlite3.connect(":memory:")))


@implementer(IStreamClientEndpoint)
class _Dial:
    def __init__(self, backends: ScriptedBackends, address: Address) -> None:
        self.backends = backends
        self.address = address

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        return self.backends.connect(self.address, factory)


class ScriptedBackends:
    """Backends in memory, each connecting as :attr:`modes` says (by default: at once)."""

    def __init__(self, modes: Optional[Dict[Address, str]] = None) -> None:
        self.modes: Dict[Address, str] = dict(modes or {})
        """Address → :data:`REFUSE` or :data:`HANG`; any other address connects."""
        self.dialled: List[Address] = []
        """Every address dialled, in order."""
        self.connections: List[Tuple[Address, UpstreamConnection, StringTransport]] = []
        """Every connection made: its address, the gateway's protocol, its transport."""

    def endpoint_for(self, backend: Backend) -> IStreamClientEndpoint:
        """The endpoint the gateway dials ``backend`` with (``build_gateway``'s ``endpoint_for``)."""
        return _Dial(self, (backend.host, backend.port))

    def connect(self, address: Address, factory: Any) -> defer.Deferred[Any]:
        """Dial ``address`` as its mode says."""
        self.dialled.append(address)
        mode = self.modes.get(address)
        if mode == REFUSE:
            return defer.fail(error.ConnectionRefusedError())
        if mode == HANG:
            return defer.Deferred()
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((address, protocol, transport))
        return defer.succeed(protocol)

    def sent(self, index: int = -1) -> bytes:
        """What connection ``index`` was sent."""
        value: bytes = self.connections[index][2].value()
        return value

    def answer(self, raw: bytes, index: Optional[int] = None) -> None:
        """Data from connection ``index`` (by default the last busy one)."""
        if index is None:
            index = max(i for i, (_, c, _) in enumerate(self.connections) if c.busy)
        self.connections[index][1].dataReceived(raw)


def memory_gateway(servers: ServersConfig, backends: ScriptedBackends, clock: Optional[Clock] = None,
                   **settings: Any) -> Gateway:
    """A gateway on ``servers`` (dialled through ``backends``), a memory database and ``clock``; ``settings``
    change the options' defaults (the access log is off unless asked for)."""
    return build_gateway(default_settings(servers, **{"access_log": "off", **settings}), clock or Clock(),
                         memory_database(), endpoint_for=backends.endpoint_for)
