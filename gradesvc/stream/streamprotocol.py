"""The stream over RabbitMQ's stream protocol (:mod:`txrabbitstream`).

**Publishing in batches.**  Every message published in one reactor turn goes
out at the end of that turn in one ``Publish`` frame as one sub-entry batch
(split only where a frame would pass the agreed size): one publishing id,
one confirm, one chunk entry, however many writes arrived together.  No
timer is added: a lone write leaves in the turn it arrived.

**No duplicate on reconnect.**  The replica publishes as a *named* publisher
whose reference is made per process (``gradesvc-<replica id>-<random>``),
so two processes never share one, even two replicas given the same
``--replica-id``.  Publishing ids increase for the life of the process.
Whatever is not confirmed when a connection is lost is sent again on the
next one, with the same ids: the broker drops (and confirms) the ones it
already has, and ``QueryPublisherSequence`` moves the next id past them.
The broker tracks the last id of each reference and, whenever it starts a
new segment (every 500 MB by default), carries only the 255 that wrote
most recently into it (osiris' ``MAX_SEQUENCES``): the references of
processes that are gone age out, so what restarts leave is bounded.

**Reading in chunks.**  A subscription gets whole chunks (credit is granted
one chunk at a time, once the previous one is handled); each chunk's records
are one batch, so a bulk write, always inside one chunk, is applied in one
step.  Records before the asked offset (the first chunk may begin earlier)
and tracking chunks are passed over.

**A cluster.**  After connecting, the stream's leader is asked of
``Metadata``; when it is another of the configured nodes, the replica moves
there (publishing goes to the leader; reading would work from any member).
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Tuple, cast
from urllib.parse import unquote, urlsplit

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorCore, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from gradesvc.state.phase import ReplicaStatus
from gradesvc.stream.broker import (
    STREAM_PORT,
    ReconnectingBroker,
    node_urls,
    redact,
    stream_port_of,
    tcp_endpoint,
    vhost_of,
)
from gradesvc.stream.link import (
    BrokerUnavailable,
    Delivery,
    IBroker,
    IStreamLink,
    ISubscription,
    Outgoing,
    Start,
    StreamDeleted,
    SubscriptionEnded,
)
from txrabbitstream import amqp10, frames
from txrabbitstream.chunk import USER, Chunk
from txrabbitstream.protocol import StreamClient, StreamError

log = Logger()

PUBLISHER_ID = 1
KIND = "x-basic-type"
HEARTBEAT = 10
CHUNK_CREDIT = 10
"""Chunks a busy subscription may have on their way."""
GONE = (frames.STREAM_DOES_NOT_EXIST, frames.PUBLISHER_DOES_NOT_EXIST, frames.STREAM_NOT_AVAILABLE)
_PREFIXES: Dict[str, bytes] = {}


def encode(message: Outgoing) -> bytes:
    """A message as the stream stores it: its kind as an application property, its body as data."""
    prefix = _PREFIXES.get(message.kind)
    if prefix is None:
        prefix = _PREFIXES[message.kind] = amqp10.application_properties({KIND: message.kind})
    return prefix + amqp10.data(message.body)


def delivery(offset: int, record: bytes) -> Delivery:
    """``(offset, kind, body)`` of a stored record; this replica's own encoding is read without decoding."""
    if record[:_WRITE_HEAD] == _WRITE:  # the common case first: a write, its data section under 256 bytes
        return offset, "write", record[_WRITE_HEAD + 1:_WRITE_HEAD + 1 + record[_WRITE_HEAD]]
    for kind, prefix in _PREFIXES.items():
        if record.startswith(prefix):
            at = len(prefix)
            if record[at:at + 4] == b"\x00\x53\x75\xa0":
                return offset, kind, record[at + 5:at + 5 + record[at + 4]]
            if record[at:at + 4] == b"\x00\x53\x75\xb0":
                size = int.from_bytes(record[at + 4:at + 8], "big")
                return offset, kind, record[at + 8:at + 8 + size]
    properties, body = amqp10.decode(record)
    named = properties.get(KIND)
    return offset, named if isinstance(named, str) else None, body


for _kind in ("write", "write-batch", "sync-marker"):
    encode(Outgoing(_kind, b"", "", ""))
_WRITE = _PREFIXES["write"] + b"\x00\x53\x75\xa0"
_WRITE_HEAD = len(_WRITE)


