"""A broker in memory that speaks the stream protocol, for tests of clients (shipped like
``twisted.internet.testing``).

:class:`MemoryStreamBroker` keeps streams as lists of records and serves any
number of :class:`BrokerConnection`\\ s: the handshake, ``Create``/``Delete``/
``Metadata``, named publishers with deduplication (ids at or below the
stored one are dropped and confirmed, as RabbitMQ does), ``Publish`` of
single entries and sub-entry batches (a chunk per frame), subscriptions from
an offset with credit (whole chunks, the first one may begin before the
offset asked for), ``Unsubscribe``, heartbeats and ``Close``.  Tests connect
a :class:`~txrabbitstream.protocol.StreamClient` to a connection with
``twisted.test.iosim`` and pump bytes between them.  ``hold_confirms`` keeps
confirms back (a broker that stored but did not answer).
"""

from __future__ import annotations

import struct
from typing import Any, Dict, List, Tuple

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.test import iosim
from zope.interface import implementer

from txrabbitstream import frames
from txrabbitstream.chunk import build_chunk
from txrabbitstream.frames import Reader

Chunk = Tuple[int, List[List[bytes]]]
"""A stored chunk: its first offset and its entries (each a list of records)."""


class MemoryStream:
    """One stream: its chunks in order."""

    def __init__(self) -> None:
        self.chunks: List[Chunk] = []
        self.next_offset = 0

    def append(self, entries: List[List[bytes]]) -> None:
        self.chunks.append((self.next_offset, entries))
        self.next_offset += sum(len(e) for e in entries)

    @property
    def records(self) -> List[bytes]:
        return [r for _, entries in self.chunks for e in entries for r in e]


class MemoryStreamBroker:
    """Streams and publisher sequences shared by every connection."""

    def __init__(self, host: str = "localhost", port: int = 5552) -> None:
        self.streams: Dict[str, MemoryStream] = {}
        self.sequences: Dict[Tuple[str, str], int] = {}
        """``(stream, reference)`` → the last publishing id stored."""
        self.host, self.port = host, port
        self.connections: List[BrokerConnection] = []
        self.hold_confirms = False

    def connection(self) -> BrokerConnection:
        connection = BrokerConnection(self)
        self.connections.append(connection)
        return connection

    def delete(self, stream: str) -> None:
        """Delete ``stream`` and tell every connection using it (``MetadataUpdate``)."""
        self.streams.pop(stream, None)
        for key in [k for k in self.sequences if k[0] == stream]:
            del self.sequences[key]
        for connection in self.connections:
            connection.stream_gone(stream)


