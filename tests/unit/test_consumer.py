"""StreamConsumer in memory: batching and acks, stream order, jumps and gaps, own writes, lag."""

from __future__ import annotations

from typing import Any, List, Optional

import pika
import pytest
from pika.adapters.twisted_connection import ClosableDeferredQueue, ReceivedMessage
from pika.spec import Basic
from twisted.internet import defer, task

from gradesvc.state.identity import Anchor
from gradesvc.state.phase import Phase, ReplicaStatus
from gradesvc.state.store import GradeStore
from gradesvc.stream.amqp import AmqpLink, AmqpSubscription
from gradesvc.stream.consumer import StreamConsumer
from gradesvc.stream.messages import MARKER_TYPE, Write, WriteMessage
from gradesvc.stream.progress import StreamProgress
from gradesvc.testing import MemoryBroker
from svckit.metrics import new_registry, sample_value
from tests.conftest import LoggedErrors
from tests.unit.fired import fired

NOW = 1_800_000_000.0


class FakeChannel:
    is_open = True

    def __init__(self) -> None:
        self.acks: List[tuple] = []
        self.queue = ClosableDeferredQueue()
        self.consumed: List[dict] = []
        """The arguments of each ``basic_consume``."""

    async def basic_qos(self, prefetch_count: int) -> None:
        pass

    async def basic_consume(self, queue: str, auto_ack: bool, arguments: dict) -> tuple:
        self.consumed.append(arguments)
        return self.queue, "ctag"

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.acks.append((delivery_tag, multiple))

    def close(self) -> None:
        self.is_open = False


class Harness:
    def __init__(self, ready: bool = True, first_offset: Optional[int] = 0) -> None:
        self.clock = task.Clock()
        self.store = GradeStore()
        self.status = ReplicaStatus(phase=Phase.READY if ready else Phase.CATCHING_UP, connected=True)
        self.registry = new_registry()
        self.broker = MemoryBroker()
        self.progress = StreamProgress(self.status, self.clock)
        self.consumer = StreamConsumer(
            self.store, "me", self.broker, self.status, self.progress, self.registry,  # type: ignore[arg-type]
            wall=lambda: NOW, clock=self.clock,
        )
        self.stream_first = first_offset
        self.probes = 0

        async def first(connection: Any) -> Optional[int]:
            self.probes += 1
            return self.stream_first

        self.consumer.start.first_offset = first  # type: ignore[method-assign]
        self.channel = FakeChannel()
        self.queue = self.channel.queue
        self.tag = 0

    def start(self) -> defer.Deferred[None]:
        subscription = AmqpSubscription(self.channel, self.queue, 0)
        return self.consumer.consume("conn", subscription)  # type: ignore[arg-type]

    def deliver(self, offset: int, user: str, patch: dict, replica: str = "other",
                millis_ago: int = 3, headers: Optional[dict] = None, write_id: str = "") -> WriteMessage:
        self.tag += 1
        message = WriteMessage(replica, write_id or f"w{self.tag}", int(NOW * 1000) - millis_ago, Write(user, patch))
        props = pika.BasicProperties(type="write", headers={"x-stream-offset": offset} if headers is None else headers)
        self.queue.put(ReceivedMessage(None, Basic.Deliver(delivery_tag=self.tag), props, message.encode()))
        return message

    def metric(self, name: str, **labels: str) -> float:
        return sample_value(self.registry, name, labels)


def test_one_ack_per_batch_of_deliveries() -> None:
    h = Harness()
    h.start()
    h.deliver(0, "a", {"spp": 1})  # wakes the waiting consumer: a batch of one
    h.deliver(1, "b", {"spp": 2})  # arrive while it waits a reactor turn
    h.deliver(2, "c", {"spp": 3})
    assert h.channel.acks == [(1, True)]
    assert "b" not in h.store
    h.clock.advance(0)
    assert h.channel.acks == [(1, True), (3, True)]
    assert [h.store.values(u)[1] for u in "abc"] == [1, 2, 3]
    assert h.status.applied_offset == 2
    assert h.queue.pending == []