@implementer(ISubscription)
class StreamSubscription:
    """Chunks of one subscription as batches of deliveries."""

    def __init__(self, link: StreamLink, subscription_id: int, start: Start) -> None:
        self.link = link
        self.subscription_id = subscription_id
        self.start = start if isinstance(start, int) else -1
        self._batches: Deque[List[Delivery]] = deque()
        self._waiting: Optional[defer.Deferred[List[Delivery]]] = None
        self._ended: Optional[BaseException] = None

    def chunk(self, chunk: Chunk) -> None:
        """A chunk arrived: its records from :attr:`start` on become one batch."""
        offset, start = chunk.first_offset, self.start
        if chunk.kind != USER or chunk.next_offset <= start:
            self.link.client.credit(self.subscription_id, 1)
            return
        batch = [delivery(offset + i, record) for i, record in enumerate(chunk.records) if offset + i >= start]
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(batch)
        else:
            self._batches.append(batch)

    def end(self, reason: BaseException) -> None:
        """No more chunks: the connection or the stream is gone."""
        if self._ended is None:
            self._ended = reason
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(reason)

    def next_batch(self) -> defer.Deferred[List[Delivery]]:
        if self._batches:
            return defer.succeed(self._batches.popleft())
        if self._ended is not None:
            return defer.fail(self._ended)
        self._waiting = defer.Deferred()
        return self._waiting

    def done(self, batch: List[Delivery]) -> None:
        if self._ended is None:
            self.link.client.credit(self.subscription_id, 1)

    def close(self) -> None:
        self.link.unsubscribe(self)


@implementer(IStreamLink)
class StreamLink:
    """One stream-protocol connection with the stream created and the publisher declared."""

    protocol = "stream"

    def __init__(self, client: StreamClient, stream: str) -> None:
        self.client = client
        self.connection = client
        self.stream = stream
        self.subscriptions: Dict[int, StreamSubscription] = {}
        self._closing: Set[int] = set()
        """Ids unsubscribed whose end the broker has not confirmed: chunks may still come for them."""
        self._last_id = -1

    def _free_id(self) -> Optional[int]:
        """The next id after the last one given that is neither in use nor closing (round robin)."""
        for step in range(1, 257):
            candidate = (self._last_id + step) % 256
            if candidate not in self.subscriptions and candidate not in self._closing:
                self._last_id = candidate
                return candidate
        return None

    async def subscribe(self, start: Start, prefetch: int) -> ISubscription:
        free = self._free_id()
        if free is None:
            raise BrokerUnavailable("256 subscriptions on one connection")
        subscription = StreamSubscription(self, free, start)
        self.subscriptions[free] = subscription
        if isinstance(start, int):
            offset_type, offset = frames.OFFSET_AT, start
        else:
            offset_type, offset = (frames.OFFSET_LAST, 0) if start == "last" else (frames.OFFSET_FIRST, 0)
        try:
            await self.client.subscribe(free, self.stream, subscription.chunk, offset_type=offset_type, offset=offset,
                                        credit=max(1, min(CHUNK_CREDIT, prefetch)))
        except StreamError as e:
            self.subscriptions.pop(free, None)
            if e.code in GONE:
                raise StreamDeleted(str(e)) from e
            raise BrokerUnavailable(str(e)) from e
        except BaseException:
            self.subscriptions.pop(free, None)
            raise
        return subscription

    def unsubscribe(self, subscription: StreamSubscription) -> None:
        if self.subscriptions.pop(subscription.subscription_id, None) is None:
            return
        subscription.end(SubscriptionEnded("closed"))
        if self.client.lost.called:
            return
        closing = subscription.subscription_id
        self._closing.add(closing)
        ended = defer.ensureDeferred(self.client.unsubscribe(closing))
        ended.addErrback(lambda _: None).addCallback(lambda _: self._closing.discard(closing))

    def end(self, reason: BaseException) -> None:
        """Every subscription of this link ends with ``reason``."""
        subscriptions, self.subscriptions = self.subscriptions, {}
        for subscription in subscriptions.values():
            subscription.end(reason)


class LeaderElsewhere(Exception):
    """The stream's leader is another configured node: connect there instead."""


