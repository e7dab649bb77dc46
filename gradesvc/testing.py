"""Test doubles for gradesvc, shipped with the code they fake (as ``twisted.internet.testing`` is).

* :class:`MemoryBroker`: the broker connection and the stream in memory; a
  publish is confirmed and (unless stalled) delivered at once to the
  replica's real consumer at the next offset; sync markers and reconnects
  are recorded;
* :func:`memory_replica`: a replica built by the daemon's own
  :func:`~gradesvc.build.build_replica` on a :class:`MemoryBroker`, a
  ``Clock`` and a fixed wall clock; its routers are served in memory (treq's
  ``StubTreq``), its ports never opened.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, Union

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from gradesvc.build import Replica, build_replica
from gradesvc.config import default_config
from gradesvc.state.datadir import DataDir
from gradesvc.state.identity import StreamId
from gradesvc.stream.consumer import StreamConsumer
from gradesvc.stream.link import BrokerUnavailable, IBroker, Outgoing, StreamDeleted
from gradesvc.stream.messages import BATCH_TYPE, MARKER_TYPE, WriteBatch, WriteMessage

WALL = 1000.0
"""The wall clock of a :func:`memory_replica`, in seconds."""


@implementer(IBroker)
class MemoryBroker:
    """Stands in for an :class:`~gradesvc.stream.link.IBroker` and its stream, in memory."""

    stream = "grades"
    stream_id = StreamId("/", "grades")
    protocol = "memory"
    link = None

    def __init__(self) -> None:
        self.published: List[Union[WriteMessage, WriteBatch]] = []
        """Every write (or batch of writes) published, decoded."""
        self.on_stream_recreated: List[Callable[[], None]] = []
        self.deleted = False
        """Refuse publishes as if the stream were deleted under them."""
        self.markers: List[str] = []
        """The nonce of every sync marker published (recorded, not delivered: a test delivers it)."""
        self.on_connect: List[Any] = []
        self.reconnects: List[Tuple[Any, Optional[float]]] = []
        """``reconnect_later`` calls: the connection and the delay asked for."""
        self.consumer: Optional[StreamConsumer] = None
        """Whose ``handle`` each publish is delivered to."""
        self.offset = -1
        """The stream's last offset."""
        self.down = False
        """Refuse publishes (not connected)."""
        self.stalled = False
        """Confirm publishes without delivering them."""

    async def publish(self, message: Outgoing) -> None:
        """Confirm a write at the next offset and deliver it unless stalled; record a sync marker."""
        if self.down:
            raise BrokerUnavailable("not connected to the broker")
        if self.deleted:
            raise StreamDeleted("the stream is gone")
        if message.kind == MARKER_TYPE:
            self.markers.append(json.loads(message.body)["marker"])
            return
        decode = WriteBatch.decode if message.kind == BATCH_TYPE else WriteMessage.decode
        self.published.append(decode(message.body))
        self.offset += 1
        if not self.stalled and self.consumer is not None:
            self.consumer.applier.handle(self.offset, message.kind, message.body)
            self.consumer.applier.batch_done()

    def reconnect_later(self, link: Any = None, delay: Optional[float] = None) -> Deferred[None]:
        """Record that the consumer asked for a new connection."""
        self.reconnects.append((link, delay))
        return succeed(None)

    def when_connected(self) -> Deferred[Any]:
        """Never connected: nothing here reads the stream but the consumer, fed by :meth:`publish`."""
        return Deferred()


def memory_replica(path: Path, broker: MemoryBroker, clock: Optional[Clock] = None, replica_id: str = "r1",
                   admin: Tuple[str, str] = ("admin", "s3cret"), **config: Any) -> Replica:
    """A replica on ``broker`` (delivering to its consumer) with data directory ``path``; ``config`` changes the
    options' defaults (the access log is off unless asked for)."""
    settings = default_config(replica_id, admin[0], admin[1], str(path), **{"access_log": "off", **config})
    data_dir = DataDir(path, broker.stream_id, replica_id)
    replica = build_replica(settings, clock or Clock(), data_dir, broker, wall=lambda: WALL)
    broker.consumer = replica.consumer
    return replica