def test_idle_consumer_wakes_on_the_next_delivery() -> None:
    h = Harness()
    h.start()
    h.clock.advance(0)
    h.clock.advance(1)
    assert h.channel.acks == []
    h.deliver(0, "a", {"spp": 1})
    assert h.store.values("a") == (0, 1, 0, 0)


def test_the_later_message_in_the_stream_wins_whatever_its_clock() -> None:
    h = Harness()
    h.start()
    h.deliver(0, "u", {"spp": 1, "return_fee": 5}, replica="a", millis_ago=0)
    h.clock.advance(0)
    h.deliver(1, "u", {"spp": 2}, replica="b", millis_ago=500_000)  # b's clock is far behind
    h.clock.advance(0)
    assert h.store.values("u") == (0, 2, 0, 5)
    h.deliver(1, "u", {"spp": 99})  # a replay changes nothing
    assert h.store.values("u") == (0, 2, 0, 5)
    assert h.metric("gradesvc_stream_messages_skipped_total", reason="duplicate") == 1


def test_delivery_without_offset_is_skipped() -> None:
    h = Harness()
    h.start()
    h.deliver(0, "a", {"spp": 1}, headers={})
    assert "a" not in h.store and h.status.applied_offset == -1


def test_a_jump_over_offsets_the_stream_still_holds_is_no_gap() -> None:
    h = Harness(first_offset=0)
    h.status.applied_offset = 4
    h.start()
    h.deliver(9, "a", {"spp": 1})  # 5..8 carried no message (a segment start, say)
    assert h.probes == 1 and h.status.phase is Phase.READY and h.status.gap is None
    assert h.store.values("a") == (0, 1, 0, 0) and h.status.applied_offset == 9
    h.clock.advance(0)
    h.deliver(10, "b", {"spp": 1})
    assert h.probes == 1  # consecutive offsets need no check
    assert h.metric("gradesvc_stream_offset_jumps_total", verdict="empty") == 1


def test_a_gap_while_connected_rebootstraps_from_a_peer(logged_errors: LoggedErrors) -> None:
    h = Harness(first_offset=100)
    asked: List[int] = []

    async def rebootstrap(needed: int) -> Optional[Anchor]:
        asked.append(needed)
        return Anchor(150, "34" * 32)

    h.consumer.rebootstrap = rebootstrap
    h.status.applied_offset = 4
    h.start()
    h.deliver(5, "a", {"spp": 1})
    h.clock.advance(0)
    h.deliver(120, "b", {"spp": 1})  # later, while connected: 6..99 were dropped
    assert asked == [99]
    assert "b" not in h.store and not h.channel.is_open
    assert h.status.applied_offset == 150 and h.broker.reconnects == [("conn", 0.0)]
    assert h.metric("gradesvc_rebootstraps_total") == 1
    assert h.metric("gradesvc_stream_offset_jumps_total", verdict="gap") == 1
    assert len(logged_errors.flush()) == 1  # the gap is logged as an error


def test_a_gap_no_peer_can_fill_is_retention_gap(logged_errors: LoggedErrors) -> None:
    h = Harness(first_offset=9)
    h.status.applied_offset = 4
    h.start()
    h.deliver(9, "a", {"spp": 1})
    assert h.status.phase is Phase.RETENTION_GAP and not h.status.ready
    assert h.status.gap == {"wanted_offset": 5, "first_available_offset": 9}
    assert "a" not in h.store
    assert [e["log_level"].name for e in logged_errors.flush()] == ["error", "critical"]


