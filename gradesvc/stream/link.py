"""What the replica needs of a broker connection, whichever protocol carries it.

The consumer, the identity check and the gap check read the stream through
an :class:`IStreamLink` (one connection) and its :class:`ISubscription`\\ s;
the write path publishes through an :class:`IBroker`.  Two implementations
stand behind these: AMQP 0.9.1 through pika (:mod:`gradesvc.stream.amqp`)
and RabbitMQ's stream protocol (:mod:`gradesvc.stream.streamprotocol`).
Nothing above this package knows which one is in use.

A delivery is ``(offset, kind, body)``: the stream offset, the message's kind
(``"write"``, ``"write-batch"``, ``"sync-marker"``; None when it has none)
and its body.
"""

from __future__ import annotations

from typing import Awaitable, Callable, List, Optional, Tuple, Union

import attrs
from twisted.internet import defer
from zope.interface import Attribute, Interface

Delivery = Tuple[int, Optional[str], bytes]
"""``(offset, kind, body)`` of one stream message."""
Start = Union[int, str]
"""Where a subscription begins: an offset, ``"first"`` or ``"last"`` (the start of the last chunk)."""


class BrokerUnavailable(Exception):
    """The broker did not take a message (down, closed, refused or timed out)."""


class StreamDeleted(Exception):
    """The stream was deleted under a subscription or a publish."""


class SubscriptionEnded(Exception):
    """A subscription ended with its connection (a new connection subscribes again)."""


@attrs.frozen
class Outgoing:
    """A message to publish: its kind and body, and what AMQP 0.9.1 also carries as properties."""

    kind: str
    body: bytes
    replica: str
    message_id: str
    written_at: int = 0
    """The writer's wall clock in milliseconds (0: not a write)."""


class ISubscription(Interface):
    """Deliveries of one stream from a start on, in stream order, a batch at a time."""

    def next_batch() -> defer.Deferred[List[Delivery]]:
        """The next deliveries (at least one); fails with :class:`StreamDeleted` when the stream is
        gone, or with the connection's error when it ends."""

    def done(batch: List[Delivery]) -> None:
        """``batch`` is handled: the broker may send more (an ack, or credit)."""

    def close() -> None:
        """Stop (deliveries already on their way are dropped)."""


class IStreamLink(Interface):
    """One connection to a broker node, open and with the stream declared."""

    protocol = Attribute("'amqp' or 'stream'")

    def subscribe(start: Start, prefetch: int) -> Awaitable[ISubscription]:
        """A subscription to the replica's stream from ``start``; the broker sends about ``prefetch``
        messages ahead.  Deliveries before an offset ``start`` (the first chunk may begin earlier)
        are never handed out."""


ConnectHook = Callable[[IStreamLink], Awaitable[None]]


class IBroker(Interface):
    """The replica's connection to the broker, kept up; publishing with confirms."""

    stream = Attribute("The stream's name")
    stream_id = Attribute("The stream's identity (vhost, name)")
    protocol = Attribute("'amqp' or 'stream'")
    on_connect = Attribute("Hooks called with every new link once it is set up")
    link = Attribute("The current link, once set up (None while disconnected)")

    def publish(message: Outgoing) -> Awaitable[None]:
        """Publish; fires once the broker confirmed it, else fails with :class:`BrokerUnavailable`
        (or :class:`StreamDeleted`)."""

    def when_connected() -> defer.Deferred[IStreamLink]:
        """The current link, or the next one once it is set up."""

    def reconnect_later(link: Optional[IStreamLink] = None, delay: Optional[float] = None) -> defer.Deferred[None]:
        """Close ``link`` after ``delay`` (a back-off when None) so that a new one is made."""
