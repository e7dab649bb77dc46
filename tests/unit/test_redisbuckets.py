"""Redis buckets in memory: a scripted connection and an injected clock.

The Lua script itself runs against a real redis-server in the integration
tests; here: the timeout, both fallbacks, the return to Redis, the script
loaded on NOSCRIPT, and what the answers become.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import pytest
import txredisapi
from twisted.internet import defer
from twisted.internet.task import Clock

from lbsvc.limits.buckets import Buckets
from lbsvc.limits.bucketscript import KEY_PREFIX, SCRIPT, SCRIPT_SHA
from lbsvc.limits.redisbuckets import (
    CONFIRM_AFTER,
    FIRST_CONNECTION,
    MAX_BATCH,
    BucketStoreUnavailable,
    RedisBucketStore,
)
from lbsvc.limits.redislink import RedisAddress, parse_redis_url
from svckit.clienttls import ClientTLS
from svckit.metrics import new_registry, sample_value
from tests.unit.fired import fired


class FakeRedis:
    """Answers ``evalsha`` from a queue of outcomes, or leaves the call hanging.

    It is also its own link: ``current()`` is itself while ``online``; ``epoch`` says it was reached before
    (a process that has not reached Redis yet has none, and waits for ``connected()``).
    """

    online = True
    epoch = "replid-1"

    def current(self) -> Optional[FakeRedis]:
        return self if self.online else None

    def connected(self) -> defer.Deferred[Any]:
        """The link's first connection, made when the test fires it."""
        self.connecting: defer.Deferred[Any] = defer.Deferred()
        return self.connecting

    def __init__(self) -> None:
        self.calls: List[Tuple[str, Any, Any]] = []
        self.pending: List[defer.Deferred[Any]] = []
        self.answers: List[Any] = []
        self.scripts: set = set()

    def _answer(self) -> defer.Deferred[Any]:
        if not self.answers:
            d: defer.Deferred[Any] = defer.Deferred()
            self.pending.append(d)
            return d
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)

    def evalsha(self, sha: str, keys: Any, args: Any) -> defer.Deferred[Any]:
        self.calls.append(("evalsha", keys, args))
        if sha not in self.scripts:
            return defer.fail(txredisapi.ScriptDoesNotExist(f"No script matching hash: {sha} found"))
        return self._answer()

    def eval(self, script: str, keys: Any, args: Any) -> defer.Deferred[Any]:
        self.calls.append(("eval", keys, args))
        self.scripts.add(SCRIPT_SHA if script == SCRIPT else "?")
        return self._answer()

    def delete(self, key: str) -> defer.Deferred[Any]:
        self.calls.append(("delete", key, None))
        return self._answer()


def store(fallback: str = "local", redis: Optional[FakeRedis] = None,
          running: bool = True) -> Tuple[RedisBucketStore, FakeRedis, Clock, Any]:
    """A store, its Redis and clock; ``running``: started :data:`CONFIRM_AFTER` ago, so a fault from now on is
    an outage confirmed at once (a process just started is not sure of one until that much silence)."""
    clock = Clock()
    redis = redis or FakeRedis()
    registry = new_registry()
    s = RedisBucketStore("redis://127.0.0.1:6379/0", Buckets(clock), fallback, 0.05, clock, registry, redis)
    if running:
        clock.advance(CONFIRM_AFTER)
    return s, redis, clock, registry


def decided(clock: Clock, d: defer.Deferred[Any]) -> Any:
    """The result of ``d`` once the reactor turn that queued it ended (the batch is sent)."""
    clock.advance(0)
    return fired(d)


def fallbacks(registry: Any, mode: str) -> float:
    return sample_value(registry, "lbsvc_bucket_store_fallback_total", {"mode": mode})


def test_a_token_is_one_script_call_and_the_script_is_loaded_once() -> None:
    s, redis, clock, _ = store()
    redis.answers = [[1, "4"], [0, "0.25"]]
    taken, bucket = decided(clock, s.take("alice", 5, 1.0))
    assert taken and bucket.level == 4.0
    assert redis.calls == [("evalsha", [KEY_PREFIX + "alice"], ["5", "1.0", "1"]),
                           ("eval", [KEY_PREFIX + "alice"], ["5", "1.0", "1"])]
    taken, bucket = decided(clock, s.take("alice", 5, 1.0))
    assert not taken and bucket.level == 0.25 and bucket.retry_after() == 0.75
    assert [c[0] for c in redis.calls] == ["evalsha", "eval", "evalsha"]