class _Sent:
    """One entry out for confirmation: its bytes and who waits for it."""

    __slots__ = ("entry", "waiting", "expires")

    def __init__(self, entry: bytes, waiting: List[defer.Deferred[None]], expires: IDelayedCall) -> None:
        self.entry = entry
        self.waiting = waiting
        self.expires = expires

    def settle(self, failure: Optional[Exception] = None) -> None:
        """The entry's fate is known: everyone waiting is told (confirmed, or ``failure``)."""
        if self.expires.active():
            self.expires.cancel()
        for waiting in self.waiting:
            if failure is None:
                waiting.callback(None)
            else:
                waiting.errback(failure)


@implementer(IBroker)
class StreamBroker(ReconnectingBroker):
    """A reconnecting stream-protocol connection that publishes in batches, confirmed."""

    protocol = "stream"

    def __init__(self, reactor: IReactorCore, url: str, stream: str, status: ReplicaStatus, replica_id: str,
                 clock: Optional[IReactorTime] = None, confirm_timeout: float = 10.0,
                 node_endpoints: Optional[Sequence[Any]] = None) -> None:
        urls = node_urls(url)
        super().__init__(reactor, url, stream, status,
                         node_endpoints or [tcp_endpoint(reactor, u, stream_port_of(u) or STREAM_PORT) for u in urls],
                         clock)
        self.confirm_timeout = confirm_timeout
        self.reference = f"gradesvc-{replica_id}-{uuid.uuid4().hex[:16]}"[:256]
        """This process's publisher reference: deduplication without two processes ever sharing one."""
        self._publishing = False
        self._next_id = 1
        self._queued: List[Tuple[bytes, defer.Deferred[None]]] = []
        self._flush: Optional[IDelayedCall] = None
        self._sent: Dict[int, _Sent] = {}

    # --- the connection -----------------------------------------------------

    def _new_connection(self) -> StreamClient:
        parts = urlsplit(self.nodes.url)
        return StreamClient(unquote(parts.username or "guest"), unquote(parts.password or "guest"),
                            vhost_of(self.nodes.url), clock=self.clock, heartbeat=HEARTBEAT,
                            client_properties={"connection_name": self.reference})

    async def _open(self, client: StreamClient) -> StreamLink:
        await client.ready
        # An existing stream is used as it is, whatever retention it was declared
        # with (creating it again with other arguments would be refused).
        where = (await client.metadata([self.stream])).get(self.stream)
        if where is None or where.code == frames.STREAM_DOES_NOT_EXIST:
            if await client.create(self.stream, self._arguments()):
                self.declared()
            where = (await client.metadata([self.stream])).get(self.stream)
        self._follow_leader(where)
        link = StreamLink(client, self.stream)
        client.on_confirm = self._confirmed
        client.on_publish_error = self._refused
        client.on_metadata_update = lambda code, stream: self._moved(link, code, stream)
        await client.declare_publisher(PUBLISHER_ID, self.reference, self.stream)
        stored = await client.query_publisher_sequence(self.reference, self.stream)
        self._next_id = max(self._next_id, stored + 1)
        self._publishing = True
        if self._sent:
            log.info("Sending {count} unconfirmed batches again (the broker drops those it has)", count=len(self._sent))
            client.publish(PUBLISHER_ID, [sent.entry for _, sent in sorted(self._sent.items())])
        return link

    def _arguments(self) -> Dict[str, str]:
        nodes = len(self.nodes.urls)
        return {"initial-cluster-size": str(nodes)} if nodes > 1 else {}

    def _follow_leader(self, metadata: Any) -> None:
        leader = getattr(metadata, "leader", None)
        if leader is None or len(self.nodes.urls) == 1:
            return
        loopback = {"localhost", "127.0.0.1", "::1"}
        for index, url in enumerate(self.nodes.urls):
            host = urlsplit(url).hostname or ""
            same_host = host == leader.host or (host in loopback and leader.host in loopback)
            if same_host and stream_port_of(url) == leader.port:
                if index != self.nodes.current:
                    log.info("The leader of stream {stream} is {url}; connecting there", stream=self.stream,
                             url=redact(url))
                    self.nodes.current = index
                    raise LeaderElsewhere(url)
                return

    def _setup_failed(self, failure: Any, connection: Any) -> defer.Deferred[None]:
        if failure.check(LeaderElsewhere):
            return self._reconnect(connection, 0.0)
        return super()._setup_failed(failure, connection)

    def _ended(self, client: StreamClient) -> defer.Deferred[Any]:
        return client.lost

    def _disconnect(self, client: StreamClient) -> None:
        client.abort()

    def _link_lost(self, link: Optional[IStreamLink]) -> None:
        self._publishing = False
        if link is not None:  # this broker's links are StreamLinks
            cast(StreamLink, link).end(SubscriptionEnded("the broker connection was lost"))

    def _moved(self, link: StreamLink, code: int, stream: str) -> None:
        """The broker says the stream moved or is gone: everything on this link is over."""
        if stream != self.stream:
            return
        log.warn("The broker says stream {stream} is {what}; reconnecting", stream=stream,
                 what=frames.CODE_NAMES.get(code, code))
        link.end(StreamDeleted(f"stream {stream}: {frames.CODE_NAMES.get(code, code)}"))
        self._publishing = False
        self.reconnect_later(link, 0.5)

    def declared(self) -> None:
        """A new life of the stream: nothing unconfirmed of the old one is sent to it."""
        sent, self._sent = self._sent, {}
        for entry in sent.values():
            entry.settle(StreamDeleted("the stream was deleted before the write was confirmed"))
        super().declared()

    # --- publishing -------------------------------------------------------------

    def publish(self, message: Outgoing) -> defer.Deferred[None]:
        """Queue ``message`` for this turn's batch; fires once the broker confirmed the batch."""
        if not self._publishing or not self.status.connected:
            return defer.fail(BrokerUnavailable("not connected to the broker"))
        d: defer.Deferred[None] = defer.Deferred()
        self._queued.append((encode(message), d))
        if self._flush is None:
            self._flush = self.clock.callLater(0, self._send)
        return d

    def _send(self) -> None:
        self._flush = None
        queued, self._queued = self._queued, []
        link = cast(Optional[StreamLink], self.link)
        if link is None or not self._publishing:
            for _, d in queued:
                d.errback(BrokerUnavailable("not connected to the broker"))
            return
        client = link.client
        room = (client.frame_max or 1 << 30) - frames.PUBLISH_OVERHEAD - frames.SUB_ENTRY_OVERHEAD
        entries: List[bytes] = []
        group: List[Tuple[bytes, defer.Deferred[None]]] = []
        size = 0
        for item in queued:
            cost = 4 + len(item[0])
            if cost > room:
                item[1].errback(BrokerUnavailable(f"a message of {len(item[0])} bytes does not fit a stream frame"))
                continue
            if group and (size + cost > room or len(group) == frames.MAX_SUB_ENTRY_RECORDS):
                entries.append(self._entry(group))
                group, size = [], 0
            group.append(item)
            size += cost
        if group:
            entries.append(self._entry(group))
        if entries:
            client.publish(PUBLISHER_ID, entries)

    def _entry(self, group: List[Tuple[bytes, defer.Deferred[None]]]) -> bytes:
        publishing_id, self._next_id = self._next_id, self._next_id + 1
        if len(group) == 1:
            entry = frames.simple_entry(publishing_id, group[0][0])
        else:
            entry = frames.sub_entry(publishing_id, [message for message, _ in group])
        expires = self.clock.callLater(self.confirm_timeout, self._expired, publishing_id)
        self._sent[publishing_id] = _Sent(entry, [d for _, d in group], expires)
        return entry

    def _confirmed(self, publisher: int, ids: List[int]) -> None:
        for publishing_id in ids:
            sent = self._sent.pop(publishing_id, None)
            if sent is not None:
                sent.settle()

    def _refused(self, publisher: int, errors: List[Tuple[int, int]]) -> None:
        for publishing_id, code in errors:
            sent = self._sent.pop(publishing_id, None)
            if sent is None:
                continue
            name = frames.CODE_NAMES.get(code, str(code))
            log.warn("The broker refused a batch of {count} writes: {why}", count=len(sent.waiting), why=name)
            sent.settle(StreamDeleted(f"the stream is gone ({name})") if code in GONE
                        else BrokerUnavailable(f"the broker refused the write: {name}"))

    def _expired(self, publishing_id: int) -> None:
        sent = self._sent.pop(publishing_id, None)
        if sent is None:
            return
        log.warn("A batch of {count} writes was not confirmed within {seconds:g}s; reconnecting",
                 count=len(sent.waiting), seconds=self.confirm_timeout)
        sent.settle(BrokerUnavailable(f"the broker did not confirm the write within {self.confirm_timeout:g}s"))
        self.drop_connection()
