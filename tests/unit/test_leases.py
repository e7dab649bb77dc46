"""Leased tokens in memory: a scripted Redis, the reactor's and the monotonic clock both injected.

What the lease script itself does runs against a real redis-server
(tests/integration/test_lease_script.py); here: what the store asks for and
when, how it spends a block, stops at its end, refuses locally, gives back,
and falls back.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import pytest
import txredisapi
from twisted.internet import defer
from twisted.internet.task import Clock

from lbsvc.limits.buckets import Buckets
from lbsvc.limits.leases import IDLE_AFTER, LEASE_LENGTH, Lease, LeasedBucketStore, block_size, margin
from lbsvc.limits.leasescript import EPOCH_KEY, GLOBAL_ARGS, KEY_PREFIX, USER_ARGS
from lbsvc.limits.redisbuckets import BucketStoreUnavailable
from svckit.metrics import new_registry, sample_value
from tests.unit.fired import fired


class FakeRedis:
    """Answers the lease script from a queue (or leaves it hanging); also its own link."""

    online = True
    epoch = "replid-1"
    previous_epoch = ""

    def __init__(self) -> None:
        self.calls: List[Tuple[List[str], List[str]]] = []
        self.answers: List[Any] = []
        self.pending: List[defer.Deferred[Any]] = []
        self.deleted: List[str] = []

    def current(self) -> Optional[FakeRedis]:
        return self if self.online else None

    def connected(self) -> defer.Deferred[Any]:
        """The link's first connection, made when the test fires it."""
        self.connecting: defer.Deferred[Any] = defer.Deferred()
        return self.connecting

    def evalsha(self, sha: str, keys: List[str], args: List[str]) -> defer.Deferred[Any]:
        self.calls.append((keys, args))
        if not self.answers:
            d: defer.Deferred[Any] = defer.Deferred()
            self.pending.append(d)
            return d
        answer = self.answers.pop(0)
        return defer.fail(answer) if isinstance(answer, Exception) else defer.succeed(answer)

    def delete(self, key: str) -> defer.Deferred[Any]:
        self.deleted.append(key)
        return defer.succeed(1)

    def users(self, call: int = -1) -> List[List[str]]:
        """The per-user arguments of a call: capacity, rate, want, lease, spent, keep, share, charge."""
        keys, args = self.calls[call]
        assert keys[0] == EPOCH_KEY and args[:3] == [self.epoch, self.previous_epoch, args[2]]
        per_user = args[GLOBAL_ARGS:]
        return [per_user[i:i + USER_ARGS] for i in range(0, len(per_user), USER_ARGS)]


class Monotonic:
    """A monotonic clock the test moves (the reactor's clock moves with it)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def __call__(self) -> float:
        return self.clock.seconds() + 5000.0  # a different origin: only intervals are used


def store(fallback: str = "local") -> Tuple[LeasedBucketStore, FakeRedis, Clock, Any]:
    clock = Clock()
    redis = FakeRedis()
    registry = new_registry()
    s = LeasedBucketStore("redis://127.0.0.1:6379/0", Buckets(clock), fallback, 0.05, clock, registry, redis,
                          monotonic=Monotonic(clock))
    return s, redis, clock, registry


def grant(granted: int, level: float, lease: str = "L1", kept: int = 0, lost: int = 0) -> List[Any]:
    return [granted, repr(level), lease, kept, lost]


def first_block(s: LeasedBucketStore, redis: FakeRedis, clock: Clock, name: str, answer: List[Any]) -> None:
    """A first request of ``name``, admitted on Redis's ``answer`` (a block granted)."""
    redis.answers = [answer]
    d = s.take(name, 100, 10.0)
    clock.advance(0)
    assert fired(d)[0] is True


def local_decisions(s: LeasedBucketStore, registry: Any) -> float:
    s.count_local()  # (the sweep does it every quarter second)
    return sample_value(registry, "lbsvc_bucket_decisions_total", {"path": "lease"})


def test_block_size_follows_the_recent_rate_within_the_share() -> None:
    lease = Lease("u", 100, 10.0, now=0.0)
    assert block_size(lease, 0.0, live=2) == 1  # nothing known yet
    lease.used = 200  # 200 admissions in one second: a quarter second's worth is 50
    assert block_size(lease, 1.0, live=2) == 50
    lease.used = 2000
    assert block_size(lease, 2.0, live=2) == 50  # (200 + 2000) / 2 a second, but the share is ceil(100 / 2)
    assert block_size(lease, 2.0, live=3) == 34
    lease = Lease("v", 1000, 10.0, now=0.0)
    lease.waiters = [defer.Deferred() for _ in range(7)]
    assert block_size(lease, 0.0, live=1) == 7  # at least the requests waiting