class BrokerConnection(Protocol):
    """The broker's end of one client connection."""

    def __init__(self, broker: MemoryStreamBroker) -> None:
        self.broker = broker
        self.reader = frames.FrameReader()
        self.publishers: Dict[int, Tuple[str, str]] = {}
        self.subscriptions: Dict[int, List[Any]] = {}  # id -> [stream, next chunk index, credit]
        self.received: List[int] = []
        """The key of every frame the client sent."""

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def respond(self, key: int, correlation: int, code: int = frames.OK, rest: bytes = b"") -> None:
        self.write(frames.request(key | frames.RESPONSE, correlation, struct.pack(">H", code) + rest))

    def dataReceived(self, data: bytes) -> None:
        for frame in self.reader.feed(data):
            key, _ = frames.head(frame)
            self.received.append(key)
            self.frame(key, Reader(frame, 4))

    def frame(self, key: int, r: Reader) -> None:
        if key == frames.HEARTBEAT or key == frames.TUNE:
            return
        if key == frames.PUBLISH:
            self.publish(r)
            return
        if key == frames.CREDIT:
            subscription, credit = r.u8(), r.u16()
            if subscription not in self.subscriptions:
                self.write(frames.command(frames.CREDIT | frames.RESPONSE,
                                          struct.pack(">HB", frames.SUBSCRIPTION_ID_DOES_NOT_EXIST, subscription)))
                return
            self.subscriptions[subscription][2] += credit
            self.deliver()
            return
        correlation = r.u32()
        if key == frames.PEER_PROPERTIES:
            self.respond(key, correlation, rest=frames.properties({"product": "memory"}))
        elif key == frames.SASL_HANDSHAKE:
            self.respond(key, correlation, rest=struct.pack(">I", 1) + frames.string("PLAIN"))
        elif key == frames.SASL_AUTHENTICATE:
            self.respond(key, correlation, rest=struct.pack(">I", 0))
            self.write(frames.tune(1024 * 1024, 0))  # RabbitMQ's default frame size, no heartbeat
        elif key == frames.OPEN:
            self.respond(key, correlation, rest=frames.properties({}))
        elif key == frames.CREATE:
            name = r.string() or ""
            exists = name in self.broker.streams
            self.broker.streams.setdefault(name, MemoryStream())
            self.respond(key, correlation, frames.STREAM_ALREADY_EXISTS if exists else frames.OK)
        elif key == frames.DELETE:
            name = r.string() or ""
            self.respond(key, correlation, frames.OK if name in self.broker.streams else frames.STREAM_DOES_NOT_EXIST)
            self.broker.delete(name)
        elif key == frames.METADATA:
            names = [r.string() or "" for _ in range(r.u32())]
            body = struct.pack(">IH", 1, 0) + frames.string(self.broker.host) + struct.pack(">I", self.broker.port)
            body += struct.pack(">I", len(names))
            for name in names:
                code = frames.OK if name in self.broker.streams else frames.STREAM_DOES_NOT_EXIST
                body += frames.string(name) + struct.pack(">HHI", code, 0, 0)
            self.write(frames.request(frames.METADATA | frames.RESPONSE, correlation, body))
        elif key == frames.DECLARE_PUBLISHER:
            publisher, reference, name = r.u8(), r.string() or "", r.string() or ""
            if name not in self.broker.streams:
                self.respond(key, correlation, frames.STREAM_DOES_NOT_EXIST)
                return
            self.publishers[publisher] = (name, reference)
            self.respond(key, correlation)
        elif key == frames.QUERY_PUBLISHER_SEQUENCE:
            reference, name = r.string() or "", r.string() or ""
            self.respond(key, correlation, rest=struct.pack(">Q", self.broker.sequences.get((name, reference), 0)))
        elif key == frames.SUBSCRIBE:
            self.subscribe(correlation, r)
        elif key == frames.UNSUBSCRIBE:
            self.subscriptions.pop(r.u8(), None)
            self.respond(key, correlation)
        elif key == frames.CLOSE:
            self.respond(key, correlation)
            if self.transport is not None:
                self.transport.loseConnection()
        else:
            self.respond(key, correlation, frames.UNKNOWN_FRAME)

    def publish(self, r: Reader) -> None:
        publisher = r.u8()
        name, reference = self.publishers.get(publisher, ("", ""))
        stream = self.broker.streams.get(name)
        entries: List[List[bytes]] = []
        confirmed: List[int] = []
        refused: List[int] = []
        for _ in range(r.u32()):
            publishing_id, header = r.u64(), r.u32()
            if header & 0x80000000:
                r.position -= 4
                r.u8()
                count, _raw, size = r.u16(), r.u32(), r.u32()
                body = Reader(r.raw(size))
                records = [body.raw(body.u32()) for _ in range(count)]
            else:
                records = [r.raw(header)]
            if stream is None:
                refused.append(publishing_id)
                continue
            stored = self.broker.sequences.get((name, reference), 0) if reference else 0
            if not reference or publishing_id > stored:
                entries.append(records)
                if reference:
                    self.broker.sequences[(name, reference)] = publishing_id
            confirmed.append(publishing_id)  # a duplicate is dropped and confirmed
        if stream is not None and entries:
            stream.append(entries)
        if refused:
            self.write(frames.command(frames.PUBLISH_ERROR, struct.pack(">BI", publisher, len(refused)) + b"".join(
                struct.pack(">QH", i, frames.PUBLISHER_DOES_NOT_EXIST) for i in refused)))
        if confirmed and not self.broker.hold_confirms:
            self.write(frames.command(frames.PUBLISH_CONFIRM, struct.pack(">BI", publisher, len(confirmed))
                                      + b"".join(struct.pack(">Q", i) for i in confirmed)))
        for connection in self.broker.connections:
            connection.deliver()

    def subscribe(self, correlation: int, r: Reader) -> None:
        subscription, name, kind = r.u8(), r.string() or "", r.u16()
        offset = r.u64() if kind == frames.OFFSET_AT else (r.u64() if kind == frames.OFFSET_TIMESTAMP else 0)
        credit = r.u16()
        stream = self.broker.streams.get(name)
        if stream is None:
            self.respond(frames.SUBSCRIBE, correlation, frames.STREAM_DOES_NOT_EXIST)
            return
        if subscription in self.subscriptions:
            self.respond(frames.SUBSCRIBE, correlation, frames.SUBSCRIPTION_ID_ALREADY_EXISTS)
            return
        index = 0
        if kind == frames.OFFSET_LAST:
            index = max(0, len(stream.chunks) - 1)
        elif kind == frames.OFFSET_NEXT:
            index = len(stream.chunks)
        elif kind == frames.OFFSET_AT:
            while index < len(stream.chunks) - 1 and stream.chunks[index + 1][0] <= offset:
                index += 1
        self.subscriptions[subscription] = [name, index, credit]
        self.respond(frames.SUBSCRIBE, correlation)
        self.deliver()

    def deliver(self) -> None:
        for subscription, state in list(self.subscriptions.items()):
            stream = self.broker.streams.get(state[0])
            while stream is not None and state[2] > 0 and state[1] < len(stream.chunks):
                first, entries = stream.chunks[state[1]]
                state[1] += 1
                state[2] -= 1
                self.write(frames.command(frames.DELIVER, bytes((subscription,)) + build_chunk(first, entries)))

    def stream_gone(self, stream: str) -> None:
        gone = [s for s, state in self.subscriptions.items() if state[0] == stream]
        for subscription in gone:
            del self.subscriptions[subscription]
        if gone or any(name == stream for name, _ in self.publishers.values()):
            self.write(frames.command(frames.METADATA_UPDATE, struct.pack(">H", frames.STREAM_NOT_AVAILABLE)
                                      + frames.string(stream)))


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects a client's protocol to a new connection of ``broker``, in memory; :meth:`flush` moves the
    bytes both ways until neither side has more to say."""

    def __init__(self, broker: MemoryStreamBroker) -> None:
        self.broker = broker
        self.pumps: List[iosim.IOPump] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        client = factory.buildProtocol(None)
        server = self.broker.connection()
        self.pumps.append(iosim.connect(server, iosim.FakeTransport(server, isServer=True),
                                        client, iosim.FakeTransport(client, isServer=False), greet=False))
        return defer.succeed(client)

    def flush(self) -> None:
        for _ in range(50):
            if not any([pump.pump() for pump in self.pumps]):
                return
