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
from typing import Any, List, Optional, Tuple, cast

from twisted.internet.task import Clock

from gradesvc.build import Replica, build_replica
from gradesvc.config import default_config
from gradesvc.state.datadir import DataDir
from gradesvc.state.identity import StreamId
from gradesvc.stream.broker import BrokerService, BrokerUnavailable
from gradesvc.stream.consumer import StreamConsumer
from gradesvc.stream.messages import MARKER_TYPE, WriteMessage

WALL = 1000.0
"""The wall clock of a :func:`memory_replica`, in seconds."""


class MemoryBroker:
    """Stands in for :class:`~gradesvc.stream.broker.BrokerService` and its stream, in memory."""

    stream = "grades"
    stream_id = StreamId("/", "grades")

    def __init__(self) -> None:
        self.published: List[WriteMessage] = []
        """Every write published, decoded."""
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

    async def publish(self, body: bytes, properties: Any) -> None:
        """Confirm a write at the next offset and deliver it unless stalled; record a sync marker."""
        if self.down:
            raise BrokerUnavailable("not connected to the broker")
        if properties.type == MARKER_TYPE:
            self.markers.append(json.loads(body)["marker"])
            return
        self.published.append(WriteMessage.decode(body))
        self.offset += 1
        if not self.stalled and self.consumer is not None:
            self.consumer.applier.handle(self.offset, properties, body)
            self.consumer.applier.batch_done()

    def reconnect_later(self, connection: Any, delay: Optional[float] = None) -> None:
        """Record that the consumer asked for a new connection."""
        self.reconnects.append((connection, delay))


def memory_replica(path: Path, broker: MemoryBroker, clock: Optional[Clock] = None, replica_id: str = "r1",
                   admin: Tuple[str, str] = ("admin", "s3cret"), **config: Any) -> Replica:
    """A replica on ``broker`` (delivering to its consumer) with data directory ``path``; ``config`` changes the
    options' defaults (the access log is off unless asked for)."""
    settings = default_config(replica_id, admin[0], admin[1], str(path), **{"access_log": "off", **config})
    data_dir = DataDir(path, broker.stream_id, replica_id)
    replica = build_replica(settings, clock or Clock(), data_dir, cast(BrokerService, broker), wall=lambda: WALL)
    broker.consumer = replica.consumer
    return replica