def test_a_block_is_spent_locally_and_the_next_asked_for_before_it_runs_out() -> None:
    s, redis, clock, registry = store()
    d = s.take("alice", 100, 10.0)
    assert isinstance(d, defer.Deferred)
    redis.answers = [grant(10, 89.0)]
    clock.advance(0)
    taken, bucket = fired(d)
    assert taken and bucket.level == 89.0 + 9
    assert redis.users() == [["100", "10.0", "1", "", "0", "0", "100", "0"]]
    for left in range(8, 4, -1):  # answered at once, without Redis
        verdict = s.take("alice", 100, 10.0)
        assert verdict == (True, verdict[1]) and verdict[1].level == 89.0 + left
    assert len(redis.calls) == 1 and local_decisions(s, registry) == 4
    assert s.take("alice", 100, 10.0)[0] is True  # 4 left, under half the block of... 1: no call yet
    clock.advance(0)
    assert len(redis.calls) == 1


def test_the_next_block_is_fetched_in_the_background() -> None:
    s, redis, clock, _ = store()
    first_block(s, redis, clock, "bob", grant(4, 50.0))
    s._leases["bob"].block = 4
    assert s.take("bob", 100, 10.0)[0] is True  # 2 left: not under half of 4
    clock.advance(0)
    assert len(redis.calls) == 1
    assert s.take("bob", 100, 10.0)[0] is True  # 1 left: the next block is asked for, this request is not held up
    redis.answers = [grant(3, 47.0, kept=1)]
    clock.advance(0)
    assert redis.users()[0][3:6] == ["L1", "3", "1"]  # same lease, 3 spent so far, 1 kept
    assert s._leases["bob"].unspent == 4


def test_a_lease_is_not_spent_past_its_end_by_this_process_clock() -> None:
    s, redis, clock, _ = store()
    first_block(s, redis, clock, "carol", grant(10, 0.0))
    clock.advance(LEASE_LENGTH - margin(LEASE_LENGTH) - 0.001)
    assert s.take("carol", 100, 10.0)[0] is True
    clock.advance(0.002)  # the end: asked + length - margin, by the monotonic clock
    d = s.take("carol", 100, 10.0)
    assert isinstance(d, defer.Deferred)
    redis.answers = [grant(5, 0.0)]
    clock.advance(0)
    assert redis.users()[0][3:6] == ["L1", "2", "0"]  # the 8 left are not kept: Redis gets them back
    assert fired(d)[0] is True


def test_an_empty_bucket_is_refused_locally_until_the_next_token_is_due() -> None:
    s, redis, clock, registry = store()
    redis.answers = [grant(0, 0.5, lease="")]
    d = s.take("dave", 100, 10.0)
    clock.advance(0)
    taken, bucket = fired(d)
    assert not taken and bucket.retry_after() == pytest.approx(0.05)
    verdict = s.take("dave", 100, 10.0)
    assert verdict[0] is False and len(redis.calls) == 1 and local_decisions(s, registry) == 1
    clock.advance(0.05)
    assert isinstance(s.take("dave", 100, 10.0), defer.Deferred)


def test_waiting_requests_beyond_a_full_grant_ask_again() -> None:
    s, redis, clock, _ = store()
    waiting = [s.take("erin", 100, 10.0) for _ in range(3)]
    redis.answers = [grant(3, 90.0)]
    clock.advance(0)
    assert redis.users()[0][2] == "3"  # one block for everyone waiting
    assert [fired(d)[0] for d in waiting] == [True, True, True]
    first = s.take("erin", 100, 10.0)
    clock.advance(0)  # asked for; before the answer, another request comes
    second = s.take("erin", 100, 10.0)
    redis.pending.pop().callback(grant(1, 89.0))
    assert fired(first)[0] is True and not second.called
    redis.answers = [grant(1, 88.0)]
    clock.advance(0)  # Redis granted all that was asked: the one still waiting is asked for, not refused
    assert fired(second)[0] is True and len(redis.calls) == 3
    both = [s.take("erin", 100, 10.0) for _ in range(2)]
    redis.answers = [grant(1, 0.2)]
    clock.advance(0)  # less than asked: the bucket is empty, the rest are refused
    assert [fired(d)[0] for d in both] == [True, False]


def test_idle_blocks_go_back_and_everything_goes_back_at_shutdown() -> None:
    s, redis, clock, _ = store()
    for name in ("f", "g"):
        redis.answers = [grant(10, 0.0)]
        d = s.take(name, 100, 10.0)
        clock.advance(0)
        assert fired(d)[0] is True
    clock.advance(IDLE_AFTER / 2)
    assert s.take("g", 100, 10.0)[0] is True
    clock.advance(IDLE_AFTER / 2)
    redis.answers = [grant(0, 9.0, lease="") + grant(5, 4.0, kept=8)]
    s.sweep()
    clock.advance(0)
    f, g = redis.users()
    assert f[2:6] == ["0", "L1", "1", "0"]  # f idle: its 1 spent reported, the other 9 back
    assert g[3:6] == ["L1", "2", "8"] and int(g[2]) > 0  # g in use, its lease half over: renewed
    assert s._leases["f"].lease_id == "" and s._leases["g"].unspent == 13
    redis.answers = [[0, "10", "", 0, 0]]
    fired(s.give_back())
    assert redis.users() == [["100", "10.0", "0", "L1", "2", "0", "100", "0"]]  # g: all 13 given back
    clock.advance(IDLE_AFTER)
    s.sweep()
    assert "f" not in s._leases and "g" not in s._leases  # nothing held, idle: forgotten


