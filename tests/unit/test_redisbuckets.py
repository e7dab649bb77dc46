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

from lbsvc.buckets import Buckets
from lbsvc.redisbuckets import (
    KEY_PREFIX,
    MAX_BATCH,
    SCRIPT,
    SCRIPT_SHA,
    BucketStoreUnavailable,
    RedisBucketStore,
    parse_redis_url,
)
from svckit.metrics import new_registry, sample_value
from tests.unit.fired import fired


class FakeRedis:
    """Answers ``evalsha`` from a queue of outcomes, or leaves the call hanging.

    It is also its own link: ``current()`` is itself while ``connected``.
    """

    connected = True

    def current(self) -> Optional[FakeRedis]:
        return self if self.connected else None

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


def store(fallback: str = "local", redis: Optional[FakeRedis] = None) -> Tuple[RedisBucketStore, FakeRedis, Clock, Any]:
    clock = Clock()
    redis = redis or FakeRedis()
    registry = new_registry()
    return (RedisBucketStore("redis://127.0.0.1:6379/0", Buckets(clock), fallback, 0.05, clock, registry, redis),
            redis, clock, registry)


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
    redis.pending[0].callback([1, "1"])  # the late answer changes nothing
    assert not s.up
    clock.advance(1.0)
    redis.answers = [[1, "0"]]
    assert decided(clock, s.take("carol", 2, 1.0))[0] is True and s.up and len(redis.calls) == 2


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


@pytest.mark.parametrize("url, parsed", [
    ("redis://127.0.0.1:6380/2", ("127.0.0.1", 6380, 2)),
    ("redis://cache", ("cache", 6379, 0)),
])
def test_redis_urls(url: str, parsed: Tuple[str, int, int]) -> None:
    assert parse_redis_url(url) == parsed


@pytest.mark.parametrize("url", ["http://x", "redis://", "redis://x/db"])
def test_bad_redis_urls(url: str) -> None:
    with pytest.raises(ValueError):
        parse_redis_url(url)


def test_no_connection_is_decided_at_once() -> None:
    s, redis, clock, registry = store("deny")
    redis.connected = False
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