def test_peek_costs_nothing() -> None:
    s, redis, clock, _ = store()
    redis.scripts.add(SCRIPT_SHA)
    redis.answers = [[0, "3.5"]]
    assert decided(clock, s.peek("bob", 5, 1.0)).level == 3.5
    assert redis.calls[0][2][2] == "0"


def test_a_slow_redis_is_decided_locally_then_tried_again() -> None:
    s, redis, clock, registry = store("local")
    redis.scripts.add(SCRIPT_SHA)
    d = s.take("carol", 2, 1.0)
    clock.advance(0)  # the batch goes out
    clock.advance(0.05)
    clock.advance(0)  # one more reactor turn for an answer that did arrive
    taken, _ = fired(d)
    assert taken and not s.up and fallbacks(registry, "local") == 1
    # Within RETRY_AFTER, Redis is not asked: the local bucket decides.
    assert fired(s.take("carol", 2, 1.0))[0] is True
    assert fired(s.take("carol", 2, 1.0))[0] is False  # capacity 2, spent locally
    assert len(redis.calls) == 1
    # The late answer: Redis took a token for the call that timed out, so of the
    # two the fallback handed out, only one is still to be charged.
    redis.pending[0].callback([1, "1"])
    assert not s.up
    clock.advance(1.0)
    redis.answers = [[1, "0", 1, "0"]]
    assert decided(clock, s.take("carol", 2, 1.0))[0] is True and s.up
    # Back: what the outage spent is charged first, in the same call, before the new token.
    assert redis.calls[1:] == [("evalsha", [KEY_PREFIX + "carol"] * 2, ["2", "1.0", "-1", "2", "1.0", "1"])]


def test_deny_fallback_is_503() -> None:
    s, redis, clock, registry = store("deny")
    redis.scripts.add(SCRIPT_SHA)
    redis.answers = [txredisapi.ConnectionError("Lost connection")]
    d = s.take("dave", 2, 1.0)
    with pytest.raises(BucketStoreUnavailable) as refused:
        decided(clock, d)
    assert refused.value.code == 503 and refused.value.headers == {"Retry-After": "1"}
    assert fallbacks(registry, "deny") == 1 and sample_value(registry, "lbsvc_bucket_store_errors_total") == 1


def test_forget_deletes_the_key() -> None:
    s, redis, _, _ = store()
    redis.answers = [1]
    fired(s.forget("erin"))
    assert redis.calls == [("delete", KEY_PREFIX + "erin", None)]


@pytest.mark.parametrize("url, parsed, shown", [
    ("redis://127.0.0.1:6380/2", RedisAddress("127.0.0.1", 6380, 2), "redis://127.0.0.1:6380/2"),
    ("redis://cache", RedisAddress("cache", 6379, 0), "redis://cache:6379/0"),
    ("redis://:p%40ss@cache/1", RedisAddress("cache", 6379, 1, None, "p@ss"), "redis://:***@cache:6379/1"),
    ("redis://gw:pw@cache", RedisAddress("cache", 6379, 0, "gw", "pw"), "redis://gw:***@cache:6379/0"),
    ("rediss://:pw@cache:6390/0?ssl_ca_certs=/ca.pem",
     RedisAddress("cache", 6390, 0, None, "pw", ClientTLS("/ca.pem")), "rediss://:***@cache:6390/0"),
    ("rediss://cache?ssl_certfile=c.pem&ssl_keyfile=k.pem",
     RedisAddress("cache", 6379, 0, tls=ClientTLS(None, "c.pem", "k.pem")), "rediss://cache:6379/0"),
])
def test_redis_urls(url: str, parsed: RedisAddress, shown: str) -> None:
    assert parse_redis_url(url) == parsed
    assert parsed.describe() == shown
    assert "pw" not in repr(parsed) and "p@ss" not in repr(parsed)


@pytest.mark.parametrize("url", ["http://:hunter2@x", "redis://", "redis://:hunter2@x/db", "redis://:hunter2@x:port",
                                 "redis://user@x", "redis://:hunter2@x?ssl_ca_certs=/ca.pem",
                                 "rediss://x?ssl_cert_reqs=none", "rediss://x?password=hunter2"])
