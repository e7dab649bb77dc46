"""Asking the stream whether a state belongs to it: the anchor check.

A state's :class:`~gradesvc.state.identity.Anchor` says "offset N held the message
whose body has this SHA-256".  :class:`StreamVerifier` asks the broker, over
short-lived consumers beside the replica's own:

1. where the stream ends now: it publishes a probe marker and reads it back
   from ``last``, so a stream *shorter* than the state (recreated, or another
   stream) is told apart from one that merely has not delivered yet, without
   waiting on a timer;
2. which message is at offset N: the first delivery of a consumer at N.

The state belongs to the stream only when N is before the end and the message
there is the anchor's.  Anything else (another body, no message at N, N past
the end, N dropped by retention so that nothing can be confirmed) is a refusal
with a sentence saying why.  Broker trouble is no verdict: it raises, and the
caller tries again.
"""

from __future__ import annotations

import json
import uuid
from typing import Optional

from pika.exceptions import AMQPError
from twisted.internet import defer, error, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gradesvc.state.identity import Anchor, body_sha256
from gradesvc.stream.link import (
    BrokerUnavailable,
    Delivery,
    IBroker,
    IStreamLink,
    Start,
    StreamDeleted,
    SubscriptionEnded,
)
from gradesvc.stream.messages import MARKER_TYPE, WriteMessage, marker_message
from svckit.supervisor import backoff
from txrabbitstream import ProtocolError, StreamError

log = Logger()

PROBE_TIMEOUT = 5.0
PROBE_PREFETCH = 1000
BROKER_TROUBLE = (AMQPError, error.ConnectionClosed, error.ConnectionLost, error.ConnectError, defer.TimeoutError,
                  BrokerUnavailable, SubscriptionEnded, StreamDeleted, StreamError, ProtocolError)
"""What makes a check inconclusive (tried again), whichever protocol the link speaks."""


async def first_delivery(link: IStreamLink, start: Start, clock: IReactorTime,
                         timeout: float = PROBE_TIMEOUT) -> Optional[Delivery]:
    """The first message a subscription at ``start`` (an offset, or ``"first"``) gets; None after ``timeout``."""
    subscription = await link.subscribe(start, 1)
    try:
        got = subscription.next_batch()
        got.addTimeout(timeout, clock)
        try:
            batch = await got
        except defer.TimeoutError:
            return None
        return batch[0]
    finally:
        subscription.close()


class StreamVerifier:
    """Checks anchors against the stream of ``broker``."""

    def __init__(self, broker: IBroker, replica_id: str, clock: IReactorTime) -> None:
        self.broker = broker
        self.replica_id = replica_id
        self.clock = clock

    async def check(self, anchor: Anchor) -> Optional[str]:
        """None when the stream holds ``anchor``, else why not.

        Waits for a broker connection and tries again after broker trouble, so
        it returns only with a verdict.
        """
        failures = 0
        while True:
            link = await self.broker.when_connected()
            try:
                return await self.check_on(link, anchor)
            except BROKER_TROUBLE as e:
                failures += 1
                delay = backoff(failures, initial=0.2, maximum=5.0)
                log.info("Could not check the state against the stream ({error!r}); again in {delay:.1f}s",
                         error=e, delay=delay)
                await task.deferLater(self.clock, delay, lambda: None)

    async def check_on(self, link: IStreamLink, anchor: Anchor) -> Optional[str]:
        """:meth:`check` over ``link``; broker trouble raises."""
        if not anchor.checkable:
            return "it carries no stream identity and no written field to check it by"
        end = await self.tail_offset(link)
        if anchor.offset >= end:
            return f"the stream ends before offset {anchor.offset} (its newest offset is {end - 1})"
        at = anchor.offset if anchor.row is None else anchor.row.offset
        delivery = await first_delivery(link, at, self.clock)
        if delivery is None:
            raise defer.TimeoutError(f"no delivery from offset {at}")
        offset, _kind, body = delivery
        if offset != at:
            return f"offset {at} holds no message in the stream now (the first from there is at offset {offset})"
        if anchor.row is None:
            digest = body_sha256(body)
            if digest != anchor.sha256:
                return f"offset {at} holds another message (sha256 {digest[:12]}…)"
            return None
        row = anchor.row
        try:
            write = WriteMessage.decode(body).write
        except (ValueError, TypeError):
            return f"offset {at} holds no write"
        if write.user_id != row.user_id or write.patch.get(row.field) != row.value:
            return f"the write at offset {at} is not the one the file's rows name"
        return None

    async def tail_offset(self, link: IStreamLink) -> int:
        """The offset a message published now gets: one past the stream's newest.

        Publishes a probe marker (the consumers skip it) and reads from the
        stream's last chunk until that marker comes back.
        """
        subscription = await link.subscribe("last", PROBE_PREFETCH)
        try:
            nonce = f"probe-{uuid.uuid4().hex}"
            await self.broker.publish(marker_message(self.replica_id, nonce))
            deadline = self.clock.seconds() + PROBE_TIMEOUT
            while True:
                got = subscription.next_batch()
                got.addTimeout(max(0.0, deadline - self.clock.seconds()), self.clock)
                batch = await got
                subscription.done(batch)
                for offset, kind, body in batch:
                    if kind == MARKER_TYPE and _marker_of(body) == nonce:
                        return offset
        finally:
            subscription.close()


def _marker_of(body: bytes) -> Optional[str]:
    try:
        marker = json.loads(body).get("marker")
    except (ValueError, AttributeError):
        return None
    return marker if isinstance(marker, str) else None
