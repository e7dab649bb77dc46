"""StreamConsumer in memory: batching and acks, offsets, gaps, own messages, lag."""

from __future__ import annotations

from typing import Any, List, Optional

import pika
import pytest
from pika.adapters.twisted_connection import ClosableDeferredQueue, ReceivedMessage
from pika.spec import Basic
from twisted.internet import defer, task

from gradesvc.hlc import LOGICAL_BITS, HybridLogicalClock
from gradesvc.messages import Write, WriteMessage, write_properties
from gradesvc.replication import StreamConsumer
from gradesvc.status import Phase, ReplicaStatus
from gradesvc.storage import GradeStore
from svckit.metrics import new_registry, sample_value
from tests.conftest import LoggedErrors

NOW = 1_800_000_000.0


class FakeBroker:
    stream = "grades"

    def __init__(self) -> None:
        self.on_connect: List[Any] = []
        self.reconnects: List[Any] = []

    def reconnect_later(self, connection: Any, delay: float) -> None:
        self.reconnects.append((connection, delay))


class FakeChannel:
    is_open = True

    def __init__(self) -> None:
        self.acks: List[tuple] = []

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.acks.append((delivery_tag, multiple))


class Harness:
    def __init__(self, ready: bool = True) -> None:
        self.clock = task.Clock()
        self.store = GradeStore()
        self.status = ReplicaStatus(phase=Phase.READY if ready else Phase.CATCHING_UP, connected=True,
                                    ever_ready=ready)
        self.registry = new_registry()
        self.broker = FakeBroker()
        self.consumer = StreamConsumer(
            self.store, HybridLogicalClock(lambda: NOW), "me", self.broker,  # type: ignore[arg-type]
            self.status, self.registry, wall=lambda: NOW, clock=self.clock,
        )
        self.channel = FakeChannel()
        self.queue = ClosableDeferredQueue()
        self.tag = 0

    def start(self, offset: int = 0) -> defer.Deferred[None]:
        return defer.ensureDeferred(self.consumer._consume(self.channel, self.queue, offset))

    def deliver(self, offset: int, user: str, patch: dict, replica: str = "other",
                millis_ago: int = 3, headers: Optional[dict] = None) -> None:
        self.tag += 1
        stamp = (int(NOW * 1000) - millis_ago) << LOGICAL_BITS
        message = WriteMessage(replica, stamp, Write(user, patch))
        props = write_properties(message, NOW)
        props.headers = {"x-stream-offset": offset} if headers is None else headers
        self.queue.put(ReceivedMessage(None, Basic.Deliver(delivery_tag=self.tag), props, message.encode()))

    def metric(self, name: str, **labels: str) -> float:
        return sample_value(self.registry, name, labels)


def test_one_ack_per_batch_of_deliveries() -> None:
    h = Harness()
    h.start(0)
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
    h.start(0)
    h.clock.advance(0)
    h.clock.advance(1)
    assert h.channel.acks == []
    h.deliver(0, "a", {"spp": 1})
    assert h.store.values("a") == (0, 1, 0, 0)


def test_replayed_offsets_change_nothing() -> None:
    h = Harness()
    h.start(0)
    h.deliver(0, "a", {"spp": 1})
    h.clock.advance(0)
    h.deliver(0, "a", {"spp": 99})
    assert h.store.values("a") == (0, 1, 0, 0)
    assert h.metric("gradesvc_stream_messages_skipped_total", reason="duplicate") == 1


def test_delivery_without_offset_is_skipped() -> None:
    h = Harness()
    h.start(0)
    h.deliver(0, "a", {"spp": 1}, headers={})
    assert "a" not in h.store and h.status.applied_offset == -1


def test_first_delivery_past_the_asked_offset_is_a_retention_gap(logged_errors: LoggedErrors) -> None:
    h = Harness()
    h.status.applied_offset = 4
    h.start(5)
    h.deliver(9, "a", {"spp": 1})
    assert h.status.phase is Phase.RETENTION_GAP
    assert h.status.gap == {"wanted_offset": 5, "first_available_offset": 9}
    assert not h.status.ready
    assert ["Retention gap" in e["log_format"] for e in logged_errors.flush()] == [True]
    h.clock.advance(0)
    h.deliver(10, "b", {"spp": 1})
    assert h.status.gap == {"wanted_offset": 5, "first_available_offset": 9}


def test_the_asked_offset_is_no_gap() -> None:
    h = Harness()
    h.status.applied_offset = 4
    h.start(5)
    h.deliver(5, "a", {"spp": 1})
    assert h.status.phase is Phase.READY and h.status.gap is None


def test_own_messages_are_skipped_only_when_already_applied() -> None:
    h = Harness()
    h.start(0)
    h.deliver(0, "lost-confirm", {"spp": 5}, replica="me")
    assert h.store.values("lost-confirm") == (0, 5, 0, 0)
    h.clock.advance(0)
    stamp = (int(NOW * 1000) - 3) << LOGICAL_BITS
    h.store.apply_patch("known", {"spp": 6}, stamp, "me")
    h.deliver(1, "known", {"spp": 6}, replica="me")
    assert h.metric("gradesvc_stream_messages_skipped_total", reason="own") == 1


def test_lag_is_observed_for_other_replicas_writes_once_ready() -> None:
    h = Harness(ready=False)
    h.start(0)
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


def test_stops_quietly_when_the_queue_closes() -> None:
    h = Harness()
    d = h.start(0)
    h.queue.close(pika.exceptions.ChannelClosed(200, "bye"))
    assert d.called


def test_a_failing_consumer_is_logged_leaves_ready_and_resubscribes(
        logged_errors: LoggedErrors, monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    d = h.start(0)
    d.addErrback(h.consumer._consumer_failed, "the connection")

    def broken(*args: Any) -> int:
        raise RuntimeError("bug in apply")

    monkeypatch.setattr(h.store, "apply_patch", broken)
    h.deliver(0, "a", {"spp": 1})
    assert [e["log_failure"].value.args for e in logged_errors.flush(RuntimeError)] == [("bug in apply",)]
    assert h.status.phase is Phase.CATCHING_UP and not h.status.ready
    assert h.status.consumer_failures == 1
    assert h.broker.reconnects == [("the connection", 0.5)]
    d = h.start(0)
    d.addErrback(h.consumer._consumer_failed, "the connection")
    h.deliver(0, "a", {"spp": 1})
    logged_errors.flush(RuntimeError)
    assert h.broker.reconnects[-1] == ("the connection", 1.0)  # backing off
