"""Consuming the stream: apply every write in stream order, find real gaps, catch up.

On every broker connection :class:`StreamConsumer` subscribes from the last
applied offset + 1 (never by time, never ``next``) and hands each delivery to
its :class:`~gradesvc.stream.applier.StreamApplier` (the store's rule: the
later offset wins, per field).  Acks are sent with ``multiple=True``, one per
batch, as flow-control credit; the broker keeps messages regardless.

**Catching up.** After every (re)subscribe the replica is not ready: it
publishes a small *sync marker* with a random nonce, whose offset is at or
after the stream's tail when consuming began, and is ready exactly when its
own marker comes back.

**Gaps.** Every delivery's offset is compared with the last applied one; a
jump is judged by where the stream now begins (:mod:`gradesvc.stream.streamstart`).
Where messages were lost, the replica leaves ready and re-bootstraps from a
peer whose snapshot reaches past the gap; with none, it stays in phase
``retention_gap``.

**Identity.** Before every subscribe, the state in memory (loaded or built
here) is checked against the stream by its anchor (:mod:`gradesvc.stream.verification`):
a stream deleted and declared again while this replica was away is another
life, and resuming in it would mix two histories.  On a refusal the replica
says so (one error line, ``/ready``), moves its checkpoint aside, empties
the store and rebuilds from a peer whose snapshot verifies, else from the
stream.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Awaitable, Callable, Optional

from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gradesvc.state.identity import Anchor
from gradesvc.state.phase import Phase, ReplicaStatus
from gradesvc.state.store import GradeStore
from gradesvc.stream.applier import StreamApplier
from gradesvc.stream.link import IBroker, IStreamLink, ISubscription, StreamDeleted, SubscriptionEnded
from gradesvc.stream.messages import marker_message
from gradesvc.stream.progress import StreamProgress
from gradesvc.stream.streamstart import StreamGap, StreamStart
from gradesvc.stream.verification import StreamVerifier
from svckit.supervisor import backoff

log = Logger()

PREFETCH = 1000

Rebootstrap = Callable[[int], Awaitable[Optional[Anchor]]]
"""``rebootstrap(needed)``: load a peer snapshot reflecting offset ``needed`` or
later; the snapshot's anchor, or None when no peer has one."""


