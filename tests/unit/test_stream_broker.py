"""gradesvc on the stream protocol, in memory: the real StreamClient against txrabbitstream's memory broker.

Publishing in batches (one sub-entry per reactor turn, confirmed once), deduplication across a reconnect,
a refused or unconfirmed batch, a stream deleted under writes, subscriptions read a chunk at a time from an
offset, and what ``auto`` chooses.
"""

from __future__ import annotations

import json
from typing import Any, List

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import MemoryReactorClock

from gradesvc.state.phase import ReplicaStatus
from gradesvc.stream.link import BrokerUnavailable, Outgoing, StreamDeleted, SubscriptionEnded
from gradesvc.stream.streamprotocol import StreamBroker, delivery, encode
from tests.conftest import LoggedErrors
from tests.unit.fired import fired
from txrabbitstream import amqp10
from txrabbitstream.testing import MemoryEndpoint, MemoryStreamBroker

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def write(n: int) -> Outgoing:
    return Outgoing("write", json.dumps({"n": n}).encode(), "r1", f"r1:w{n}", 1)


class World:
    def __init__(self) -> None:
        self.clock = task.Clock()
        self.memory = MemoryStreamBroker()
        self.endpoint = MemoryEndpoint(self.memory)
        self.status = ReplicaStatus()
        self.broker = StreamBroker(MemoryReactorClock(), URL, "grades", self.status, "r1", clock=self.clock,  # type: ignore[arg-type]
                                   node_endpoints=[self.endpoint])
        self.links: List[Any] = []

        async def hook(link: Any) -> None:
            self.links.append(link)

        self.broker.on_connect.append(hook)

    def start(self) -> World:
        self.broker.startService()
        self.settle()
        assert self.status.connected
        return self

    def settle(self) -> None:
        for _ in range(5):
            self.endpoint.flush()
            self.clock.advance(0)

    @property
    def records(self) -> List[bytes]:
        return self.memory.streams["grades"].records


def test_writes_of_one_turn_go_out_as_one_sub_entry_confirmed_once() -> None:
    w = World().start()
    acks = [defer.ensureDeferred(w.broker.publish(write(n))) for n in range(5)]  # one reactor turn
    assert not any(a.called for a in acks)
    w.settle()
    assert all(fired(a) is None for a in acks)
    [chunk] = w.memory.streams["grades"].chunks
    assert len(chunk[1]) == 1 and [json.loads(delivery(0, r)[2]) for r in chunk[1][0]] == [{"n": n} for n in range(5)]
    late = defer.ensureDeferred(w.broker.publish(write(5)))  # the next turn: its own entry
    w.settle()
    assert fired(late) is None and len(w.memory.streams["grades"].chunks) == 2
    assert w.memory.sequences[("grades", w.broker.reference)] == 2  # two publishing ids


def test_a_reconnect_sends_the_unconfirmed_again_and_the_broker_drops_what_it_has() -> None:
    w = World().start()
    w.memory.hold_confirms = True  # stored, never confirmed: the confirm is lost with the connection
    waiting = defer.ensureDeferred(w.broker.publish(write(1)))
    w.settle()
    assert len(w.records) == 1 and not waiting.called
    w.memory.hold_confirms = False
    w.broker.drop_connection()
    w.settle()
    w.clock.advance(2)  # ClientService's retry
    w.settle()
    assert w.status.connected and fired(waiting) is None
    assert len(w.records) == 1  # sent again, dropped as a duplicate, confirmed


def test_two_processes_never_share_a_publisher_reference() -> None:
    one, two = World(), World()
    assert one.broker.reference != two.broker.reference
    assert one.broker.reference.startswith("gradesvc-r1-")


def test_an_unconfirmed_batch_fails_after_the_timeout_and_drops_the_connection(logged_errors: LoggedErrors) -> None:
    w = World().start()
    w.memory.hold_confirms = True
    waiting = defer.ensureDeferred(w.broker.publish(write(1)))
    w.settle()
    w.clock.advance(10)
    assert isinstance(waiting.result.value, BrokerUnavailable) and "within 10s" in str(waiting.result.value)
    waiting.addErrback(lambda _: None)
    w.settle()
    assert not w.status.connected or len(w.memory.connections) == 2
    logged_errors.flush()


def test_publishing_while_disconnected_is_refused_at_once() -> None:
    w = World()
    refused = defer.ensureDeferred(w.broker.publish(write(1)))
    assert isinstance(refused.result.value, BrokerUnavailable)
    refused.addErrback(lambda _: None)


def test_a_stream_deleted_under_writes_fails_them_as_not_written(logged_errors: LoggedErrors) -> None:
    w = World().start()
    recreated: List[bool] = []
    w.broker.on_stream_recreated.append(lambda: recreated.append(True))
    w.memory.hold_confirms = True
    waiting = defer.ensureDeferred(w.broker.publish(write(1)))
    w.settle()
    w.memory.delete("grades")  # MetadataUpdate: the link ends, the replica reconnects and declares it again
    w.memory.hold_confirms = False
    w.settle()
    for _ in range(3):  # the reconnect after 0.5 s, then ClientService's retry
        w.clock.advance(1)
        w.settle()
    assert w.status.connected and recreated == [True]
    assert isinstance(waiting.result.value, StreamDeleted)
    waiting.addErrback(lambda _: None)
    assert w.records == []  # nothing of the old life was sent to the new one
    logged_errors.flush()


