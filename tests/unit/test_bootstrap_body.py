"""The snapshot body reader of bootstrap: idle timeout and feed errors close the connection."""

from __future__ import annotations

from typing import List, Optional

import pytest
from twisted.internet import defer, error, task
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from gradesvc.state.bootstrap import BootstrapService
from gradesvc.state.identity import Anchor
from gradesvc.state.phase import ReplicaStatus
from gradesvc.state.snapshotbody import ForeignSnapshot, PeerStalled, SnapshotBody
from gradesvc.state.store import GradeStore
from tests.unit.fired import fired


class FakeTransport:
    stopped = paused = resumed = 0

    def stopProducing(self) -> None:
        self.stopped += 1

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1


def make(feed=lambda data: None) -> tuple:  # type: ignore[no-untyped-def]
    clock, done, transport = task.Clock(), defer.Deferred(), FakeTransport()
    body = SnapshotBody(feed, done, clock, idle_timeout=5)
    body.makeConnection(transport)
    return clock, done, transport, body


def outcome(done: defer.Deferred[None]) -> List[object]:
    out: List[object] = []
    done.addBoth(out.append)
    return out


def test_data_keeps_it_alive_and_silence_gives_up() -> None:
    seen: List[bytes] = []
    clock, done, transport, body = make(seen.append)
    for _ in range(3):
        clock.advance(4)
        body.dataReceived(b"x")
    assert transport.stopped == 0
    clock.advance(5)
    assert transport.stopped == 1
    body.dataReceived(b"late")
    body.connectionLost(Failure(error.ConnectionLost()))
    result = outcome(done)[0]
    assert isinstance(result, Failure) and result.check(PeerStalled)
    assert seen == [b"x"] * 3


def test_feed_error_closes_and_is_reported() -> None:
    def feed(data: bytes) -> None:
        raise ValueError("garbage")

    clock, done, transport, body = make(feed)
    body.dataReceived(b"x")
    assert transport.stopped == 1
    body.connectionLost(Failure(error.ConnectionLost()))
    assert outcome(done)[0].check(ValueError)  # type: ignore[union-attr]
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize("reason, ok", [(ResponseDone(), True), (error.ConnectionLost(), False)])
def test_end_of_body(reason: Exception, ok: bool) -> None:
    clock, done, transport, body = make()
    body.connectionLost(Failure(reason))
    result = outcome(done)[0]
    assert (result is None) == ok
    assert not clock.getDelayedCalls() and transport.stopped == 0


DIGEST = "12" * 32


def checking_feed(check: defer.Deferred[None]) -> tuple:  # type: ignore[no-untyped-def]
    """A feed that asks for a check on its first chunk (the snapshot's head)."""
    seen: List[bytes] = []

    def feed(data: bytes) -> Optional[defer.Deferred[None]]:
        seen.append(data)
        return check if len(seen) == 1 else None

    return feed, seen


def test_a_check_of_the_head_pauses_the_body_and_its_idle_timer() -> None:
    check: defer.Deferred[None] = defer.Deferred()
    feed, seen = checking_feed(check)
    clock, done, transport, body = make(feed)
    body.dataReceived(b"head")
    assert transport.paused == 1 and not clock.getDelayedCalls()
    clock.advance(60)  # the broker is slow to answer: not the peer's stall
    assert transport.stopped == 0
    check.callback(None)
    assert transport.resumed == 1 and len(clock.getDelayedCalls()) == 1
    body.dataReceived(b"rows")
    body.connectionLost(Failure(ResponseDone()))
    assert outcome(done) == [None] and seen == [b"head", b"rows"]


@pytest.mark.parametrize("passes", [True, False])
def test_a_body_that_ends_while_its_head_is_checked_waits_for_the_verdict(passes: bool) -> None:
    check: defer.Deferred[None] = defer.Deferred()
    feed, _ = checking_feed(check)
    clock, done, transport, body = make(feed)
    body.dataReceived(b"the whole small snapshot")
    body.connectionLost(Failure(ResponseDone()))
    result = outcome(done)
    assert result == []  # not over until the head is judged
    if passes:
        check.callback(None)
        assert result == [None]
    else:
        check.errback(ForeignSnapshot("another stream"))
        assert isinstance(result[0], Failure) and result[0].check(ForeignSnapshot)
    assert not clock.getDelayedCalls()


def test_a_refused_head_closes_the_connection() -> None:
    check: defer.Deferred[None] = defer.Deferred()
    feed, _ = checking_feed(check)
    clock, done, transport, body = make(feed)
    body.dataReceived(b"head")
    check.errback(ForeignSnapshot("another stream"))
    assert transport.stopped == 1
    body.connectionLost(Failure(error.ConnectionLost()))
    result = outcome(done)[0]
    assert isinstance(result, Failure) and result.check(ForeignSnapshot)


class StubBootstrap:
    """Just what BootstrapService asks of a Bootstrap."""

    def __init__(self, furthest: int, users: int) -> None:
        self.store = GradeStore()
        self.store.load_lines([f"{i},0,1,0,0,-1,{i},-1,-1" for i in range(users)])
        self.status = ReplicaStatus()
        self.peers = ["http://peer"]
        self.furthest = furthest
        self.loads: List[int] = []

    async def furthest_peer(self) -> int:
        return self.furthest

    async def load(self, needed: int) -> Optional[Anchor]:
        self.loads.append(needed)
        return Anchor(self.furthest, DIGEST)

    async def run(self) -> Optional[Anchor]:
        raise AssertionError("the checkpoint was usable")


@pytest.mark.parametrize("furthest, users, loads", [
    (1_000 + 10_000, 0, []),  # not worth a snapshot: replaying is quicker
    (1_000 + 10_001, 0, [1_001]),
    (1_000 + 20_000, 320_000, []),  # 320,000 users: worth it past 20,000 offsets
    (1_000 + 20_001, 320_000, [1_001]),
])
def test_a_peer_snapshot_after_the_checkpoint_only_when_much_further_ahead(
        furthest: int, users: int, loads: List[int]) -> None:
    stub = StubBootstrap(furthest, users)

    async def checkpoint() -> Optional[Anchor]:
        return Anchor(1_000, DIGEST)

    loaded: defer.Deferred[Optional[Anchor]] = defer.Deferred()
    service = BootstrapService(stub, loaded, checkpoint)  # type: ignore[arg-type]
    service.startService()
    assert fired(loaded) == Anchor(furthest if loads else 1_000, DIGEST)
    assert stub.loads == loads
