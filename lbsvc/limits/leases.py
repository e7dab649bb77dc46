"""Leased tokens: Redis buckets decided locally, at the speed of memory buckets, within the same bound.

A gateway process takes a *block* of a user's tokens out of Redis on lease
(:mod:`lbsvc.limits.leasescript`), spends it locally without asking Redis,
and reports what it spent, returns what it will not spend and asks for the
next block in one script call, batched with every other call of the reactor
turn.  Redis keeps ``b + O <= C`` (free tokens plus tokens out on lease), so
admissions in any window of ``t`` seconds stay within ``C + R*t`` across
every gateway and worker (docs/design.md, "Leased tokens").

- **Blocks fit the traffic**: a quarter of a second of this process's recent
  rate for that user, at least the requests waiting, at most its share
  ``ceil(C / N)`` (N: the live gateway processes of the heartbeat), so near
  the limit no gateway holds more than its share.  The next block is asked
  for in the background once less than half a block is left.
- **Expiry on one clock**: a lease ends :data:`LEASE_LENGTH` seconds after its
  grant by Redis's clock; this process stops spending it ``margin`` earlier
  by its own *monotonic* clock, counted from when it *asked*.  Its wall clock
  is never read.
- **Denied locally**: when Redis grants nothing, the user is refused here
  until its next token is due, without asking Redis again.
- **Given back**: what a user left idle for :data:`IDLE_AFTER` seconds holds
  goes back to Redis, and so does everything at shutdown (one last call,
  bounded by ``--redis-timeout``).  What a killed process held comes back
  when its lease ends.
- **Redis away**: blocks held are spent until their local end; then
  ``--bucket-store-fallback`` decides as with per-request decisions
  (:class:`~lbsvc.limits.redisbuckets.RedisBucketStore`, whose fallback,
  timeout and metrics this store shares).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Callable, Dict, List, Tuple

import txredisapi
from prometheus_client import CollectorRegistry, Counter
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from lbsvc.limits.buckets import Bucket, Buckets, Verdict
from lbsvc.limits.leasescript import ANSWERS, EPOCH_KEY, KEY_PREFIX, run_script
from lbsvc.limits.redisbuckets import MAX_BATCH, RedisBucketStore
from svckit.metrics import sums

log = Logger()

LEASE_LENGTH = 2.0
"""Seconds a lease lasts by Redis's clock after its last grant or renewal (``--lease-length``)."""
BLOCK_SECONDS = 0.25
"""A block holds this many seconds of the user's recent rate here."""
IDLE_AFTER = 1.0
"""Seconds without a request after which a user's block goes back to Redis."""
SWEEP = 0.25
"""Seconds between looks for idle blocks and leases to renew."""
MAX_DENY = 1.0
"""Seconds a user is refused locally at most before Redis is asked again."""
LOST_LINE_EVERY = 10.0
"""Seconds between two log lines about lost leases (each says how many since the last)."""

def margin(length: float) -> float:
    """How much earlier than Redis a process stops spending a lease: a tenth of it, at least 0.2 s."""
    return max(0.2, length / 10)


