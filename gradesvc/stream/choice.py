"""``--stream-protocol``: which protocol carries the stream, and ``auto``'s choice.

``stream`` and ``amqp`` are taken as given.  ``auto`` (the default) asks the
broker once, at start: the stream protocol when a node's stream port answers,
AMQP 0.9.1 when only its AMQP port does (a broker without the
``rabbitmq_stream`` plugin); a broker that answers on neither is asked again
with back-off, never guessed at.  The choice is logged once and shown on
``/ready`` (``stream_protocol``) for the life of the process.

:class:`AutoBroker` stands in for the chosen broker from the start, so the
rest of the replica is wired once: hooks registered on it go to the broker
it chooses, and publishing before the choice is refused as "not connected".
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from twisted.application import service
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from gradesvc.state.phase import ReplicaStatus
from gradesvc.stream.amqp import AmqpBroker
from gradesvc.stream.broker import ReconnectingBroker, node_urls, redact, stream_id_of, stream_port_of, tcp_endpoint
from gradesvc.stream.link import BrokerUnavailable, ConnectHook, IBroker, IStreamLink, Outgoing
from gradesvc.stream.streamprotocol import StreamBroker
from svckit.supervisor import backoff

log = Logger()

PROTOCOLS = ("auto", "stream", "amqp")
PROBE_TIMEOUT = 2.0


def make_broker(choice: str, reactor: IReactorCore, url: str, stream: str, status: ReplicaStatus, replica_id: str,
                clock: Optional[IReactorTime] = None) -> Any:
    """The broker of ``--stream-protocol choice``."""
    if choice == "amqp":
        status.stream_protocol = "amqp"
        return AmqpBroker(reactor, url, stream, status, clock)
    if choice == "stream":
        status.stream_protocol = "stream"
        return StreamBroker(reactor, url, stream, status, replica_id, clock)
    return AutoBroker(reactor, url, stream, status, replica_id, clock)


async def answers(reactor: Any, endpoint: Any, clock: IReactorTime) -> bool:
    """Whether a TCP connection to ``endpoint`` is accepted (then closed at once)."""
    connecting = endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
    connecting.addTimeout(PROBE_TIMEOUT, clock)
    try:
        connected = await connecting
    except Exception:
        return False
    connected.transport.loseConnection()
    return True


@implementer(IBroker)
class AutoBroker(service.MultiService):
    """The broker of whichever protocol the broker offers, chosen once at start."""

    protocol = "auto"

    def __init__(self, reactor: IReactorCore, url: str, stream: str, status: ReplicaStatus, replica_id: str,
                 clock: Optional[IReactorTime] = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor  # type: ignore[assignment]
        self.url = url
        self.stream = stream
        self.status = status
        self.replica_id = replica_id
        self.stream_id = stream_id_of(url, stream)
        self.on_connect: List[ConnectHook] = []
        self.on_stream_recreated: List[Callable[[], None]] = []
        self.chosen: Optional[ReconnectingBroker] = None
        """The broker of the protocol chosen (None until the broker answered)."""
        self._waiting: List[defer.Deferred[IStreamLink]] = []
        status.stream_protocol = "auto"

    def startService(self) -> None:
        super().startService()
        defer.ensureDeferred(self._choose())

    async def _choose(self) -> None:
        protocol = await self._ask()
        if protocol is None:  # stopped before the broker answered
            return
        broker = make_broker(protocol, self.reactor, self.url, self.stream, self.status, self.replica_id, self.clock)
        broker.on_connect = self.on_connect
        broker.on_stream_recreated = self.on_stream_recreated
        self.chosen = broker
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            broker.when_connected().chainDeferred(waiter)
        broker.setServiceParent(self)

    async def _ask(self) -> Optional[str]:
        """``stream`` or ``amqp``, as the broker answers (asked again with back-off until one port does)."""
        urls = node_urls(self.url)
        if any(stream_port_of(u) is None for u in urls):
            log.warn("--amqp-url names an AMQP port other than 5672 and no ?stream_port=N: using AMQP 0.9.1"
                     " (name the stream port to use the stream protocol)")
            return "amqp"
        tries = 0
        while self.running:
            url = urls[tries % len(urls)]
            if await answers(self.reactor, tcp_endpoint(self.reactor, url, stream_port_of(url)), self.clock):
                log.info("The broker's stream port answers at {url} (port {port}): using the stream protocol",
                         url=redact(url), port=stream_port_of(url))
                return "stream"
            if await answers(self.reactor, tcp_endpoint(self.reactor, url), self.clock):
                log.warn("The broker at {url} answers AMQP but not the stream protocol on port {port}: using AMQP"
                         " 0.9.1 (enable the rabbitmq_stream plugin for batched writes and fast catch-up)",
                         url=redact(url), port=stream_port_of(url))
                return "amqp"
            tries += 1
            delay = backoff(tries, initial=0.2, maximum=5.0)
            log.info("No broker answers at {url}; asking again in {delay:.1f}s", url=redact(url), delay=delay)
            await task.deferLater(self.clock, delay, lambda: None)
        return None

    @property
    def link(self) -> Optional[IStreamLink]:
        return self.chosen.link if self.chosen is not None else None

    def publish(self, message: Outgoing) -> defer.Deferred[None]:
        if self.chosen is None:
            return defer.fail(BrokerUnavailable("not connected to the broker"))
        return defer.ensureDeferred(self.chosen.publish(message))  # type: ignore[attr-defined]

    def when_connected(self) -> defer.Deferred[IStreamLink]:
        if self.chosen is not None:
            return self.chosen.when_connected()
        waiter: defer.Deferred[IStreamLink] = defer.Deferred(self._waiting.remove)
        self._waiting.append(waiter)
        return waiter

    def reconnect_later(self, link: Optional[IStreamLink] = None, delay: Optional[float] = None,
                        ) -> defer.Deferred[None]:
        if self.chosen is None:
            return defer.succeed(None)
        return self.chosen.reconnect_later(link, delay)

    def drop_connection(self) -> None:
        if self.chosen is not None:
            self.chosen.drop_connection()
