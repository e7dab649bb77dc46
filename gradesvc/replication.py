"""Consuming the stream: apply other replicas' writes, track offsets, catch up.

On every broker connection :class:`StreamConsumer` subscribes from the last
applied offset + 1 (never by time, never ``next``), applies each message with
the storage's last-writer-wins rule, and records the message's
``x-stream-offset``.  Acks are sent with ``multiple=True``, one per batch, as
flow-control credit; the broker keeps messages regardless.

Catching up: right after subscribing while not ready (at start, and after the
consumer failed) the replica publishes a
small *sync marker* carrying a random nonce.  Its offset is at or after the
stream's tail when consuming began, so the replica is caught up exactly when
its own marker comes back, with no guessing from timers or message counts.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Callable, Optional

import pika
from pika.adapters.twisted_connection import TwistedProtocolConnection
from pika.exceptions import AMQPError
from prometheus_client import CollectorRegistry, Counter, Histogram
from twisted.internet import defer, task
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gradesvc.broker import BrokerService
from gradesvc.hlc import HybridLogicalClock, physical_seconds
from gradesvc.messages import MARKER_TYPE, WriteMessage
from gradesvc.status import Phase, ReplicaStatus
from gradesvc.storage import GradeStore

log = Logger()

PREFETCH = 1000
SKIP_REASONS = ("duplicate", "malformed", "own", "marker")
LAG_BUCKETS = (0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
               0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class StreamConsumer:
    """Applies the stream to the store, from a given offset on."""

    def __init__(
        self,
        store: GradeStore,
        hlc: HybridLogicalClock,
        replica_id: str,
        broker: BrokerService,
        status: ReplicaStatus,
        registry: CollectorRegistry,
        *,
        wall: Callable[[], float],
        clock: IReactorTime,
    ) -> None:
        self.clock = clock
        self.wall = wall
        self.store = store
        self.hlc = hlc
        self.replica_id = replica_id
        self.broker = broker
        self.status = status
        self.snapshot_loaded: defer.Deferred[int] = defer.Deferred()
        self.snapshot_loaded.addCallback(self._snapshot_offset)
        self._marker: Optional[str] = None
        self._started_at = clock.seconds()
        self._failures = 0
        self._applied = Counter(
            "gradesvc_stream_messages_applied", "Stream messages applied to the store.",
            registry=registry,
        )
        skipped = Counter(
            "gradesvc_stream_messages_skipped", "Stream messages skipped, by reason.",
            ["reason"], registry=registry,
        )
        self._skipped = {reason: skipped.labels(reason) for reason in SKIP_REASONS}
        self._lag = Histogram(
            "gradesvc_replication_delay_seconds",
            "Time from another replica's write (its clock) to applying it here, once ready.",
            buckets=LAG_BUCKETS, registry=registry,
        )
        broker.on_connect.append(self.subscribe)

    def _snapshot_offset(self, offset: int) -> None:
        self.status.applied_offset = max(self.status.applied_offset, offset)

    async def subscribe(self, connection: TwistedProtocolConnection) -> None:
        """Start consuming on a fresh connection once the snapshot is in."""
        await self.snapshot_loaded
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=PREFETCH)
        start = self.status.applied_offset + 1
        queue, _tag = await channel.basic_consume(
            queue=self.broker.stream,
            auto_ack=False,
            arguments={"x-stream-offset": start},
        )
        log.info("Consuming stream {stream} from offset {offset}", stream=self.broker.stream, offset=start)
        if self.status.phase is not Phase.READY:
            self.status.catching_up()
            self._marker = uuid.uuid4().hex
            published = self._publish_marker()
            published.addErrback(lambda f: log.warn("Sync marker not published: {f}", f=f.value))
        consuming = defer.ensureDeferred(self._consume(channel, queue, start))
        consuming.addErrback(self._consumer_failed, connection)

    def _consumer_failed(self, failure: Failure, connection: TwistedProtocolConnection) -> None:
        """The consume loop broke: not ready, and a new subscription after a back-off."""
        self._failures += 1
        delay = min(30.0, 0.5 * 2 ** (self._failures - 1))
        log.failure(
            "Stream consumer failed at offset {offset}; not ready, resubscribing in {delay:.1f}s",
            failure, offset=self.status.applied_offset, delay=delay,
        )
        self.status.consumer_failed()
        self.broker.reconnect_later(connection, delay)

    def _publish_marker(self) -> defer.Deferred[None]:
        body = json.dumps({"replica": self.replica_id, "marker": self._marker}).encode()
        props = pika.BasicProperties(
            app_id=self.replica_id,
            message_id=f"{self.replica_id}:marker:{self._marker}",
            content_type="application/json",
            type=MARKER_TYPE,
            delivery_mode=2,
        )
        return defer.ensureDeferred(self.broker.publish(body, props))

    async def _consume(self, channel: Any, queue: Any, start: int) -> None:
        """Apply deliveries in batches: one wait and one ack per batch.

        pika hands over every message of a socket read before returning to the
        reactor.  Waiting one reactor turn after each batch lets them collect
        in the queue's ``pending`` list, so a busy stream costs one Deferred and
        one ack per read, not per message; an idle one still wakes on the very
        next delivery.
        """
        expected: Optional[int] = start
        while True:
            try:
                message = await queue.get()
            except (AMQPError, ConnectionClosed, defer.CancelledError) as e:
                # The channel or connection closed: a new connection subscribes again.
                log.info("Stream consumer stopped: {error!r}", error=e)
                return
            batch = [message, *queue.pending]
            del queue.pending[:]
            for message in batch:
                offset = (message.properties.headers or {}).get("x-stream-offset")
                if not isinstance(offset, int):
                    log.warn("Stream delivery without x-stream-offset; skipped")
                    continue
                if expected is not None:
                    if offset > expected:
                        self._retention_gap(expected, offset)
                    expected = None
                self.handle(offset, message.properties, message.body)
            if channel.is_open:
                channel.basic_ack(batch[-1].method.delivery_tag, multiple=True)
            await task.deferLater(self.clock, 0, lambda: None)

    def _retention_gap(self, wanted: int, first: int) -> None:
        log.critical(
            "Retention gap on stream {stream}: asked for offset {wanted}, the broker's"
            " first delivery is offset {first}; messages {wanted}..{last} are gone."
            " This replica is NOT in sync: restart it with peers that have the data.",
            stream=self.broker.stream, wanted=wanted, first=first, last=first - 1,
        )
        self.status.retention_gap(wanted, first)

    def handle(self, offset: int, properties: Any, body: bytes) -> None:
        """Apply one delivery at ``offset`` (idempotent; older offsets are ignored).

        The applied offset moves only once the delivery has been handled, so
        one that fails is delivered again after the consumer restarts.
        """
        status = self.status
        if offset <= status.applied_offset:
            self._skipped["duplicate"].inc()
            return
        if properties.type == MARKER_TYPE:
            status.applied_offset = offset
            self._on_marker(body)
            return
        self._apply(offset, body)
        status.applied_offset = offset

    def _apply(self, offset: int, body: bytes) -> None:
        status = self.status
        try:
            message = WriteMessage.decode(body)
        except (ValueError, TypeError) as e:
            log.warn("Malformed stream message at offset {offset}: {error}", offset=offset, error=e)
            self._skipped["malformed"].inc()
            return
        self.hlc.observe(message.timestamp)
        lag = max(0.0, self.wall() - physical_seconds(message.timestamp))
        status.lag_seconds = lag
        write = message.write
        if message.replica == self.replica_id:
            if self.store.is_applied(write.user_id, list(write.patch), message.timestamp, message.replica):
                self._skipped["own"].inc()
                return
        elif status.ready:
            self._lag.observe(lag)
        self.store.apply_patch(write.user_id, write.patch, message.timestamp, message.replica)
        self._applied.inc()

    def _on_marker(self, body: bytes) -> None:
        try:
            marker = json.loads(body).get("marker")
        except ValueError:
            return
        if marker is None or marker != self._marker:
            self._skipped["marker"].inc()
            return
        self._marker = None
        if self.status.phase is Phase.CATCHING_UP:
            self._failures = 0
            self.status.reached_ready(self.clock.seconds() - self._started_at)
            log.info(
                "Caught up with stream at offset {offset} after {seconds:.2f}s; ready",
                offset=self.status.applied_offset, seconds=self.status.bootstrap_seconds,
            )