class Lease:
    """What this process holds of one user's tokens, and what it knows of the user's bucket."""

    __slots__ = ("name", "capacity", "rate", "lease_id", "unspent", "spent", "end", "denied_until", "level",
                 "block", "pace", "used", "since", "last_used", "asking", "giving_back", "sent", "waiters",
                 "peekers", "bucket")

    def __init__(self, name: str, capacity: int, rate: float, now: float) -> None:
        self.name = name
        self.capacity = capacity
        self.rate = rate
        self.lease_id = ""
        """The lease Redis granted this process ('' for none)."""
        self.unspent = 0
        self.spent = 0
        """Tokens spent of this lease so far (a running total: Redis counts a repeated report once)."""
        self.end = 0.0
        """Monotonic time at which spending stops (before Redis takes the lease back)."""
        self.denied_until = 0.0
        self.level = 0.0
        """The free tokens Redis last reported (``b``)."""
        self.block = 1
        self.pace = 0.0
        """Admissions per second here, smoothed."""
        self.used = 0
        self.since = now
        self.last_used = now
        self.asking = False
        """A call about this user is in flight (at most one at a time)."""
        self.giving_back = False
        self.sent: Tuple[float, int, int] = (now, 0, 0)
        """The call in flight: when it was asked, tokens kept, tokens wanted."""
        self.waiters: List[defer.Deferred[Verdict]] = []
        self.peekers: List[defer.Deferred[Bucket]] = []
        self.bucket = Bucket(capacity, rate)

    def view(self) -> Bucket:
        """The bucket as this process sees it: Redis's free tokens and what it holds unspent."""
        bucket = self.bucket
        bucket.level = max(0.0, self.level) + self.unspent
        return bucket

    def spend(self) -> Bucket:
        """One token of the block."""
        self.unspent -= 1
        self.spent += 1
        self.used += 1
        return self.view()


def block_size(lease: Lease, now: float, live: int) -> int:
    """How many tokens to ask for: :data:`BLOCK_SECONDS` of the recent rate, at least the requests waiting,
    at most this process's share of the capacity among ``live`` gateway processes."""
    elapsed = now - lease.since
    if elapsed >= 0.05:
        pace = lease.used / elapsed
        lease.pace = pace if lease.pace == 0.0 else (lease.pace + pace) / 2
        lease.used, lease.since = 0, now
    return max(1, min(max(math.ceil(lease.pace * BLOCK_SECONDS), len(lease.waiters)), share_of(lease.capacity, live)))


def share_of(capacity: int, live: int) -> int:
    """The most one of ``live`` gateway processes may hold of a capacity: ``ceil(C / N)``."""
    return math.ceil(capacity / max(1, live))