def test_own_writes_and_offsets_wake_those_waiting() -> None:
    h = Harness()
    message_id = "me:w-own"
    applied = h.progress.expect_write(message_id)
    reached = defer.ensureDeferred(h.progress.reached(1, timeout=2))
    late = defer.ensureDeferred(h.progress.reached(5, timeout=2))
    h.start()
    h.deliver(0, "x", {"spp": 1})
    assert not reached.called
    h.clock.advance(0)
    h.deliver(1, "mine", {"spp": 7}, replica="me", write_id="w-own")
    assert fired(applied) == 1 and fired(reached) is True
    assert not late.called
    h.clock.advance(2)
    assert fired(late) is False and h.progress.waiting == 0


def test_lag_is_observed_for_other_replicas_writes_once_ready() -> None:
    h = Harness(ready=False)
    h.start()
    h.deliver(0, "old", {"spp": 1}, millis_ago=60_000)  # replay while catching up: not counted
    h.clock.advance(0)
    h.status.reached_ready()
    h.deliver(1, "mine", {"spp": 1}, replica="me")  # own: not replication lag
    h.clock.advance(0)
    h.deliver(2, "live", {"spp": 1}, millis_ago=3)
    assert h.metric("gradesvc_replication_delay_seconds_count") == 1
    assert h.metric("gradesvc_replication_delay_seconds_bucket", le="0.004") == 1
    assert h.metric("gradesvc_replication_delay_seconds_bucket", le="0.002") == 0
    assert h.status.lag_seconds == pytest.approx(0.003, abs=1e-4)


class FakeConnection:
    """A broker connection whose one channel is the harness's."""

    def __init__(self, channel: FakeChannel) -> None:
        self._channel = channel

    async def channel(self) -> FakeChannel:
        return self._channel


def fake_link(channel: FakeChannel) -> AmqpLink:
    """The AMQP link over a :class:`FakeConnection`."""
    return AmqpLink(FakeConnection(channel), "grades")  # type: ignore[arg-type]


def test_own_marker_makes_the_replica_ready() -> None:
    h = Harness(ready=False)
    h.consumer.snapshot_loaded.callback(None)
    subscribed = defer.ensureDeferred(h.consumer.subscribe(fake_link(h.channel)))
    assert subscribed.called and h.channel.consumed == [{"x-stream-offset": 0}]
    [nonce] = h.broker.markers
    props = pika.BasicProperties(type=MARKER_TYPE, headers={"x-stream-offset": 0})
    h.queue.put(ReceivedMessage(None, Basic.Deliver(delivery_tag=1), props, b'{"marker": "other"}'))
    assert h.status.phase is Phase.CATCHING_UP
    h.clock.advance(0)
    props = pika.BasicProperties(type=MARKER_TYPE, headers={"x-stream-offset": 1})
    body = b'{"marker": "%s"}' % nonce.encode()
    h.queue.put(ReceivedMessage(None, Basic.Deliver(delivery_tag=2), props, body))
    assert h.status.phase is Phase.READY and h.status.applied_offset == 1


def test_stops_quietly_when_the_queue_closes() -> None:
    h = Harness()
    d = h.start()
    h.queue.close(pika.exceptions.ChannelClosed(200, "bye"))
    assert d.called


def test_a_failing_consumer_is_logged_leaves_ready_and_resubscribes(
        logged_errors: LoggedErrors, monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    h.start()

    def broken(*args: Any) -> int:
        raise RuntimeError("bug in apply")

    monkeypatch.setattr(h.store, "apply_patch", broken)
    h.deliver(0, "a", {"spp": 1})
    assert [e["log_failure"].value.args for e in logged_errors.flush(RuntimeError)] == [("bug in apply",)]
    assert h.status.phase is Phase.CATCHING_UP and not h.status.ready
    assert h.status.consumer_failures == 1 and h.status.applied_offset == -1  # not skipped
    assert h.broker.reconnects == [("conn", 0.5)]
    h.queue = ClosableDeferredQueue()
    h.start()
    h.deliver(0, "a", {"spp": 1})
    logged_errors.flush(RuntimeError)
    assert h.broker.reconnects[-1] == ("conn", 1.0)  # backing off
