"""The replica's connection to RabbitMQ, kept up whichever protocol it speaks.

:class:`ReconnectingBroker` keeps one connection to one node of the broker
(``--amqp-url`` may list a cluster's nodes; after a failure or a loss the
next node is tried) with ``twisted.application.internet.ClientService``
(exponential back-off, injected clock).  Each new connection is set up by
the protocol's subclass (the stream declared, publishing made ready) and
becomes an :class:`~gradesvc.stream.link.IStreamLink`, handed to the
``on_connect`` hooks (the stream consumer).  The replica's status follows
the connection: connected or not, which node.

The subclasses: :class:`gradesvc.stream.amqp.AmqpBroker` (AMQP 0.9.1 through
pika) and :class:`gradesvc.stream.streamprotocol.StreamBroker` (RabbitMQ's
stream protocol).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet import defer, endpoints, protocol, task
from twisted.internet.interfaces import IReactorCore, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from gradesvc.state.identity import StreamId
from gradesvc.state.phase import ReplicaStatus
from gradesvc.stream.link import BrokerUnavailable, ConnectHook, IStreamLink
from svckit.clienttls import ClientTLS, tls_failure
from svckit.supervisor import backoff

log = Logger()

__all__ = ["BrokerUnavailable", "NodeRotation", "ReconnectingBroker", "node_urls", "redact", "stream_id_of"]

STREAM_PORT = 5552
"""The stream protocol's port when a node's URL does not name one (``?stream_port=N``)."""
STREAM_TLS_PORT = 5551
"""The stream protocol's TLS port beside AMQPS on 5671, when an ``amqps://`` URL names none."""
AMQPS_PORT = 5671

TLS_QUERY = {"cacertfile": "ca_file", "certfile": "cert_file", "keyfile": "key_file"}
"""An ``amqps://`` URL's TLS arguments (RabbitMQ's URI query names) → :class:`ClientTLS` fields."""
OUR_QUERY = ("stream_port", "server_name_indication", *TLS_QUERY)
"""Query arguments read here, not by pika."""


def node_urls(value: str) -> List[str]:
    """The comma-separated ``amqp://`` URLs of one broker's nodes."""
    return [url.strip() for url in value.split(",") if url.strip()]


