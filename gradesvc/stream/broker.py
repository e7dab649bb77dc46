"""The replica's connection to RabbitMQ and publishing with confirms.

:class:`BrokerService` keeps one AMQP connection open with
``twisted.application.internet.ClientService`` (exponential back-off, injected
clock).  On every new connection it declares the stream, opens a publishing
channel in confirm mode, and hands the connection to the registered
``on_connect`` callbacks (the stream consumer).  :meth:`BrokerService.publish`
fires only once the broker has confirmed the message.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Dict, List, Optional, Protocol, Sequence
from urllib.parse import urlsplit

import pika
from pika.adapters.twisted_connection import TwistedChannel, TwistedProtocolConnection
from pika.exceptions import ChannelClosedByBroker
from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, endpoints, protocol, task
from twisted.internet.interfaces import IReactorCore, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from gradesvc.state.identity import StreamId
from gradesvc.state.phase import ReplicaStatus
from svckit.supervisor import backoff

log = Logger()

STREAM_ARGUMENTS = {"x-queue-type": "stream"}


class BrokerUnavailable(Exception):
    """The broker did not take a message (down, closed, nacked or timed out)."""


def declare_stream(channel: TwistedChannel, stream: str, cluster_size: int = 1) -> defer.Deferred[Any]:
    """Declare ``stream`` as a durable stream queue (idempotent).

    On a cluster (``cluster_size`` > 1) the stream is replicated to that many
    nodes; RabbitMQ confirms a publish once a quorum of them has it.
    """
    arguments: Dict[str, Any] = dict(STREAM_ARGUMENTS)
    if cluster_size > 1:
        arguments["x-initial-cluster-size"] = cluster_size
    declared: defer.Deferred[Any] = channel.queue_declare(
        queue=stream,
        durable=True,
        exclusive=False,
        auto_delete=False,
        arguments=arguments,
    )
    return declared


def stream_id_of(url: str, stream: str) -> StreamId:
    """The identity of ``stream`` on the broker of ``url`` (its nodes share one vhost)."""
    return StreamId(pika.URLParameters(node_urls(url)[0]).virtual_host, stream)


def node_urls(value: str) -> List[str]:
    """The comma-separated ``amqp://`` URLs of one broker's nodes."""
    return [url.strip() for url in value.split(",") if url.strip()]


@implementer(IStreamClientEndpoint)
class NodeRotation:
    """Connects to one node of a cluster; after a failure or a loss, the next one."""

    def __init__(self, reactor: Any, urls: Sequence[str], timeout: float = 5.0) -> None:
        self.urls = list(urls)
        self._endpoints = [broker_endpoint(reactor, url, timeout) for url in self.urls]
        self.current = 0

    @property
    def url(self) -> str:
        """The URL of the node connected to, or tried next."""
        return self.urls[self.current]

    def advance(self) -> None:
        """Move to the next node."""
        self.current = (self.current + 1) % len(self.urls)

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        """Connect to the current node; a failure moves to the next for the retry."""
        d: defer.Deferred[Any] = self._endpoints[self.current].connect(factory)

        def failed(failure: Any) -> Any:
            log.info("Broker node {url} unreachable: {error}", url=redact(self.url), error=failure.value)
            self.advance()
            return failure

        return d.addErrback(failed)


def redact(url: str) -> str:
    """A URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def broker_endpoint(reactor: Any, url: str, timeout: float = 5.0) -> Any:
    """A TCP client endpoint for the host and port of an ``amqp://`` URL."""
    parts = urlsplit(url)
    return endpoints.HostnameEndpoint(
        reactor, parts.hostname or "127.0.0.1", parts.port or 5672, timeout=timeout
    )


class Publisher(Protocol):
    """Something that publishes to the stream and returns once confirmed."""

    async def publish(self, body: bytes, properties: pika.BasicProperties) -> None:
        """Publish ``body``; raise :class:`BrokerUnavailable` unless confirmed."""


ConnectHook = Callable[[TwistedProtocolConnection], Awaitable[None]]