class StreamConsumer:
    """Applies the stream to the store, from a given offset on."""

    def __init__(
        self,
        store: GradeStore,
        replica_id: str,
        broker: IBroker,
        status: ReplicaStatus,
        progress: StreamProgress,
        registry: CollectorRegistry,
        *,
        wall: Callable[[], float],
        clock: IReactorTime,
    ) -> None:
        self.clock = clock
        self.broker = broker
        self.status = status
        self.applier = StreamApplier(store, replica_id, status, progress, registry, wall)
        """Applies every delivery; knows where the store stands in the stream."""
        self.applier.marker_back = self._caught_up
        self.replica_id = replica_id
        self.rebootstrap: Optional[Rebootstrap] = None
        self.verifier: Optional[StreamVerifier] = None
        """Checks the state against the stream before each subscribe (None: unchecked)."""
        self.state_refused: Optional[Callable[[], Optional[Path]]] = None
        """Called when the state was refused: moves its checkpoint aside, says where to."""
        self.start = StreamStart(broker, registry, clock)
        """Where the stream begins; judges jumps in the delivered offsets."""
        self.snapshot_loaded: defer.Deferred[Optional[Anchor]] = defer.Deferred()
        self.snapshot_loaded.addCallback(self.applier.loaded)
        self._started_at = self._subscribed_at = clock.seconds()
        self._failures = 0
        self._rebootstraps = Counter(
            "gradesvc_rebootstraps", "Re-bootstraps from a peer after a gap in the stream.",
            registry=registry,
        )
        broker.on_connect.append(self.subscribe)

    async def subscribe(self, link: IStreamLink) -> None:
        """Check the state, consume from the last applied offset + 1; ready once the marker is back."""
        await self.snapshot_loaded
        if self.status.phase is Phase.RETENTION_GAP:
            return
        anchor = self.applier.anchor()
        if anchor is not None and self.verifier is not None:
            problem = await self.verifier.check_on(link, anchor)
            if problem is not None:
                await self._refuse_state(link, anchor, problem)
                return
        start = self.status.applied_offset + 1
        subscription = await link.subscribe(start, PREFETCH)
        log.info("Consuming stream {stream} from offset {offset} ({protocol})", stream=self.broker.stream,
                 offset=start, protocol=link.protocol)
        self.status.catching_up()
        self.status.waiting_for = (f"its sync marker to come back from the stream's tail"
                                   f" (consuming from offset {start})")
        self._subscribed_at = self.clock.seconds()
        self.applier.marker = uuid.uuid4().hex
        published = self._publish_marker()
        published.addErrback(self._marker_failed, link)
        self.consume(link, subscription)

    def consume(self, link: IStreamLink, subscription: ISubscription) -> defer.Deferred[None]:
        """Apply what ``subscription`` delivers until it stops: a gap in the stream is recovered from,
        any other fault is logged and the replica resubscribes after a back-off."""
        consuming = defer.ensureDeferred(self._consume(link, subscription))
        return consuming.addErrback(self._consumer_stopped, link)

    async def _refuse_state(self, link: IStreamLink, anchor: Anchor, problem: str) -> None:
        """The state in memory is not of this stream's life: drop it and rebuild."""
        log.error(
            "Refusing this replica's state: it reflects stream {stream} up to {anchor}, but {problem}."
            " The stream was deleted and declared again, or the state is another stream's. Emptying"
            " the store, moving the checkpoint aside, rebuilding from a peer or the stream.",
            stream=self.broker.stream_id, anchor=anchor.describe(), problem=problem,
        )
        self.status.loading_snapshot()
        moved_to = self.state_refused() if self.state_refused is not None else None
        self.status.state_refused("memory", f"state at {anchor.describe()}", problem, moved_to)
        self.applier.forget()
        rebuilt = await self.rebootstrap(-1) if self.rebootstrap is not None else None
        self.applier.loaded(rebuilt)
        self.broker.reconnect_later(link, 0.0)

    def _marker_failed(self, failure: Failure, link: IStreamLink) -> None:
        log.warn("Sync marker not published ({error}); reconnecting", error=failure.value)
        self.broker.reconnect_later(link)

    def _consumer_stopped(self, failure: Failure, link: IStreamLink) -> defer.Deferred[None]:
        if failure.check(StreamGap):
            gap: StreamGap = failure.value  # type: ignore[assignment]
            return defer.ensureDeferred(self._recover(link, gap))
        self._consumer_failed(failure, link)
        return defer.succeed(None)

    def _consumer_failed(self, failure: Failure, link: IStreamLink) -> None:
        """The consume loop broke: not ready, and a new subscription after a back-off."""
        self._failures += 1
        delay = backoff(self._failures)
        log.failure(
            "Stream consumer failed at offset {offset}; not ready, resubscribing in {delay:.1f}s",
            failure, offset=self.status.applied_offset, delay=delay,
        )
        self.status.consumer_failed()
        self.broker.reconnect_later(link, delay)

    def _publish_marker(self) -> defer.Deferred[None]:
        marker = self.applier.marker
        assert marker is not None
        return defer.ensureDeferred(self._publish(marker))

    async def _publish(self, marker: str) -> None:
        await self.broker.publish(marker_message(self.replica_id, marker))

    async def _consume(self, link: IStreamLink, subscription: ISubscription) -> None:
        """Apply deliveries in batches: one wait and one ack (or credit) per batch.

        A batch is what one socket read brought (AMQP 0.9.1) or one chunk (the
        stream protocol).  Waiting one reactor turn after each lets the next
        ones collect, so a busy stream costs one wake-up per read, not per
        message; an idle one still wakes on the very next delivery.  Raises
        :class:`StreamGap` on a real gap.
        """
        status, applier = self.status, self.applier
        while True:
            try:
                batch = await subscription.next_batch()
            except StreamDeleted as e:
                # The stream was deleted (or its leader moved) under us: a new
                # connection declares it again and checks the state against it.
                log.warn("The broker ended the consumer of stream {stream} ({why}); not ready, reconnecting",
                         stream=self.broker.stream, why=e)
                self.status.catching_up()
                self.broker.reconnect_later(link, 1.0)
                return
            except (SubscriptionEnded, defer.CancelledError) as e:
                # The connection closed: a new connection subscribes again.
                log.info("Stream consumer stopped: {error!r}", error=e)
                return
            for offset, kind, body in batch:
                expected = status.applied_offset + 1
                if offset > expected:
                    try:
                        await self.start.check_jump(link, expected, offset)
                    except StreamGap:
                        subscription.close()
                        raise
                applier.handle(offset, kind, body)
            applier.batch_done()
            subscription.done(batch)
            await task.deferLater(self.clock, 0, lambda: None)

    async def _recover(self, link: IStreamLink, gap: StreamGap) -> None:
        """A real gap: re-bootstrap from a peer past it, or stay in ``retention_gap``."""
        log.error(
            "Gap in stream {stream}: offsets {wanted}..{last} are gone (the stream now starts at"
            " {first}); leaving ready to re-bootstrap from a peer",
            stream=self.broker.stream, wanted=gap.wanted, last=gap.first_available - 1,
            first=gap.first_available,
        )
        self.status.loading_snapshot()
        anchor = await self.rebootstrap(gap.first_available - 1) if self.rebootstrap is not None else None
        if anchor is not None:
            self._rebootstraps.inc()
            self.applier.loaded(anchor)
            log.info("Re-bootstrapped to offset {offset}; resubscribing", offset=anchor.offset)
            self.broker.reconnect_later(link, 0.0)
            return
        log.critical(
            "Retention gap on stream {stream}: messages {wanted}..{last} are gone and no peer has"
            " a snapshot past them. This replica is NOT in sync and stays unready: restart it"
            " with peers that have the data.",
            stream=self.broker.stream, wanted=gap.wanted, last=gap.first_available - 1,
        )
        self.status.retention_gap(gap.wanted, gap.first_available)


    def _caught_up(self) -> None:
        """This replica's sync marker came back: caught up with the tail seen at subscribe."""
        if self.status.phase is Phase.CATCHING_UP:
            self._failures = 0
            self.status.reached_ready(self.clock.seconds() - self._started_at)
            log.info(
                "Caught up with stream at offset {offset}, {seconds:.2f}s after subscribing; ready",
                offset=self.status.applied_offset, seconds=self.clock.seconds() - self._subscribed_at,
            )
