"""Per-user token buckets, refilled by one ``LoopingCall``.

A bucket holds a fractional level between 0 and its capacity.  Taking a token
is a single step on the reactor thread, so it is atomic.  Only buckets that are
not full are in the refill set, and a million idle users cost nothing.  Each
bucket is credited for exactly the time it spent not full (``rate * (now -
since)``), so in any window of ``t`` seconds at most ``capacity + rate * t``
tokens are ever handed out.

:class:`IBucketStore` is what the proxy and the user API use: these buckets
(:class:`MemoryBucketStore`), or Redis shared by every gateway
(:mod:`lbsvc.limits.redisbuckets`).

A tick credits at most :data:`SLICE` buckets, resuming where the last one
stopped, so the reactor is never held for long however many users are
active; ``take``, ``peek`` and ``change`` credit their bucket themselves before
reading it, so a bucket that waits a few ticks for its turn is never short of
the tokens it earned.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, TypeVar, Union

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

T = TypeVar("T")

TICK = 0.05
SLICE = 20_000
MAX_RESET = 10.0**12
"""A bound on ``RateLimit-Reset`` (a full bucket of 10^9 at 0.001/s takes 10^12 s)."""


class Bucket:
    """One user's tokens."""

    __slots__ = ("capacity", "rate", "level", "since")

    def __init__(self, capacity: float, rate: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.level = float(capacity)
        self.since = 0.0

    def retry_after(self) -> float:
        """Seconds until one token is there."""
        return (1.0 - self.level) / self.rate

    def reset_after(self) -> int:
        """Whole seconds until the bucket is full again."""
        seconds = (self.capacity - self.level) / self.rate
        return max(0, math.ceil(min(seconds, MAX_RESET)))


class Buckets:
    """All buckets, by user name, and the refill loop."""

    def __init__(self, clock: IReactorTime, tick: float = TICK, slice: int = SLICE) -> None:
        self.clock = clock
        self.tick = tick
        self.slice = slice
        self._buckets: Dict[str, Bucket] = {}
        self._refilling: Dict[str, Bucket] = {}
        self._pass: List[str] = []  # names still to visit in the current pass
        self.loop = task.LoopingCall(self.refill)
        """The refill loop; the daemon runs it under a supervisor."""
        self.loop.clock = clock

    def start(self) -> None:
        """Start refilling every ``tick`` seconds."""
        self.loop.start(self.tick, now=False)

    def stop(self) -> None:
        """Stop refilling."""
        if self.loop.running:
            self.loop.stop()

    def bucket(self, name: str, capacity: float, rate: float) -> Bucket:
        """The bucket of ``name`` (a new one starts full)."""
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = Bucket(capacity, rate)
        return bucket

    def take(self, name: str, capacity: float, rate: float) -> Optional[Bucket]:
        """Spend one token: the bucket if there was one, None if empty."""
        bucket = self.bucket(name, capacity, rate)
        now = self.clock.seconds()
        self.refill_one(name, bucket, now)
        if bucket.level < 1.0:
            return None
        if name not in self._refilling:
            bucket.since = now
            self._refilling[name] = bucket
        bucket.level -= 1.0
        return bucket

    def peek(self, name: str, capacity: float, rate: float) -> Bucket:
        """The bucket, credited up to now, without spending anything."""
        bucket = self.bucket(name, capacity, rate)
        self.refill_one(name, bucket, self.clock.seconds())
        return bucket

    def change(self, name: str, capacity: float, rate: float) -> Bucket:
        """New limits, at once; the level is capped at the new capacity."""
        bucket = self.bucket(name, capacity, rate)
        now = self.clock.seconds()
        self.refill_one(name, bucket, now)
        bucket.capacity, bucket.rate = capacity, rate
        if bucket.level >= capacity:
            bucket.level = float(capacity)
            self._refilling.pop(name, None)
        elif name not in self._refilling:
            bucket.since = now
            self._refilling[name] = bucket
        return bucket

    def forget(self, name: str) -> None:
        """Drop the bucket of a deleted user."""
        self._buckets.pop(name, None)
        self._refilling.pop(name, None)

    def clear(self) -> None:
        """Drop every bucket (the next one of each user starts afresh)."""
        self._buckets.clear()
        self._refilling.clear()
        self._pass = []

    def refill_one(self, name: str, bucket: Bucket, now: float) -> None:
        """Credit one bucket for the time since it was last credited."""
        if name not in self._refilling:
            return
        level = bucket.level + bucket.rate * (now - bucket.since)
        bucket.since = now
        if level >= bucket.capacity:
            bucket.level = float(bucket.capacity)
            del self._refilling[name]
        else:
            bucket.level = level

    def refill(self) -> None:
        """One tick: credit the next :data:`SLICE` buckets that are not full.

        The crediting of :meth:`refill_one` is inlined here on purpose: this
        loop is the figure the refill benchmark measures; a method call per
        bucket would add to it.
        """
        if not self._pass:
            self._pass = list(self._refilling)
        names = self._pass[-self.slice:]
        del self._pass[-self.slice:]
        now = self.clock.seconds()
        refilling = self._refilling
        for name in names:
            bucket = refilling.get(name)
            if bucket is None:  # filled up (or changed) since the pass began
                continue
            level = bucket.level + bucket.rate * (now - bucket.since)
            bucket.since = now
            if level >= bucket.capacity:
                bucket.level = float(bucket.capacity)
                del refilling[name]
            else:
                bucket.level = level

    @property
    def pass_remaining(self) -> int:
        """Buckets the current refill pass has still to visit."""
        return len(self._pass)

    @property
    def refilling(self) -> int:
        """How many buckets are not full."""
        return len(self._refilling)


Verdict = Tuple[bool, Bucket]
"""Whether a token was taken, and the bucket as it is now."""

Settled = Union[T, "defer.Deferred[T]"]
"""A value now (in-memory buckets) or later (a shared store)."""


class IBucketStore(Interface):
    """Where the token buckets live: this process (``memory``) or Redis, shared."""

    def take(name: str, capacity: int, rate: float) -> Settled[Verdict]:
        """Spend one token of ``name``'s bucket if there is one."""

    def peek(name: str, capacity: int, rate: float) -> Settled[Bucket]:
        """The bucket, credited up to now, without spending anything."""

    def change(name: str, capacity: int, rate: float) -> Settled[Bucket]:
        """New limits at once; the level is capped at the new capacity."""

    def forget(name: str) -> Settled[None]:
        """Drop the bucket of a deleted user."""


@implementer(IBucketStore)
class MemoryBucketStore:
    """The buckets of this process (``--buckets memory``): answers at once."""

    def __init__(self, buckets: Buckets) -> None:
        self.buckets = buckets

    def take(self, name: str, capacity: int, rate: float) -> Verdict:
        """Spend one token here."""
        bucket = self.buckets.take(name, capacity, rate)
        if bucket is None:
            return False, self.buckets.peek(name, capacity, rate)
        return True, bucket

    def peek(self, name: str, capacity: int, rate: float) -> Bucket:
        """The bucket here."""
        return self.buckets.peek(name, capacity, rate)

    def change(self, name: str, capacity: int, rate: float) -> Bucket:
        """New limits here."""
        return self.buckets.change(name, capacity, rate)

    def forget(self, name: str) -> None:
        """Drop the bucket here."""
        self.buckets.forget(name)


async def settled(value: Settled[T]) -> T:
    """The value of a :data:`Settled`, waiting for it if it is not there yet."""
    if isinstance(value, defer.Deferred):
        result: T = await value
        return result
    return value