def vhost_of(url: str) -> str:
    """The virtual host of an ``amqp://`` URL (``/`` when it names none)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def stream_id_of(url: str, stream: str) -> StreamId:
    """The identity of ``stream`` on the broker of ``url`` (its nodes share one vhost)."""
    return StreamId(vhost_of(node_urls(url)[0]), stream)


def stream_port_of(url: str) -> Optional[int]:
    """The stream protocol's port of a node: ``?stream_port=N`` in its URL; 5552 when the URL uses the
    standard AMQP port (5551 beside AMQPS's 5671); else unknown (None): a broker moved to another port may
    have its stream port anywhere, and guessing could reach another broker than the one named."""
    parts = urlsplit(url)
    for key, value in parse_qsl(parts.query):
        if key == "stream_port":
            return int(value)
    if parts.scheme == "amqps":
        return STREAM_TLS_PORT if parts.port in (None, AMQPS_PORT) else None
    return STREAM_PORT if parts.port in (None, 5672) else None


def node_tls(url: str) -> Optional[Tuple[ClientTLS, str]]:
    """For an ``amqps://`` node: its TLS (``cacertfile``, ``certfile``, ``keyfile``) and the name its
    certificate must hold (``server_name_indication``, else the URL's host); None for ``amqp://``."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if parts.scheme != "amqps":
        if any(key in query for key in (*TLS_QUERY, "server_name_indication")):
            raise ValueError("TLS arguments (cacertfile, certfile, keyfile, server_name_indication) need amqps://")
        return None
    if query.get("verify", "verify_peer") != "verify_peer":
        raise ValueError("verify must be verify_peer: the broker's certificate is always verified")
    tls = ClientTLS(**{field: query[key] for key, field in TLS_QUERY.items() if key in query})
    return tls, query.get("server_name_indication") or parts.hostname or "127.0.0.1"


def amqp_only(url: str) -> str:
    """``url`` as pika takes it: without the query arguments that are ours (pika refuses unknown ones), and
    ``amqp://`` for ``amqps://`` (TLS is the transport's, below pika)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in OUR_QUERY and k != "verify"]
    if parts.scheme == "amqps":
        netloc = parts.netloc if parts.port is not None else f"{parts.netloc}:{AMQPS_PORT}"
        parts = parts._replace(scheme="amqp", netloc=netloc)
    return urlunsplit(parts._replace(query=urlencode(query)))


def redact(url: str) -> str:
    """A URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def tcp_endpoint(reactor: Any, url: str, port: Optional[int] = None, timeout: float = 5.0) -> Any:
    """A client endpoint for the host of an ``amqp://`` URL and its AMQP port (or ``port``); for an
    ``amqps://`` URL, TLS on top, the broker verified."""
    parts = urlsplit(url)
    tls = node_tls(url)
    default = AMQPS_PORT if tls is not None else 5672
    endpoint = endpoints.HostnameEndpoint(reactor, parts.hostname or "127.0.0.1", port or parts.port or default,
                                          timeout=timeout)
    if tls is None:
        return endpoint
    return tls[0].wrap(endpoint, tls[1])


@implementer(IStreamClientEndpoint)
class NodeRotation:
    """Connects to one node of a cluster; after a failure or a loss, the next one."""

    def __init__(self, urls: Sequence[str], node_endpoints: Sequence[Any]) -> None:
        self.urls = list(urls)
        self.endpoints = list(node_endpoints)
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
        d: defer.Deferred[Any] = self.endpoints[self.current].connect(factory)

        def failed(failure: Any) -> Any:
            log.info("Broker node {url} unreachable: {error}", url=redact(self.url), error=failure.value)
            self.advance()
            return failure

        return d.addErrback(failed)


class ReconnectingBroker(service.Service):
    """A broker connection kept up; the protocol's subclass sets each one up and publishes."""

    protocol = "none"
    """``amqp`` or ``stream``."""

    def __init__(self, reactor: IReactorCore, url: str, stream: str, status: ReplicaStatus,
                 node_endpoints: Sequence[Any], clock: Optional[IReactorTime] = None) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor  # type: ignore[assignment]
        self.stream = stream
        self.status = status
        self.on_connect: List[ConnectHook] = []
        self.on_stream_recreated: List[Callable[[], None]] = []
        """Called when a connection finds the stream gone and declares it again: what was published to
        the old one and not yet applied never will be."""
        self.nodes = NodeRotation(node_urls(url), node_endpoints)
        self.stream_id = stream_id_of(url, stream)
        """The stream this replica's state belongs to (all nodes share one vhost)."""
        self.link: Optional[IStreamLink] = None
        """The current link, once set up (None while disconnected)."""
        self._stream_seen = False
        self._connected_waiters: List[defer.Deferred[IStreamLink]] = []
        self._failures = 0
        self._ended_by: Any = None
        """Why the latest connection's transport ended (a TLS failure says why there, not in the protocol)."""
        self._live: Any = None
        """The latest connection while its transport is up (closing an ended TLS transport raises)."""
        factory = protocol.Factory.forProtocol(self._build_protocol)
        self._client = ClientService(self.nodes, factory, retryPolicy=self._retry_delay, clock=self.clock)

    def _retry_delay(self, attempts: int) -> float:
        # A connection that was made and then failed its set-up (a TLS handshake refused) resets
        # ClientService's own count of attempts: the back-off goes on counting set-up failures too.
        return backoff(max(attempts, self._failures), initial=0.2, maximum=5.0)

    # --- what a protocol's subclass provides ----------------------------------

    def _new_connection(self) -> Any:
        """A new protocol instance for the current node."""
        raise NotImplementedError

    async def _open(self, connection: Any) -> IStreamLink:
        """Set ``connection`` up: ready, the stream declared, publishing possible."""
        raise NotImplementedError

    def _ended(self, connection: Any) -> defer.Deferred[Any]:
        """Fires when ``connection`` is gone."""
        raise NotImplementedError

    def _disconnect(self, connection: Any) -> None:
        """Close ``connection``."""
        raise NotImplementedError

    def _link_lost(self, link: Optional[IStreamLink]) -> None:
        """``link`` (None: none was set up) is gone: anything the subclass keeps per link is reset."""

    # --- the connection's life ----------------------------------------------------

    def _build_protocol(self) -> Any:
        # Set-up runs beside ClientService rather than as its
        # prepareConnection: a connection that drops while being prepared
        # would otherwise wedge ClientService's state machine.
        connection = self._new_connection()
        self._ended_by, self._live = None, connection
        lost = connection.connectionLost

        def connection_lost(reason: Any) -> Any:
            self._ended_by = reason
            if self._live is connection:
                self._live = None
            return lost(reason)

        connection.connectionLost = connection_lost
        defer.ensureDeferred(self._setup(connection)).addErrback(self._setup_failed, connection)
        return connection

    def startService(self) -> None:
        """Start connecting."""
        super().startService()
        log.info("Connecting to the broker for stream {stream} ({protocol})", stream=self.stream,
                 protocol=self.protocol)
        self._client.startService()

    def stopService(self) -> defer.Deferred[None]:
        """Close the connection and stop reconnecting."""
        super().stopService()
        self._lost("service stopping")
        stopped: defer.Deferred[None] = self._client.stopService()
        return stopped

    async def _setup(self, connection: Any) -> None:
        link = await self._open(connection)
        self._stream_seen = True
        self.link = link
        self._ended(connection).addBoth(self._lost)
        self.status.connected = True
        self._failures = 0
        self.status.broker_error = None
        self.status.broker_node = redact(self.nodes.url)
        log.info("Connected to the broker at {url} ({protocol}); stream {stream} declared",
                 url=self.status.broker_node, protocol=self.protocol, stream=self.stream)
        waiters, self._connected_waiters = self._connected_waiters, []
        for waiter in waiters:
            waiter.callback(link)
        for hook in self.on_connect:
            await hook(link)

    def _setup_failed(self, failure: Any, connection: Any) -> defer.Deferred[None]:
        reason = tls_failure(self._ended_by)
        if reason is None:
            reason = f"{type(failure.value).__name__}: {failure.value}"
            if self._ended_by is not None and node_tls(self.nodes.url) is not None:
                reason = f"the TLS link ended during set-up ({reason}); does this port speak TLS?"
        error = f"{redact(self.nodes.url)}: {reason}"
        if error != self.status.broker_error:  # one line per node and reason, not one per attempt
            log.error("Broker connection set-up failed at {url}: {reason}; retrying with back-off",
                      url=redact(self.nodes.url), reason=reason)
        self.status.broker_error = error
        return self._reconnect(connection, None)

    def declared(self) -> None:
        """The stream was missing and this connection declared it.

        On the first connection that is a new deployment; on a later one the
        stream was deleted while this replica ran, and what was published to
        the old one and not yet applied never will be: those waiting are told.
        """
        if not self._stream_seen:
            return
        log.warn("Stream {stream} was deleted while this replica ran; declared again", stream=self.stream)
        for hook in self.on_stream_recreated:
            hook()

    def reconnect_later(self, link: Optional[IStreamLink] = None, delay: Optional[float] = None,
                        ) -> defer.Deferred[None]:
        """After a failure: close the link after a back-off delay.

        ``ClientService`` then sees a connection that ended and makes a new
        one; consecutive set-up failures double the delay (at most 5 s).
        """
        link = link or self.link
        return self._reconnect(getattr(link, "connection", None), delay)

    def _reconnect(self, connection: Any, delay: Optional[float]) -> defer.Deferred[None]:
        if delay is None:
            self._failures += 1
            delay = backoff(self._failures + 1, initial=0.2, maximum=5.0)
        log.info("Reconnecting to the broker in {delay:.1f}s", delay=delay)
        if connection is None:
            return defer.succeed(None)
        return task.deferLater(self.clock, delay, self._disconnect_live, connection)

    def _disconnect_live(self, connection: Any) -> None:
        if connection is self._live:
            self._disconnect(connection)

    def _lost(self, reason: object) -> object:
        if self.status.connected:
            log.warn("Broker connection lost: {reason}", reason=getattr(reason, "value", reason))
            if len(self.nodes.urls) > 1:
                self.nodes.advance()
        self.status.broker_lost()
        lost, self.link = self.link, None
        self._link_lost(lost)
        return None

    def when_connected(self) -> defer.Deferred[IStreamLink]:
        """The current link, or the next one once it is set up."""
        if self.link is not None and self.status.connected:
            return defer.succeed(self.link)
        waiter: defer.Deferred[IStreamLink] = defer.Deferred(self._connected_waiters.remove)
        self._connected_waiters.append(waiter)
        return waiter

    def drop_connection(self) -> None:
        """Close the current connection so that ``ClientService`` makes a new one."""
        connection = getattr(self.link, "connection", None)
        if connection is not None:
            self._disconnect(connection)
