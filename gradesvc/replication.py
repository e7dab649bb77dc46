"""Consuming the stream: apply other replicas' writes, track offsets, catch up.

On every broker connection :class:`StreamConsumer` subscribes from the last
applied offset + 1 (never by time, never ``next``), applies each message with
the storage's last-writer-wins rule, and records the message's
``x-stream-offset``.  Acks are sent with ``multiple=True``, one per batch, as
flow-control credit; the broker keeps messages regardless.

Catching up: right after subscribing for the first time the replica publishes a
small *sync marker* carrying a random nonce.  Its offset is at or after the
stream's tail when consuming began, so the replica is caught up exactly when
its own marker comes back, with no guessing from timers or message counts.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Optional

import pika
from pika.adapters.twisted_connection import TwistedProtocolConnection
from pika.exceptions import AMQPError
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gradesvc.broker import BrokerService
from gradesvc.hlc import HybridLogicalClock, physical_seconds
from gradesvc.messages import WriteMessage
from gradesvc.status import CATCHING_UP, RETENTION_GAP, ReplicaStatus
from gradesvc.storage import GradeStore
from svckit.metrics import Registry

log = Logger()

WRITE_TYPE = "write"
MARKER_TYPE = "sync-marker"
PREFETCH = 1000
LAG_BUCKETS = (0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
               0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def write_properties(message: WriteMessage) -> pika.BasicProperties:
    """AMQP properties of a write message."""
    return pika.BasicProperties(
        app_id=message.replica,
        message_id=message.message_id,
        content_type="application/json",
        type=WRITE_TYPE,
        timestamp=int(time.time()),
        delivery_mode=2,
    )


class StreamConsumer:
    """Applies the stream to the store, from a given offset on."""

    def __init__(
        self,
        store: GradeStore,
        hlc: HybridLogicalClock,
        replica_id: str,
        broker: BrokerService,
        status: ReplicaStatus,
        registry: Registry,
        seconds: Callable[[], float] = time.time,
        *,
        clock: IReactorTime,
    ) -> None:
        self.clock = clock
        self.seconds = seconds
        self.store = store
        self.hlc = hlc
        self.replica_id = replica_id
        self.broker = broker
        self.status = status
        self.snapshot_loaded: "defer.Deferred[None]" = defer.Deferred()
        self._marker: Optional[str] = None
        self._started_at = time.monotonic()
        self._applied = registry.counter(
            "gradesvc_stream_messages_applied_total", "Stream messages applied to the store."
        )
        self._skipped = registry.counter(
            "gradesvc_stream_messages_skipped_total",
            "Stream messages skipped, by reason.",
            ("reason",),
        )
        self._lag = registry.histogram(
            "gradesvc_replication_delay_seconds",
            "Time from another replica's write (its clock) to applying it here, once ready.",
            LAG_BUCKETS,
        )
        broker.on_connect.append(self.subscribe)

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
        if not self.status.ever_ready:
            self.status.phase = CATCHING_UP
            self._marker = uuid.uuid4().hex
            published = self._publish_marker()
            published.addErrback(lambda f: log.warn("Sync marker not published: {f}", f=f.value))
        defer.ensureDeferred(self._consume(channel, queue, start))

    def _publish_marker(self) -> "defer.Deferred[None]":
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
            except (AMQPError, defer.CancelledError) as e:
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
        self.status.gap = {"wanted_offset": wanted, "first_available_offset": first}
        self.status.phase = RETENTION_GAP

    def handle(self, offset: int, properties: Any, body: bytes) -> None:
        """Apply one delivery at ``offset`` (idempotent; older offsets are ignored)."""
        status = self.status
        if offset <= status.applied_offset:
            self._skipped.inc(reason="duplicate")
            return
        status.applied_offset = offset
        if properties.type == MARKER_TYPE:
            self._on_marker(body)
            return
        try:
            message = WriteMessage.decode(body)
        except (ValueError, TypeError) as e:
            log.warn("Malformed stream message at offset {offset}: {error}", offset=offset, error=e)
            self._skipped.inc(reason="malformed")
            return
        self.hlc.observe(message.timestamp)
        lag = max(0.0, self.seconds() - physical_seconds(message.timestamp))
        status.lag_seconds = lag
        write = message.write
        if message.replica == self.replica_id:
            if self.store.is_applied(write.user_id, list(write.patch), message.timestamp, message.replica):
                self._skipped.inc(reason="own")
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
            self._skipped.inc(reason="marker")
            return
        self._marker = None
        if self.status.phase == CATCHING_UP:
            self.status.reached_ready()
            self.status.bootstrap_seconds = time.monotonic() - self._started_at
            log.info(
                "Caught up with stream at offset {offset} after {seconds:.2f}s; ready",
                offset=self.status.applied_offset, seconds=self.status.bootstrap_seconds,
            )