class BrokerService(service.Service):
    """A reconnecting AMQP connection that publishes with publisher confirms."""

    def __init__(
        self,
        reactor: IReactorCore,
        url: str,
        stream: str,
        status: ReplicaStatus,
        clock: Optional[IReactorTime] = None,
        confirm_timeout: float = 10.0,
        endpoint: Any = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor  # type: ignore[assignment]
        self.stream = stream
        self.status = status
        self.confirm_timeout = confirm_timeout
        self.on_connect: List[ConnectHook] = []
        self.nodes = NodeRotation(reactor, node_urls(url))
        self.stream_id = stream_id_of(url, stream)
        """The stream this replica's state belongs to (all nodes share one vhost)."""
        self._connected_waiters: List[defer.Deferred[TwistedProtocolConnection]] = []
        self._channel: Optional[TwistedChannel] = None
        self._connection: Optional[TwistedProtocolConnection] = None
        self._failures = 0
        factory = protocol.Factory.forProtocol(self._build_protocol)
        self._client = ClientService(
            endpoint or self.nodes,
            factory,
            retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=5.0),
            clock=self.clock,
        )

    def _build_protocol(self) -> TwistedProtocolConnection:
        # Set-up runs beside ClientService rather than as its
        # prepareConnection: a connection that drops while being prepared
        # would otherwise wedge ClientService's state machine.
        parameters = pika.URLParameters(self.nodes.url)
        parameters.heartbeat = 10
        connection = TwistedProtocolConnection(parameters)
        self._prepare(connection)
        return connection

    def startService(self) -> None:
        """Start connecting."""
        super().startService()
        log.info("Connecting to the broker for stream {stream}", stream=self.stream)
        self._client.startService()

    def stopService(self) -> defer.Deferred[None]:
        """Close the connection and stop reconnecting."""
        super().stopService()
        self._lost("service stopping")
        stopped: defer.Deferred[None] = self._client.stopService()
        return stopped

    async def _setup(self, connection: TwistedProtocolConnection) -> None:
        await connection.ready
        if hasattr(connection.transport, "setTcpNoDelay"):
            # Small frames (a publish, a confirm, an ack) must not wait for
            # Nagle's algorithm and the broker's delayed ACK: 40 ms each.
            connection.transport.setTcpNoDelay(True)
        channel = await connection.channel()
        try:
            # An existing stream is used as it is, whatever retention it was
            # declared with; only a missing one is declared (idempotently).
            await channel.queue_declare(queue=self.stream, passive=True)
        except ChannelClosedByBroker as e:
            if e.reply_code != 404:
                raise
            channel = await connection.channel()
            await declare_stream(channel, self.stream, len(self.nodes.urls))
        await channel.confirm_delivery()
        self._connection = connection
        self._channel = channel
        connection.closed.addBoth(self._lost)
        self.status.connected = True
        self._failures = 0
        self.status.broker_node = redact(self.nodes.url)
        log.info("Connected to the broker at {url}; stream {stream} declared",
                 url=self.status.broker_node, stream=self.stream)
        waiters, self._connected_waiters = self._connected_waiters, []
        for waiter in waiters:
            waiter.callback(connection)
        for hook in self.on_connect:
            await hook(connection)

    def _prepare(self, connection: TwistedProtocolConnection) -> defer.Deferred[None]:
        d = defer.ensureDeferred(self._setup(connection))

        def failed(failure: Any) -> defer.Deferred[None]:
            log.warn("Broker connection set-up failed: {error!r}", error=failure.value)
            return self.reconnect_later(connection)

        return d.addErrback(failed)

    def reconnect_later(
        self, connection: Optional[TwistedProtocolConnection] = None, delay: Optional[float] = None,
    ) -> defer.Deferred[None]:
        """After a failure: close the connection after a back-off delay.

        ``ClientService`` then sees a connection that ended and makes a new
        one; consecutive set-up failures double the delay (at most 5 s).
        """
        connection = connection or self._connection
        if delay is None:
            self._failures += 1
            delay = backoff(self._failures + 1, initial=0.2, maximum=5.0)
        log.info("Reconnecting to the broker in {delay:.1f}s", delay=delay)
        if connection is None:
            return defer.succeed(None)
        return task.deferLater(self.clock, delay, self._close, connection)

    @staticmethod
    def _close(connection: TwistedProtocolConnection) -> None:
        if connection.transport is not None:
            connection.transport.loseConnection()

    def _lost(self, reason: object) -> object:
        if self.status.connected:
            log.warn("Broker connection lost: {reason}", reason=reason)
            if len(self.nodes.urls) > 1:
                self.nodes.advance()
        self.status.broker_lost()
        self._channel = None
        self._connection = None
        return reason

    @property
    def connection(self) -> Optional[TwistedProtocolConnection]:
        """The current connection, once set up (None while disconnected)."""
        return self._connection

    def when_connected(self) -> defer.Deferred[TwistedProtocolConnection]:
        """The current connection, or the next one once it is set up."""
        if self._connection is not None and self.status.connected:
            return defer.succeed(self._connection)
        waiter: defer.Deferred[TwistedProtocolConnection] = defer.Deferred(self._connected_waiters.remove)
        self._connected_waiters.append(waiter)
        return waiter

    def drop_connection(self) -> None:
        """Close the current connection so that ``ClientService`` makes a new one."""
        if self._connection is not None:
            self._close(self._connection)

    async def publish(self, body: bytes, properties: pika.BasicProperties) -> None:
        """Publish ``body`` to the stream; return once the broker confirmed it."""
        channel = self._channel
        if channel is None or not self.status.connected:
            raise BrokerUnavailable("not connected to the broker")
        d = channel.basic_publish(
            exchange="", routing_key=self.stream, body=body, properties=properties
        )
        d.addTimeout(self.confirm_timeout, self.clock)
        try:
            await d
        except Exception as e:
            log.warn("Publish not confirmed: {error!r}", error=e)
            if channel.is_closed:
                self.drop_connection()
            raise BrokerUnavailable(f"the broker did not confirm the write: {e!r}") from e
