"""StreamConsumer in memory: batching and acks, offsets, gaps, own messages, lag."""

from __future__ import annotations

from typing import Any, List, Optional

import pika
import pytest
from pika.adapters.twisted_connection import ClosableDeferredQueue, ReceivedMessage
from pika.spec import Basic
from twisted.internet import defer, task

from gradesvc.hlc import LOGICAL_BITS, HybridLogicalClock
from gradesvc.messages import Write, WriteMessage
from gradesvc.replication import StreamConsumer, write_properties
from gradesvc.status import READY, RETENTION_GAP, ReplicaStatus
from gradesvc.storage import GradeStore
from svckit.metrics import Registry

NOW = 1_800_000_000.0


class FakeBroker:
    stream = "grades"

    def __init__(self) -> None:
        self.on_connect: List[Any] = []


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
        self.status = ReplicaStatus(phase=READY if ready else "catching_up", connected=True)
        self.status.ever_ready = ready
        self.registry = Registry()
        self.consumer = StreamConsumer(
            self.store, HybridLogicalClock(lambda: NOW), "me", FakeBroker(),  # type: ignore[arg-type]
            self.status, self.registry, seconds=lambda: NOW, clock=self.clock,
        )
        self.channel = FakeChannel()
        self.queue = ClosableDeferredQueue()
        self.tag = 0

    def start(self, offset: int = 0) -> "defer.Deferred[None]":
        return defer.ensureDeferred(self.consumer._consume(self.channel, self.queue, offset))

    def deliver(self, offset: int, user: str, patch: dict, replica: str = "other",
                millis_ago: int = 3, headers: Optional[dict] = None) -> None:
        self.tag += 1
        stamp = (int(NOW * 1000) - millis_ago) << LOGICAL_BITS
        message = WriteMessage(replica, stamp, Write(user, patch))
        props = write_properties(message)
        props.headers = {"x-stream-offset": offset} if headers is None else headers
        self.queue.put(ReceivedMessage(None, Basic.Deliver(delivery_tag=self.tag), props, message.encode()))

    def metric(self, line_start: str) -> str:
        return next(line for line in self.registry.render().decode().splitlines() if line.startswith(line_start))


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
    assert 'reason="duplicate"} 1' in h.registry.render().decode()


def test_delivery_without_offset_is_skipped() -> None:
    h = Harness()
    h.start(0)
    h.deliver(0, "a", {"spp": 1}, headers={})
    assert "a" not in h.store and h.status.applied_offset == -1


def test_first_delivery_past_the_asked_offset_is_a_retention_gap() -> None:
    h = Harness()
    h.status.applied_offset = 4
    h.start(5)
    h.deliver(9, "a", {"spp": 1})
    assert h.status.phase == RETENTION_GAP
    assert h.status.gap == {"wanted_offset": 5, "first_available_offset": 9}
    assert not h.status.ready
    h.clock.advance(0)
    h.deliver(10, "b", {"spp": 1})
    assert h.status.gap == {"wanted_offset": 5, "first_available_offset": 9}


def test_the_asked_offset_is_no_gap() -> None:
    h = Harness()
    h.status.applied_offset = 4
    h.start(5)
    h.deliver(5, "a", {"spp": 1})
    assert h.status.phase == READY and h.status.gap is None


def test_own_messages_are_skipped_only_when_already_applied() -> None:
    h = Harness()
    h.start(0)
    h.deliver(0, "lost-confirm", {"spp": 5}, replica="me")
    assert h.store.values("lost-confirm") == (0, 5, 0, 0)
    h.clock.advance(0)
    stamp = (int(NOW * 1000) - 3) << LOGICAL_BITS
    h.store.apply_patch("known", {"spp": 6}, stamp, "me")
    h.deliver(1, "known", {"spp": 6}, replica="me")
    assert 'reason="own"} 1' in h.registry.render().decode()


def test_lag_is_observed_for_other_replicas_writes_once_ready() -> None:
    h = Harness(ready=False)
    h.start(0)
    h.deliver(0, "old", {"spp": 1}, millis_ago=60_000)  # replay while catching up: not counted
    h.clock.advance(0)
    h.status.reached_ready()
    h.deliver(1, "mine", {"spp": 1}, replica="me")  # own: not replication lag
    h.clock.advance(0)
    h.deliver(2, "live", {"spp": 1}, millis_ago=3)
    assert h.metric("gradesvc_replication_delay_seconds_count") == "gradesvc_replication_delay_seconds_count 1"
    assert h.metric('gradesvc_replication_delay_seconds_bucket{le="0.004"}').endswith(" 1")
    assert h.metric('gradesvc_replication_delay_seconds_bucket{le="0.002"}').endswith(" 0")
    assert h.status.lag_seconds == pytest.approx(0.003, abs=1e-4)


def test_stops_quietly_when_the_queue_closes() -> None:
    h = Harness()
    d = h.start(0)
    h.queue.close(pika.exceptions.ChannelClosed(200, "bye"))
    assert d.called