def test_bad_redis_urls_are_refused_without_quoting_the_password(url: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_redis_url(url)
    assert "hunter2" not in str(refused.value)


def test_no_connection_is_decided_at_once() -> None:
    s, redis, clock, registry = store("deny")
    redis.online = False
    with pytest.raises(BucketStoreUnavailable):
        fired(s.take("fay", 2, 1.0))
    assert redis.calls == [] and not s.up


def test_decisions_of_one_reactor_turn_are_one_script_call_in_arrival_order() -> None:
    s, redis, clock, registry = store()
    redis.scripts.add(SCRIPT_SHA)
    first, gone, second, profile = (s.take("gus", 2, 1.0), s.take("hal", 3, 0.5), s.take("gus", 2, 1.0),
                                    s.peek("ida", 4, 2.0))
    gone.cancel()  # its client went away before the batch was answered
    gone.addErrback(lambda reason: reason.trap(defer.CancelledError))
    assert redis.calls == []  # nothing sent within the turn
    clock.advance(0)
    assert redis.calls == [("evalsha", [KEY_PREFIX + n for n in ("gus", "hal", "gus", "ida")],
                            ["2", "1.0", "1", "3", "0.5", "1", "2", "1.0", "1", "4", "2.0", "0"])]
    redis.pending[0].callback([1, "1", 1, "2", 0, "0.5", 0, "4"])
    (taken, _), (again, bucket) = fired(first), fired(second)
    assert [taken, again, bucket.level, fired(profile).level] == [True, False, 0.5, 4.0]
    assert sample_value(registry, "lbsvc_bucket_store_batch_size_count") == 1
    assert sample_value(registry, "lbsvc_bucket_store_batch_size_sum") == 4


def test_a_long_queue_goes_out_in_batches_of_at_most_max_batch() -> None:
    s, redis, clock, _ = store()
    redis.scripts.add(SCRIPT_SHA)
    decisions = [s.take(f"u{i}", 5, 1.0) for i in range(MAX_BATCH + 3)]
    clock.advance(0)
    assert [len(keys) for _, keys, _ in redis.calls] == [MAX_BATCH, 3]
    for pending, size in zip(redis.pending, (MAX_BATCH, 3)):
        pending.callback([1, "4"] * size)
    assert all(fired(d)[0] for d in decisions)


def test_the_local_fallback_gives_each_gateway_its_share_from_the_last_level_redis_reported() -> None:
    s, redis, clock, registry = store("local")
    redis.scripts.add(SCRIPT_SHA)
    s.share.set_live(2)  # two gateways share every budget
    redis.answers = [[1, "6"]]
    assert decided(clock, s.take("ivy", 10, 4.0))[0]  # Redis: 6 of 10 left
    redis.answers = [txredisapi.ConnectionError("Lost connection")]
    # Redis goes away.  Until the outage is confirmed (CONFIRM_AFTER without an answer: every gateway has
    # lost it, not just this one) the share holds nothing of the level, and refills at 4 / 2 = 2 per second.
    first = decided(clock, s.take("ivy", 10, 4.0))
    assert not first[0] and first[1].capacity == 5 and first[1].level == 0.0
    clock.advance(CONFIRM_AFTER)  # 1 token refilled; confirmed: this gateway's share of 6 is 3 more
    assert [fired(s.take("ivy", 10, 4.0))[0] for _ in range(5)] == [True] * 4 + [False]  # 4 in all, not 10
    assert fallbacks(registry, "local") == 6
    assert sample_value(registry, "lbsvc_bucket_decisions_total", {"path": "local_share"}) == 6
    assert sample_value(registry, "lbsvc_bucket_decisions_total", {"path": "redis"}) == 1
    assert s.mode == "local_share"
    # Back: the four tokens spent meanwhile are charged to Redis.
    clock.advance(1.0)
    redis.answers = [[1, "3", 1, "2"]]
    assert decided(clock, s.take("ivy", 10, 4.0))[0] and s.mode == "redis"
    assert redis.calls[-1] == ("evalsha", [KEY_PREFIX + "ivy"] * 2, ["10", "4.0", "-4", "10", "4.0", "1"])


def test_a_gateway_that_alone_finds_redis_slow_spends_no_share_of_the_level() -> None:
    """The others still spend Redis's level: a timeout answered late is not an outage to share it in."""
    s, redis, clock, _ = store("local")
    redis.scripts.add(SCRIPT_SHA)
    s.share.set_live(2)
    redis.answers = [[1, "9"]]
    assert decided(clock, s.take("ned", 10, 2.0))[0]
    d = s.take("ned", 10, 2.0)
    clock.advance(0)
    clock.advance(0.05)  # no answer in time: decided here, from an empty share
    assert fired(d)[0] is False and not s.up
    clock.advance(0.05)
    redis.pending[0].callback([1, "8"])  # Redis was only slow: it took a token, and is asked again at once
    redis.answers = [[1, "7"]]
    assert decided(clock, s.take("ned", 10, 2.0))[0] and s.up
    assert redis.calls[-1][2] == ["10", "2.0", "1"]  # nothing spent here, nothing to charge


def test_a_user_redis_never_reported_starts_from_a_full_share() -> None:
    s, redis, clock, _ = store("local")
    s.share.set_live(4)
    redis.online = False
    verdict = fired(s.take("joe", 8, 1.0))
    assert verdict[0] and verdict[1].capacity == 2 and verdict[1].level == 1.0
    assert fired(s.take("joe", 8, 1.0))[0] and not fired(s.take("joe", 8, 1.0))[0]


def test_a_late_token_redis_took_for_a_request_refused_here_still_costs_the_share() -> None:
    s, redis, clock, _ = store("local")
    redis.scripts.add(SCRIPT_SHA)
    redis.answers = [[1, "0"]]
    decided(clock, s.take("kim", 2, 1.0))  # Redis: nothing left
    d = s.take("kim", 2, 1.0)
    clock.advance(0)
    clock.advance(0.05)
    clock.advance(0)
    assert fired(d)[0] is False  # timed out: the share (from level 0) refuses it
    redis.pending[0].callback([1, "0"])  # but Redis had a token for it after all (say, refilled)
    redis.online = False  # and is gone again: the share goes on deciding
    clock.advance(1.0)  # refilled at 1 per second: 1 token, less the one Redis took
    assert fired(s.take("kim", 2, 1.0))[0] is False
    clock.advance(1.1)
    assert fired(s.take("kim", 2, 1.0))[0] is True


def test_charges_that_do_not_reach_redis_are_kept_for_the_next_try() -> None:
    s, redis, clock, _ = store("local")
    redis.scripts.add(SCRIPT_SHA)
    redis.online = False
    assert fired(s.take("lee", 4, 1.0))[0]  # spent by the fallback
    redis.online = True
    clock.advance(1.0)
    redis.answers = [txredisapi.ConnectionError("Lost connection")]
    assert decided(clock, s.take("lee", 4, 1.0))[0]  # the retry fails: still the fallback
    clock.advance(1.0)
    redis.answers = [[1, "2", 1, "1"]]
    assert decided(clock, s.take("lee", 4, 1.0))[0] and s.up
    assert redis.calls[-1] == ("evalsha", [KEY_PREFIX + "lee"] * 2, ["4", "1.0", "-2", "4", "1.0", "1"])


def test_a_malformed_answer_is_a_failure_not_a_crash() -> None:
    s, redis, clock, registry = store("local")
    redis.scripts.add(SCRIPT_SHA)
    redis.answers = [[1]]
    assert decided(clock, s.take("max", 2, 1.0))[0] and not s.up
    assert sample_value(registry, "lbsvc_bucket_store_errors_total") == 1


def test_a_process_that_has_not_reached_redis_yet_waits_for_it_rather_than_think_itself_alone() -> None:
    """(``--lease-length 0``, Redis deciding every request.) A share computed before the first connection
    would be a whole bucket: the heartbeat has not counted the other gateways yet."""
    s, redis, clock, registry = store(running=False)
    redis.scripts.add(SCRIPT_SHA)
    redis.epoch, redis.online = "", False  # starting: never connected
    d = s.take("ned", 10, 1.0)
    clock.advance(0)
    assert not d.called and s.up and redis.calls == []
    redis.epoch, redis.online = "replid-1", True
    redis.answers = [[1, "9"]]
    redis.connecting.callback(redis)
    assert fired(d)[0] is True and sample_value(registry, "lbsvc_bucket_store_errors_total") == 0


def test_a_process_whose_first_connection_never_comes_is_decided_by_its_share_after_the_wait() -> None:
    s, redis, clock, _ = store(running=False)
    s.share.set_live(2)
    redis.epoch, redis.online = "", False
    d = s.take("ola", 10, 1.0)
    clock.advance(0)
    clock.advance(FIRST_CONNECTION)
    clock.advance(0)
    # A second of silence since the start: an outage, decided by this process's share (half the bucket).
    taken, bucket = fired(d)
    assert taken and not s.up and s.share.confirmed and bucket.capacity == 5
