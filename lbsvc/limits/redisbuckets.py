"""Token buckets in Redis, one budget per user for every gateway (``--buckets redis://...``).

Tokens are taken by one server-side Lua script
(:mod:`lbsvc.limits.bucketscript`), which Redis runs one at a time, so however
many gateways ask at once, no window of ``t`` seconds admits more than
``C + R·t``.  The profile runs the same script with a cost of 0: it reads
without spending.

**One round trip per batch.**  Every decision asked for within one reactor
turn is queued and sent at the end of it (``callLater(0)``) as one script
call over all their keys (at most :data:`MAX_BATCH` a call; the same user
may appear several times, and is decided in arrival order).  Redis still
decides every token atomically; what a batch saves is the round trip, the
command encoding and a Deferred per request.  ``lbsvc_bucket_store_batch_size``
and ``lbsvc_bucket_store_round_trip_seconds`` are histograms on ``/metrics``.

Redis calls are bounded by ``--redis-timeout`` (50 ms by default) so a slow
Redis never stalls the gateway.  While Redis cannot be used, requests are
decided by ``--bucket-store-fallback``: ``local`` (each of the N live
gateway processes enforces its share, C/N and R/N, from its share of the
level Redis last reported, and the tokens it spent are charged to Redis when
it is back: :mod:`lbsvc.limits.fallbackshare`; N from :mod:`lbsvc.limits.livegateways`) or
``deny`` (503 with ``Retry-After``).  Decisions are counted by path on
``/metrics`` (``lbsvc_bucket_decisions_total{path="redis|local_share|deny"}``).  After a failure Redis
is left alone for :data:`RETRY_AFTER` seconds, then tried again; the switch
both ways is logged, and counted on ``/metrics``
(``lbsvc_bucket_store_up``, ``lbsvc_bucket_store_fallback_total{mode}``).

The client is ``txredisapi``'s ``RedisProtocol`` (Twisted-native, pure
Python, runs on PyPy) on one connection kept up by Twisted's
``ClientService`` (:class:`~lbsvc.limits.redislink.RedisLink`).  Its ``lazyConnection`` handler was
measured first: it routes every command through a pool lookup and two extra
Deferreds, and queues commands while Redis is away (so every request would
wait out the timeout); the link hands the connected protocol to the store
directly, and while there is none the fallback decides at once. Only a
process that has not reached Redis yet (starting) waits, up to
:data:`FIRST_CONNECTION`, for its first connection: until then it has not
counted the other gateways either, and its share would be a whole bucket.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import txredisapi
from prometheus_client import CollectorRegistry, Counter, Histogram
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lbsvc.limits.buckets import Bucket, Buckets, IBucketStore, Verdict
from lbsvc.limits.bucketscript import KEY_PREFIX, run_script
from lbsvc.limits.fallbackshare import ShareFallback
from svckit.deadlines import within
from svckit.responses import HTTPError

log = Logger()

_Queued = Tuple[str, int, float, int, "Optional[defer.Deferred[Verdict]]"]
"""A decision waiting for the next batch: name, capacity, rate, cost (negative: a charge
of that many tokens spent during an outage), and its answer (None for a charge)."""

MAX_BATCH = 256
"""Decisions sent in one script call at most (a longer queue is sent in several)."""
RETRY_AFTER = 1.0
"""Seconds Redis is left alone after a failure before it is tried again."""
CONFIRM_AFTER = 0.5
"""Seconds without any answer from Redis after which an outage is taken to be every gateway's: only
then does the ``local`` fallback hand out the shares of the last levels (:meth:`ShareFallback.confirm`)."""
FIRST_CONNECTION = 1.0
"""Seconds the requests of a process that has not reached Redis yet (starting) wait for it, before the fallback
decides them: it has not counted the other gateways either, and its share would be a whole bucket."""
FALLBACKS = ("local", "deny")

class BucketStoreUnavailable(HTTPError):
    """Redis cannot be asked and the fallback is ``deny``."""

    def __init__(self) -> None:
        super().__init__(503, "the rate limit store is unavailable", {"Retry-After": "1"})


@implementer(IBucketStore)
class RedisBucketStore:
    """Buckets in Redis, with a local or denying fallback."""

    key_prefix = KEY_PREFIX
    """Where a user's bucket is in Redis (the user's name follows)."""

    def __init__(self, url: str, local: Buckets, fallback: str, timeout: float, clock: IReactorTime,
                 registry: CollectorRegistry, link: Any) -> None:
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}")
        self.url = url
        self.share = ShareFallback(local)
        self.fallback = fallback
        self.timeout = timeout
        self.clock = clock
        self.link = link
        """Whose ``current()`` is the connected Redis protocol, or None (:class:`RedisLink`)."""
        self.up = True
        self.stopping = False
        """Set at shutdown: the link's closing is not an outage worth a warning."""
        self._retry_at = 0.0
        self._heard_at = clock.seconds()
        """When Redis last answered anything (on time or late); at first, the start: an outage is confirmed by
        silence since then, not before it."""
        self._fallbacks = Counter("lbsvc_bucket_store_fallback", "Bucket decisions made without Redis,"
                                  " by fallback mode.", ["mode"], registry=registry).labels(fallback)
        self._errors = Counter("lbsvc_bucket_store_errors", "Redis calls that failed or timed out.",
                               registry=registry)
        self._batch_sizes = Histogram("lbsvc_bucket_store_batch_size", "Bucket decisions sent to Redis in one call.",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)
        self._round_trips = Histogram("lbsvc_bucket_store_round_trip_seconds", "Seconds from sending a batch to"
                                      " Redis to its answer.", buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02,
                                                                        0.05, 0.1, 0.25, 1.0), registry=registry)
        self._decisions = decisions = Counter(
            "lbsvc_bucket_decisions", "Bucket decisions by who made them: redis, this process from a block it"
            " holds on lease (lease), this process's share while Redis is away (local_share), or a refusal"
            " (deny).", ["path"], registry=registry)
        self._by_redis = decisions.labels("redis")
        self._by_share = decisions.labels("local_share")
        self._denied = decisions.labels("deny")
        self._queue: List[_Queued] = []
        self._flush_call: Optional[IDelayedCall] = None

    # --- IBucketStore -----------------------------------------------------

    def take(self, name: str, capacity: int, rate: float) -> defer.Deferred[Verdict]:
        """Spend one token in Redis (or by the fallback)."""
        return self._run(name, capacity, rate, 1)

    def peek(self, name: str, capacity: int, rate: float) -> defer.Deferred[Bucket]:
        """Read the bucket without spending."""
        return self._run(name, capacity, rate, 0).addCallback(lambda verdict: verdict[1])

    def change(self, name: str, capacity: int, rate: float) -> defer.Deferred[Bucket]:
        """New limits: the next script run caps the level at the new capacity."""
        self.share.forget(name)
        return self.peek(name, capacity, rate)

    def forget(self, name: str) -> defer.Deferred[None]:
        """Delete the bucket everywhere."""
        self.share.forget(name)
        redis = self.link.current()
        if redis is None:
            return defer.succeed(None)  # its level expires by itself
        d = self._bounded(redis.delete(self.key_prefix + name))

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                self._failed(result)

        return d.addBoth(done)

    # --- internals --------------------------------------------------------

    def _run(self, name: str, capacity: int, rate: float, cost: int) -> defer.Deferred[Verdict]:
        """Queue one decision for the next batch (or decide it now without Redis)."""
        if not self._may_ask():
            return defer.maybeDeferred(self._without_redis, name, capacity, rate, cost)
        d: defer.Deferred[Verdict] = defer.Deferred()
        self._queue.append((name, capacity, rate, cost, d))
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)
        return d

    def _may_ask(self, quiet: bool = False) -> bool:
        """Whether to ask Redis now: not within the pause after a failure; connected, or still starting (a
        request waits for the first connection).  ``quiet`` (a background look): only when connected, and a
        missing connection is not counted as a failure."""
        if not self.up and self.clock.seconds() < self._retry_at:
            return False
        if self.link.current() is None:
            if quiet:
                return False
            if self.link.epoch:
                self._failed(Failure(txredisapi.ConnectionError("not connected")))
                return False
        return True

    def _when_connected(self, send: Callable[[Any, List[Any]], None], queued: List[Any]) -> None:
        """``send(redis, queued)`` now, or once this process's first connection is made (at most
        :data:`FIRST_CONNECTION` later; ``redis`` is ``None`` if it was not)."""
        redis = self.link.current()
        if redis is None and not self.link.epoch:
            first = within(self.link.connected(), FIRST_CONNECTION, self.clock, "Redis's first connection")
            first.addErrback(lambda _: None).addCallback(send, queued)
            return
        send(redis, queued)

    def _flush(self) -> None:
        """Send what this reactor turn queued: one script call per :data:`MAX_BATCH` decisions."""
        self._flush_call = None
        queue, self._queue = self._queue, []
        self._when_connected(self._send_all, queue)

    def _send_all(self, redis: Any, queue: List[_Queued]) -> None:
        for start in range(0, len(queue), MAX_BATCH):
            self._send(redis, queue[start:start + MAX_BATCH])

    def _send(self, redis: Any, batch: List[_Queued]) -> None:
        if redis is None:
            self._failed(Failure(txredisapi.ConnectionError("not connected")))
            self._decide_without_redis(batch)
            return
        charges: List[_Queued] = []
        if not self.up and self.fallback == "local":
            # Redis may be back: what the outage spent goes first, before any new token is taken.
            charges = [(name, capacity, rate, -count, None)
                       for name, (count, capacity, rate) in self.share.end().items()]
            batch = charges + batch
        keys: List[str] = []
        args: List[str] = []
        for name, capacity, rate, cost, _ in batch:
            keys.append(KEY_PREFIX + name)
            args += (str(capacity), repr(float(rate)), str(cost))
        sent = self.clock.seconds()
        self._batch_sizes.observe(len(batch))
        timed_out = [False]
        admitted_here: List[bool] = []

        def late(result: Any) -> Any:
            if timed_out[0] and isinstance(result, list) and len(result) == 2 * len(batch):  # decided meanwhile
                self._heard_at = self.clock.seconds()
                self._retry_at = min(self._retry_at, self._heard_at)  # it answers after all: ask it again
                for i, (name, capacity, rate, cost, _) in enumerate(batch):
                    if cost > 0 and i < len(admitted_here):
                        self.share.late(name, capacity, rate, bool(int(result[2 * i])), admitted_here[i])
            return result

        def answered(result: Any) -> None:
            if not isinstance(result, list) or len(result) != 2 * len(batch):
                failed(Failure(txredisapi.ResponseError(f"unexpected answer to the bucket script: {result!r:.80}")))
                return
            self._heard_at = self.clock.seconds()
            self._round_trips.observe(self._heard_at - sent)
            if not self.up and self.clock.seconds() >= self._retry_at:  # not an answer sent before the failure
                self._recovered()
            self._by_redis.inc(len(batch) - len(charges))
            share = self.share
            for i, (name, capacity, rate, _, d) in enumerate(batch):
                level = float(result[2 * i + 1])
                share.seen(name, level)
                if d is None or d.called:  # a charge, or the client went away meanwhile
                    continue
                bucket = Bucket(capacity, rate)
                bucket.level = level
                d.callback((bool(int(result[2 * i])), bucket))

        def failed(reason: Failure) -> None:
            timed_out[0] = bool(reason.check(defer.TimeoutError))
            self._failed(reason)
            self.share.restore((name, (-cost, capacity, rate)) for name, capacity, rate, cost, _ in charges)
            admitted_here.extend(self._decide_without_redis(batch))

        call = run_script(redis, keys, args).addCallback(late)
        self._bounded(call).addCallbacks(answered, failed)

    def _recovered(self) -> None:
        """Redis answers again (and has been charged what the fallback spent meanwhile)."""
        self.up = True
        log.info("Redis buckets at {url} reachable again", url=self.url)

    def _decide_without_redis(self, batch: List[_Queued]) -> List[bool]:
        """Let the fallback decide ``batch``; whether each was admitted here."""
        admitted: List[bool] = []
        for name, capacity, rate, cost, d in batch:
            if d is None or d.called:  # a charge is dropped: its tokens stay charged locally
                admitted.append(False)
                continue
            admitted.append(self._answer_without_redis(d, name, capacity, rate, cost))
        return admitted

    def _answer_without_redis(self, d: defer.Deferred[Verdict], name: str, capacity: int, rate: float,
                              cost: int) -> bool:
        """Answer ``d`` by the fallback (its refusal, with ``deny``, as a failure); whether a token was spent."""
        try:
            verdict = self._without_redis(name, capacity, rate, cost)
        except Exception:
            d.errback(Failure())
            return False
        d.callback(verdict)
        return verdict[0] and cost > 0

    def _bounded(self, call: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """``call``, or a timeout once Redis itself has had :attr:`timeout` seconds (see :func:`within`)."""
        return within(call, self.timeout, self.clock, "Redis", after_a_turn=True)

    def _failed(self, reason: Failure) -> None:
        self._errors.inc()
        self._retry_at = self.clock.seconds() + RETRY_AFTER
        if self.up:
            self.up = False
            self.share.begin()
            if self.stopping:
                return
            log.warn("Redis buckets at {url} unavailable ({error}); deciding by the {mode!r} fallback"
                     " ({n} gateway processes share each budget)",
                     url=self.url, error=reason.getErrorMessage(), mode=self.fallback, n=self.share.live)

    def _without_redis(self, name: str, capacity: int, rate: float, cost: int) -> Verdict:
        self._fallbacks.inc()
        if self.fallback == "deny":
            self._denied.inc()
            raise BucketStoreUnavailable()
        self._by_share.inc()
        if not self.share.confirmed and self.clock.seconds() - self._heard_at >= CONFIRM_AFTER:
            self.share.confirm()
        if cost == 0:
            return True, self.share.peek(name, capacity, rate)
        return self.share.take(name, capacity, rate)

    @property
    def mode(self) -> str:
        """Who decides now: ``redis``, ``local_share`` or ``deny``."""
        if self.up:
            return "redis"
        return "local_share" if self.fallback == "local" else "deny"
