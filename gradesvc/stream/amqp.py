"""The stream over AMQP 0.9.1, through pika's Twisted adapter.

:class:`AmqpBroker` sets each connection up: TCP_NODELAY, the stream
declared if missing (an existing one is used as it is, whatever retention it
was declared with), a channel in confirm mode for publishing.  Every message
is published on its own and confirmed on its own (AMQP 0.9.1 has no
batches).  :class:`AmqpSubscription` is a consumer on a channel of its own
at an ``x-stream-offset``: every message of a socket read is one batch,
acknowledged (``multiple``) as flow-control credit once handled.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import pika
from pika.adapters.twisted_connection import TwistedChannel, TwistedProtocolConnection
from pika.exceptions import AMQPError, ChannelClosedByBroker, ConsumerCancelled
from twisted.internet import defer
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from gradesvc.state.phase import ReplicaStatus
from gradesvc.stream.broker import ReconnectingBroker, amqp_only, node_urls, tcp_endpoint
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

log = Logger()

STREAM_ARGUMENTS = {"x-queue-type": "stream"}


def declare_stream(channel: TwistedChannel, stream: str, cluster_size: int = 1) -> defer.Deferred[Any]:
    """Declare ``stream`` as a durable stream queue (idempotent).

    On a cluster (``cluster_size`` > 1) the stream is replicated to that many
    nodes; RabbitMQ confirms a publish once a quorum of them has it.
    """
    arguments: Dict[str, Any] = dict(STREAM_ARGUMENTS)
    if cluster_size > 1:
        arguments["x-initial-cluster-size"] = cluster_size
    declared: defer.Deferred[Any] = channel.queue_declare(
        queue=stream, durable=True, exclusive=False, auto_delete=False, arguments=arguments,
    )
    return declared


def properties_of(message: Outgoing) -> pika.BasicProperties:
    """The AMQP 0.9.1 properties a message carries (its kind as ``type``)."""
    return pika.BasicProperties(
        app_id=message.replica,
        message_id=message.message_id,
        content_type="application/json",
        type=message.kind,
        timestamp=message.written_at // 1000 if message.written_at else None,
        delivery_mode=2,
    )


@implementer(ISubscription)
class AmqpSubscription:
    """A stream consumer on a channel of its own."""

    def __init__(self, channel: Any, queue: Any, start: Start) -> None:
        self.channel = channel
        self.queue = queue
        self.start = start if isinstance(start, int) else -1
        self._last_tag: Optional[int] = None

    def next_batch(self) -> defer.Deferred[List[Delivery]]:
        """Every message of the next socket read, in stream order."""
        return defer.ensureDeferred(self._next_batch())

    async def _next_batch(self) -> List[Delivery]:
        while True:
            try:
                first = await self.queue.get()
            except ConsumerCancelled as e:
                raise StreamDeleted("the broker cancelled the consumer (stream deleted, or its leader moved)") from e
            except (AMQPError, ConnectionClosed, defer.CancelledError) as e:
                raise SubscriptionEnded(repr(e)) from e
            raw = [first, *self.queue.pending]
            del self.queue.pending[:]
            self._last_tag = raw[-1].method.delivery_tag
            batch: List[Delivery] = []
            for message in raw:
                offset = (message.properties.headers or {}).get("x-stream-offset")
                if not isinstance(offset, int):
                    log.warn("Stream delivery without x-stream-offset; skipped")
                    continue
                if offset >= self.start:
                    batch.append((offset, message.properties.type, message.body))
            if batch:
                return batch
            self.done(batch)

    def done(self, batch: List[Delivery]) -> None:
        """Acknowledge every message up to the last of the batch."""
        if self._last_tag is not None and self.channel.is_open:
            self.channel.basic_ack(self._last_tag, multiple=True)

    def close(self) -> None:
        if self.channel.is_open:
            self.channel.close()


@implementer(IStreamLink)
class AmqpLink:
    """One AMQP connection with the stream declared."""

    protocol = "amqp"

    def __init__(self, connection: TwistedProtocolConnection, stream: str) -> None:
        self.connection = connection
        self.stream = stream

    async def subscribe(self, start: Start, prefetch: int) -> ISubscription:
        channel = await self.connection.channel()
        try:
            await channel.basic_qos(prefetch_count=prefetch)
            queue, _tag = await channel.basic_consume(
                queue=self.stream, auto_ack=False, arguments={"x-stream-offset": start},
            )
        except BaseException:
            if channel.is_open:
                channel.close()
            raise
        return AmqpSubscription(channel, queue, start)


@implementer(IBroker)
class AmqpBroker(ReconnectingBroker):
    """A reconnecting AMQP connection that publishes with publisher confirms."""

    protocol = "amqp"

    def __init__(self, reactor: IReactorCore, url: str, stream: str, status: ReplicaStatus,
                 clock: Optional[IReactorTime] = None, confirm_timeout: float = 10.0) -> None:
        urls = node_urls(url)
        super().__init__(reactor, url, stream, status, [tcp_endpoint(reactor, u) for u in urls], clock)
        self.confirm_timeout = confirm_timeout
        self._channel: Optional[TwistedChannel] = None

    def _new_connection(self) -> TwistedProtocolConnection:
        parameters = pika.URLParameters(amqp_only(self.nodes.url))
        parameters.heartbeat = 10
        return TwistedProtocolConnection(parameters)

    async def _open(self, connection: TwistedProtocolConnection) -> AmqpLink:
        await connection.ready
        if hasattr(connection.transport, "setTcpNoDelay"):
            # Small frames (a publish, a confirm, an ack) must not wait for
            # Nagle's algorithm and the broker's delayed ACK: 40 ms each.
            connection.transport.setTcpNoDelay(True)
        channel = await connection.channel()
        try:
            await channel.queue_declare(queue=self.stream, passive=True)
        except ChannelClosedByBroker as e:
            if e.reply_code != 404:
                raise
            channel = await connection.channel()
            await declare_stream(channel, self.stream, len(self.nodes.urls))
            self.declared()
        await channel.confirm_delivery()
        self._channel = channel
        return AmqpLink(connection, self.stream)

    def _ended(self, connection: TwistedProtocolConnection) -> defer.Deferred[Any]:
        closed: defer.Deferred[Any] = connection.closed
        return closed

    def _disconnect(self, connection: TwistedProtocolConnection) -> None:
        if connection.transport is not None:
            connection.transport.loseConnection()

    def _link_lost(self, link: Optional[IStreamLink]) -> None:
        self._channel = None

    async def publish(self, message: Outgoing) -> None:
        """Publish ``message`` to the stream; return once the broker confirmed it."""
        channel = self._channel
        if channel is None or not self.status.connected:
            raise BrokerUnavailable("not connected to the broker")
        d = channel.basic_publish(exchange="", routing_key=self.stream, body=message.body,
                                  properties=properties_of(message))
        d.addTimeout(self.confirm_timeout, self.clock)
        try:
            await d
        except Exception as e:
            log.warn("Publish not confirmed: {error!r}", error=e)
            if channel.is_closed:
                self.drop_connection()
            raise BrokerUnavailable(f"the broker did not confirm the write: {e!r}") from e