class LeasedBucketStore(RedisBucketStore):
    """Redis buckets whose tokens are leased in blocks and spent locally (the default with ``--buckets redis``)."""

    key_prefix = KEY_PREFIX

    def __init__(self, url: str, local: Buckets, fallback: str, timeout: float, clock: IReactorTime,
                 registry: CollectorRegistry, link: Any, length: float = LEASE_LENGTH,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        super().__init__(url, local, fallback, timeout, clock, registry, link)
        self.length = length
        self.monotonic = monotonic
        self.registry = registry
        self.holder = uuid.uuid4().hex
        """This process's name in Redis's leases."""
        self._leases: Dict[str, Lease] = {}
        self._asking: List[Lease] = []
        self._by_lease = self._decisions.labels("lease")
        self.local_decisions = 0
        """Decisions made here from a block on lease, not yet added to ``_by_lease`` (the sweep adds them: a
        counter's lock per request costs a measurable share of a decision)."""
        self._calls = Counter("lbsvc_bucket_lease_calls", "Calls of the lease script (each over a batch of"
                              " users).", registry=registry)
        self._blocks = Counter("lbsvc_bucket_lease_blocks", "Blocks of tokens granted to this process.",
                               registry=registry)
        self._lost = Counter("lbsvc_bucket_leases_lost", "Leases that had ended in Redis (or whose Redis lost"
                             " its data) when this process next called about them.", registry=registry)
        self._lost_line_at = float("-inf")
        self._lost_since_line = 0
        self.sweeper = task.LoopingCall(self.sweep)
        """Gives back idle blocks and renews leases in use; the daemon runs it under a supervisor."""
        self.sweeper.clock = clock

    # --- IBucketStore -----------------------------------------------------

    def take(self, name: str, capacity: int, rate: float) -> Any:
        """Spend one token of this process's block, or wait for one from Redis (or the fallback)."""
        now = self.monotonic()
        lease = self._leases.get(name)
        if lease is None or lease.capacity != capacity or lease.rate != rate:
            lease = self._lease(name, capacity, rate, now)
        lease.last_used = now
        if lease.unspent:
            if now < lease.end:  # the hot path, inlined: Lease.spend() and Lease.view()
                lease.unspent -= 1
                lease.spent += 1
                lease.used += 1
                bucket = lease.bucket
                bucket.level = (lease.level if lease.level > 0.0 else 0.0) + lease.unspent
                self.local_decisions += 1
                if lease.unspent * 2 < lease.block and not lease.asking:
                    self._ask(lease)
                return True, bucket
            lease.unspent = 0  # ended here: given back (or taken back by Redis) with the next call
        if now < lease.denied_until:
            self.local_decisions += 1
            return False, lease.view()
        if not self._may_ask():
            return defer.maybeDeferred(self._without_redis, name, capacity, rate, 1)
        d: defer.Deferred[Verdict] = defer.Deferred()
        lease.waiters.append(d)
        if not lease.asking:
            self._ask(lease)
        return d

    def peek(self, name: str, capacity: int, rate: float) -> defer.Deferred[Bucket]:
        """Redis's free tokens for ``name`` and what this process holds (reporting what it spent)."""
        if not self._may_ask():
            return defer.maybeDeferred(self._without_redis, name, capacity, rate, 0).addCallback(lambda v: v[1])
        lease = self._lease(name, capacity, rate, self.monotonic())
        d: defer.Deferred[Bucket] = defer.Deferred()
        lease.peekers.append(d)
        if not lease.asking:
            self._ask(lease)
        return d

    def forget(self, name: str) -> defer.Deferred[None]:
        """Drop this process's lease of ``name`` and the bucket in Redis."""
        lease = self._leases.pop(name, None)
        if lease is not None:
            for d in lease.waiters:
                d.callback((False, lease.view()))
            lease.waiters = []
        return super().forget(name)

    def _lease(self, name: str, capacity: int, rate: float, now: float) -> Lease:
        """This process's lease of ``name``, made on first use; the user's limits as they are now."""
        lease = self._leases.get(name)
        if lease is None:
            lease = self._leases[name] = Lease(name, capacity, rate, now)
        else:
            lease.capacity, lease.rate = capacity, rate
            lease.bucket.capacity, lease.bucket.rate = capacity, rate
        return lease

    # --- asking Redis -----------------------------------------------------

    def _ask(self, lease: Lease) -> None:
        """Queue a call about ``lease`` for the end of this reactor turn."""
        lease.asking = True
        self._asking.append(lease)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        """Send what this reactor turn asked: one script call per :data:`MAX_BATCH` users (once connected)."""
        self._flush_call = None
        asking, self._asking = self._asking, []
        self._when_connected(self._call_all, asking)

    def _call_all(self, redis: Any, asking: List[Lease]) -> None:
        for start in range(0, len(asking), MAX_BATCH):
            self._call(redis, asking[start:start + MAX_BATCH])

    def _call(self, redis: Any, batch: List[Lease]) -> defer.Deferred[None]:
        if redis is None:
            self._failed(Failure(txredisapi.ConnectionError("not connected")))
            self._unanswered(batch)
            return defer.succeed(None)
        charges: List[Tuple[str, Tuple[int, int, float]]] = []
        if not self.up and self.fallback == "local":
            charges = list(self.share.end().items())  # what the outage admitted goes first
        now = self.monotonic()
        live = self.share.live
        keys = [EPOCH_KEY]
        args = [self.link.epoch, self.link.previous_epoch, self.holder, repr(self.length), ""]
        for name, (count, capacity, rate) in charges:
            keys.append(KEY_PREFIX + name)
            args += (str(capacity), repr(float(rate)), "0", "", "0", "0", "0", str(count))
        for lease in batch:
            if lease.giving_back or now >= lease.end:
                lease.unspent = 0
            want = 0 if lease.giving_back else block_size(lease, now, live)
            if want:
                lease.block = want
            lease.sent = (now, lease.unspent, want)
            keys.append(KEY_PREFIX + lease.name)
            args += (str(lease.capacity), repr(float(lease.rate)), str(want), lease.lease_id, str(lease.spent),
                     str(lease.unspent), str(share_of(lease.capacity, live)), "0")
        sent = self.clock.seconds()
        if self.up:
            # Calls are rare with leases, so the last answer may be long past: silence counts from the last call
            # sent to a Redis that answered, and only that confirms an outage to the local fallback.
            self._heard_at = max(self._heard_at, sent)
        self._calls.inc()
        self._batch_sizes.observe(len(keys) - 1)
        expected = ANSWERS * (len(keys) - 1)
        timed_out = [False]

        def late(result: Any) -> Any:
            if timed_out[0]:  # Redis was only slow: ask it again (what it granted comes back with the next call)
                self._heard_at = self.clock.seconds()
                self._retry_at = min(self._retry_at, self._heard_at)
            return result

        def answered(result: Any) -> None:
            if not isinstance(result, list) or len(result) != expected:
                failed(Failure(ValueError(f"unexpected answer to the lease script: {result!r:.80}")))
                return
            self._heard_at = self.clock.seconds()
            self._round_trips.observe(self._heard_at - sent)
            if not self.up and self._heard_at >= self._retry_at:
                self._recovered()
            offset = ANSWERS * len(charges)
            lost = 0
            for i, lease in enumerate(batch):
                lost += self._granted(lease, result[offset + ANSWERS * i: offset + ANSWERS * (i + 1)])
            if lost:
                self._lost_since_line += lost
                self._lost.inc(lost)
                now = self.clock.seconds()
                if now - self._lost_line_at >= LOST_LINE_EVERY:
                    log.warn("{count} leases of this gateway had ended in Redis (or Redis lost its data) before"
                             " it called again; their tokens were not spent after their end here",
                             count=self._lost_since_line)
                    self._lost_line_at, self._lost_since_line = now, 0

        def failed(reason: Failure) -> None:
            timed_out[0] = bool(reason.check(defer.TimeoutError))
            self._failed(reason)
            self.share.restore((name, spent) for name, spent in charges)
            self._unanswered(batch)

        call = run_script(redis, keys, args).addCallback(late)
        return self._bounded(call).addCallbacks(answered, failed)

    def _granted(self, lease: Lease, answer: List[Any]) -> int:
        """Apply Redis's answer about ``lease``; 1 if the lease it named had ended, else 0."""
        granted, level, lease_id, kept, lost = int(answer[0]), float(answer[1]), _text(answer[2]), int(answer[3]), \
            int(answer[4])
        asked_at, keep, want = lease.sent
        lease.asking = lease.giving_back = False
        if lease_id != lease.lease_id:  # a new lease, or none: nothing of the old one is spent any more
            lease.lease_id, lease.unspent, lease.spent = lease_id, 0, 0
        elif kept < keep:
            lease.unspent = max(0, lease.unspent - (keep - kept))
        lease.unspent += granted
        if lease_id:
            lease.end = asked_at + self.length - margin(self.length)
        lease.level = level
        self.share.seen(lease.name, level)
        if granted:
            self._blocks.inc()
        now = self.monotonic()
        waiters, lease.waiters = lease.waiters, []
        for n, d in enumerate(waiters):
            if lease.unspent > 0 and now < lease.end:
                self._by_redis.inc()
                d.callback((True, lease.spend()))
            elif want and granted >= want:  # Redis gave all that was asked: ask for the rest of the waiting
                lease.waiters = waiters[n:]
                self._ask(lease)
                break
            else:
                self._by_redis.inc()
                d.callback((False, lease.view()))
        if want and granted < want and lease.unspent == 0:
            wait = (1.0 - level) / lease.rate if level < 1.0 else 0.0
            lease.denied_until = now + min(MAX_DENY, max(0.001, wait))
        peekers, lease.peekers = lease.peekers, []
        for p in peekers:
            p.callback(lease.view())
        return lost

    def _unanswered(self, batch: List[Lease]) -> None:
        """Redis did not answer about ``batch``: blocks held stay (until their end); the waiting are decided by
        the fallback."""
        for lease in batch:
            lease.asking = lease.giving_back = False
            waiters, lease.waiters = lease.waiters, []
            for d in waiters:
                self._answer_without_redis(d, lease.name, lease.capacity, lease.rate, 1)
            peekers, lease.peekers = lease.peekers, []
            for p in peekers:
                try:
                    p.callback(self._without_redis(lease.name, lease.capacity, lease.rate, 0)[1])
                except Exception:
                    p.errback(Failure())

    # --- giving back ------------------------------------------------------

    def sweep(self) -> None:
        """Give back the blocks of users idle for :data:`IDLE_AFTER` seconds, renew leases in use that are
        half over, and forget users with nothing held."""
        self.count_local()
        now = self.monotonic()
        idle: List[str] = []
        for name, lease in self._leases.items():
            if lease.asking or lease.waiters:
                continue
            if now - lease.last_used >= IDLE_AFTER:
                if lease.lease_id and self._may_ask(quiet=True):
                    lease.giving_back = True
                    self._ask(lease)
                elif not lease.lease_id:
                    idle.append(name)
            elif lease.unspent and lease.end - now < self.length / 2 and self._may_ask(quiet=True):
                self._ask(lease)
        for name in idle:
            del self._leases[name]

    def count_local(self) -> None:
        """Add the decisions made here since the last time to ``lbsvc_bucket_decisions_total{path="lease"}``."""
        counted, self.local_decisions = self.local_decisions, 0
        if counted:
            self._by_lease.inc(counted)

    def give_back(self) -> defer.Deferred[None]:
        """Give every block back (at shutdown): one call, bounded by the Redis timeout."""
        redis = self.link.current()
        held = [lease for lease in self._leases.values() if lease.lease_id and not lease.asking]
        if redis is None or not held:
            return defer.succeed(None)
        for lease in held:
            lease.giving_back = True
        calls = [self._call(redis, held[start:start + MAX_BATCH]) for start in range(0, len(held), MAX_BATCH)]
        done: defer.Deferred[Any] = defer.DeferredList(calls, consumeErrors=True)
        return done.addCallback(lambda _: None)

    # --- what /ready and /status show ------------------------------------

    def lease_report(self) -> Dict[str, Any]:
        """Leases held, blocks fetched, and local decisions per Redis call."""
        self.count_local()
        held = sum(1 for lease in self._leases.values() if lease.unspent)
        counts = sums(self.registry.collect(), {"calls": ("lbsvc_bucket_lease_calls_total", {}),
                                                "blocks": ("lbsvc_bucket_lease_blocks_total", {}),
                                                "local": ("lbsvc_bucket_decisions_total", {"path": "lease"})})
        calls = counts.get("calls", 0.0)
        return {"leases_held": held, "blocks_fetched": int(counts.get("blocks", 0.0)), "redis_calls": int(calls),
                "local_decisions_per_call": round(counts.get("local", 0.0) / calls, 1) if calls else None}


class GiveBack(service.Service):
    """Runs the Redis link, and at shutdown gives every block back through it before closing it.

    (A ``MultiService`` stops its children all at once: the link would close under the last call.)
    """

    def __init__(self, store: LeasedBucketStore, link: service.Service) -> None:
        self.store = store
        self.link = link

    def startService(self) -> None:
        """Connect to Redis."""
        super().startService()
        self.link.startService()

    def stopService(self) -> defer.Deferred[None]:
        """One last call: every block this process holds back to Redis; then disconnect."""
        super().stopService()
        self.store.stopping = True
        d = self.store.give_back()
        d.addBoth(lambda _: self.link.stopService())
        return d


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