def test_without_an_answer_the_waiting_are_decided_by_the_fallback_and_blocks_held_stay() -> None:
    s, redis, clock, registry = store("deny")
    first_block(s, redis, clock, "h", grant(2, 0.0))
    assert s.take("h", 100, 10.0)[0] is True  # the last of the block: the next is asked for ...
    clock.advance(0)
    clock.advance(0.05)
    clock.advance(0)  # ... and not answered within the timeout
    assert not s.up
    with pytest.raises(BucketStoreUnavailable):
        fired(s.take("h", 100, 10.0))
    assert sample_value(registry, "lbsvc_bucket_decisions_total", {"path": "deny"}) == 1


def test_a_block_held_is_still_spent_while_redis_is_away() -> None:
    s, redis, clock, _ = store("deny")
    first_block(s, redis, clock, "i", grant(10, 0.0))
    redis.online = False
    assert all(s.take("i", 100, 10.0)[0] is True for _ in range(9))  # granted: the bound counts them


def test_a_lost_lease_is_counted_and_logged_once_per_call(caplog: Any) -> None:
    s, redis, clock, registry = store()
    redis.answers = [grant(10, 0.0)]
    d = s.take("j", 100, 10.0)
    clock.advance(0)
    fired(d)
    s._leases["j"].unspent = 0
    redis.answers = [grant(3, 0.0, lease="L2", lost=1)]
    d = s.take("j", 100, 10.0)
    clock.advance(0)
    assert fired(d)[0] is True and s._leases["j"].lease_id == "L2" and s._leases["j"].unspent == 2
    assert sample_value(registry, "lbsvc_bucket_leases_lost_total") == 1


def test_what_the_local_fallback_admitted_is_charged_first_when_redis_answers() -> None:
    s, redis, clock, _ = store("local")
    redis.answers = [txredisapi.ConnectionError("lost")]
    d = s.take("k", 10, 1.0)
    clock.advance(0)
    assert fired(d)[0] is False  # the share starts empty until the outage is confirmed
    clock.advance(0.6)  # silence since the call: confirmed; an unseen user's share is handed out
    assert fired(s.take("k", 10, 1.0))[0] is True
    clock.advance(0.4)
    redis.answers = [[0, "0", "", 0, 0] + grant(1, 0.0)]
    d = s.take("k", 10, 1.0)
    clock.advance(0)
    assert fired(d)[0] is True and s.up
    charge, ask = redis.users()
    assert charge[2] == "0" and charge[7] == "1" and ask[2] == "1"


def test_a_deleted_user_is_forgotten_here_and_in_redis() -> None:
    s, redis, clock, _ = store()
    d = s.take("gone", 100, 10.0)
    fired(s.forget("gone"))
    assert fired(d)[0] is False and "gone" not in s._leases
    assert redis.deleted == [KEY_PREFIX + "gone"]


def test_an_outage_is_confirmed_by_silence_after_a_call_not_by_the_time_since_the_last_one() -> None:
    s, redis, clock, _ = store("local")
    redis.answers = [grant(1, 0.0)]
    d = s.take("l", 10, 1.0)
    clock.advance(0)
    assert fired(d)[0] is True
    clock.advance(60)  # a minute without calls (all decided locally, say): Redis is not silent for that
    d = s.take("l", 10, 1.0)
    clock.advance(0)
    clock.advance(0.05)
    clock.advance(0)  # this call times out
    fired(d)
    assert not s.share.confirmed  # one slow answer: the shares start empty, the last level is not handed out


def test_a_process_that_has_not_reached_redis_yet_waits_for_it_rather_than_think_itself_alone() -> None:
    s, redis, clock, registry = store()
    redis.epoch, redis.online = "", False  # starting: never connected
    d = s.take("m", 100, 10.0)
    clock.advance(0)
    assert not d.called and s.up and redis.calls == []
    redis.epoch, redis.online = "replid-1", True
    redis.answers = [grant(5, 95.0)]
    redis.connecting.callback(redis)
    assert fired(d)[0] is True and sample_value(registry, "lbsvc_bucket_store_errors_total") == 0
    redis.epoch, redis.online = "", False  # (another start) Redis unreachable for the whole wait: the fallback
    s._leases.clear()
    d = s.take("n", 100, 10.0)
    clock.advance(0)
    clock.advance(1.0)
    clock.advance(0)
    # A second of silence since the start: an outage (every gateway's, as far as this one can tell), decided by
    # this process's share.
    assert fired(d)[0] is True and not s.up and s.share.confirmed