def test_a_subscription_reads_chunks_from_an_offset_and_skips_what_is_before_it() -> None:
    w = World().start()
    for batch in ([0, 1, 2], [3], [4, 5]):
        for n in batch:
            w.broker.publish(write(n))
        w.settle()
    link = w.links[0]
    subscribed = defer.ensureDeferred(link.subscribe(1, 10))
    w.settle()
    subscription = fired(subscribed)
    first = fired(subscription.next_batch())
    assert [offset for offset, _, _ in first] == [1, 2]  # the chunk began at 0: offset 0 is not handed out
    assert [(o, k, json.loads(b)) for o, k, b in first] == [(1, "write", {"n": 1}), (2, "write", {"n": 2})]
    subscription.done(first)
    w.settle()
    assert [o for o, _, _ in fired(subscription.next_batch())] == [3]
    assert [o for o, _, _ in fired(subscription.next_batch())] == [4, 5]
    pending = subscription.next_batch()
    w.broker.drop_connection()
    w.settle()
    assert isinstance(pending.result.value, SubscriptionEnded)
    pending.addErrback(lambda _: None)


def test_a_closed_subscriptions_id_is_not_reused_before_the_broker_confirms_its_end() -> None:
    w = World().start()
    link = w.links[0]
    subscribing = defer.ensureDeferred(link.subscribe("last", 1))
    w.settle()
    first = fired(subscribing)
    first.close()
    second = defer.ensureDeferred(link.subscribe(0, 1))  # before the unsubscribe's answer
    w.settle()
    assert fired(second).subscription_id != first.subscription_id


def test_records_of_other_publishers_are_read_by_their_kind() -> None:
    stored_by_091 = b"\x00\x53\x73\xc0\x04\x01\xa1\x01m" + amqp10.encode(b"{}", {"x-basic-type": "write", "x": "y"})
    assert delivery(7, stored_by_091) == (7, "write", b"{}")
    assert delivery(8, amqp10.encode(b"raw")) == (8, None, b"raw")
    big = encode(Outgoing("write-batch", b"x" * 300, "r", "r:1"))
    assert delivery(9, big) == (9, "write-batch", b"x" * 300)


@pytest.mark.parametrize("url, stream_answers, amqp_answers, chosen, asked", [
    (URL, True, True, "stream", [5552]),
    (URL, False, True, "amqp", [5552, 5672]),
    (URL.replace(":5672/", ":5673/"), True, True, "amqp", []),  # no stream port can be known: never guessed
    (URL.replace(":5672/", ":5673/") + "?stream_port=5553", True, True, "stream", [5553]),
])
def test_auto_uses_the_stream_protocol_when_its_port_answers(url: str, stream_answers: bool, amqp_answers: bool,
                                                           chosen: str, asked: List[int],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from gradesvc.stream import choice

    probed: List[int] = []

    async def answers(reactor: Any, endpoint: Any, clock: Any) -> bool:
        probed.append(endpoint._port)
        return stream_answers if endpoint._port in (5552, 5553) else amqp_answers

    monkeypatch.setattr(choice, "answers", answers)
    status = ReplicaStatus()
    auto = choice.make_broker("auto", MemoryReactorClock(), url, "grades", status, "r1", task.Clock())
    assert status.stream_protocol == "auto"
    auto.startService()
    assert status.stream_protocol == chosen and auto.chosen.protocol == chosen
    assert probed == asked
    auto.stopService()


@pytest.mark.parametrize("url, stream_port, pika_url, verified_name", [
    ("amqp://u:p@h/%2F", 5552, "amqp://u:p@h/%2F", None),
    ("amqps://u:p@h/%2F", 5551, "amqp://u:p@h:5671/%2F", "h"),
    ("amqps://u:p@h:5671/%2F?cacertfile=/ca.pem&heartbeat=10", 5551, "amqp://u:p@h:5671/%2F?heartbeat=10", "h"),
    ("amqps://u:p@10.0.0.1:6671/v?stream_port=6551&server_name_indication=broker.example&certfile=c&keyfile=k",
     6551, "amqp://u:p@10.0.0.1:6671/v", "broker.example"),
    ("amqps://u:p@h:6671/v", None, "amqp://u:p@h:6671/v", "h"),
])
def test_an_amqps_node_is_reached_over_tls_on_its_tls_ports(url: str, stream_port: Any, pika_url: str,
                                                           verified_name: Any) -> None:
    from gradesvc.stream.broker import amqp_only, node_tls, stream_port_of

    assert stream_port_of(url) == stream_port
    assert amqp_only(url) == pika_url  # pika sees AMQP: TLS is the transport's, below it
    tls = node_tls(url)
    assert (tls[1] if tls else None) == verified_name
