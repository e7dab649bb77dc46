"""The ``local`` fallback of Redis buckets: this process's share of each user's budget.

While Redis cannot be asked, each of the N live gateway processes (counted
by :mod:`lbsvc.limits.livegateways`) enforces ``C/N`` tokens refilled at ``R/N``,
so the cluster as a whole still admits at most ``C + R·t``.  A user's share
holds its share of the level Redis last reported to this process for that
user (a full share for a user it has not seen), never a full bucket: what was
spent in Redis stays spent.

That level is handed out only once the outage is **confirmed**
(:meth:`ShareFallback.confirm`: Redis silent for a while, so every gateway
has lost it, not just this one); until then a share starts empty and only
refills at ``R/N``.  A gateway that alone finds Redis slow (its other
callers still spending the level in Redis) would otherwise spend a share of
that same level a second time.

Every token the fallback hands out is remembered and charged to Redis when it
is back (:meth:`ShareFallback.end`; the level may go below zero, a debt that
refills like any other level), so the spending of the outage counts against
the same budget afterwards.  A call that timed out but was run by
Redis after all is reconciled when its late answer arrives
(:meth:`ShareFallback.late`): a token Redis took for a request the fallback
also decided is not charged a second time.
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

from lbsvc.limits.buckets import Bucket, Buckets, Verdict

Spent = Tuple[int, int, float]
"""Tokens spent by the fallback for a user, with its capacity and rate."""

MAX_REMEMBERED = 100_000
"""Users whose last Redis level is kept (beyond it the oldest half is dropped; their share starts full)."""


class ShareFallback:
    """Local buckets of a share of each user's limits, for the outages of Redis."""

    def __init__(self, buckets: Buckets) -> None:
        self.buckets = buckets
        self.live = 1
        """Gateway processes sharing the budget (at least this one)."""
        self.confirmed = True
        """Whether this outage is known to be everyone's (the last levels' shares are handed out)."""
        self._last: Dict[str, float] = {}
        self._spent: Dict[str, Spent] = {}
        self._started: Dict[str, bool] = {}
        self._held: Dict[str, Tuple[float, float, float]] = {}
        """Users whose share of the last level waits for the outage to be confirmed: (level, capacity, rate)."""

    def set_live(self, count: int) -> None:
        """The heartbeat counted ``count`` live gateway processes."""
        self.live = max(1, count)

    def seen(self, name: str, level: float) -> None:
        """Redis reported ``level`` for ``name``'s bucket."""
        last = self._last
        if len(last) >= MAX_REMEMBERED and name not in last:
            for old in list(last)[: MAX_REMEMBERED // 2]:
                del last[old]
        last[name] = level

    def begin(self) -> None:
        """An outage starts: every share is made afresh, empty until the outage is confirmed."""
        self.buckets.clear()
        self._started.clear()
        self._held.clear()
        self.confirmed = False

    def confirm(self) -> None:
        """The outage is everyone's: each share gets its part of the level Redis last reported."""
        self.confirmed = True
        held, self._held = self._held, {}
        for name, (level, capacity, rate) in held.items():
            if name in self._started:
                bucket = self.buckets.peek(name, capacity, rate)
                bucket.level = min(bucket.level + level, capacity)
                self.buckets.change(name, capacity, rate)

    def _share(self, name: str, capacity: int, rate: float) -> Tuple[float, float]:
        """This process's capacity and rate for ``name``; its bucket made on first use in an outage."""
        n = max(1, self.live)
        share_capacity, share_rate = capacity / n, rate / n
        if name not in self._started:
            self._started[name] = True
            self.buckets.forget(name)
            bucket = self.buckets.bucket(name, share_capacity, share_rate)
            start = min(self._last.get(name, float(capacity)), float(capacity)) / n
            if not self.confirmed and start > 0:
                self._held[name] = (start, share_capacity, share_rate)
                start = 0.0
            if start < share_capacity:
                bucket.level = start
                self.buckets.change(name, share_capacity, share_rate)  # refilled from now on
        return share_capacity, share_rate

    def take(self, name: str, capacity: int, rate: float) -> Verdict:
        """Spend one token of this process's share."""
        share_capacity, share_rate = self._share(name, capacity, rate)
        bucket = self.buckets.take(name, share_capacity, share_rate)
        if bucket is None:
            return False, self.buckets.peek(name, share_capacity, share_rate)
        spent = self._spent.get(name)
        self._spent[name] = (spent[0] + 1 if spent else 1, capacity, rate)
        return True, bucket

    def peek(self, name: str, capacity: int, rate: float) -> Bucket:
        """This process's share of the bucket, without spending."""
        return self.buckets.peek(name, *self._share(name, capacity, rate))

    def late(self, name: str, capacity: int, rate: float, taken: bool, admitted_here: bool) -> None:
        """Redis answered a call that had timed out, which this fallback decided meanwhile.

        A token Redis took for a request admitted here too is one token, not
        two: it is not charged again.  One Redis took for a request refused
        here was spent all the same: this share loses it (its level may go
        below zero, and refills from there).
        """
        if not taken:
            return
        spent = self._spent.get(name)
        if admitted_here:
            if spent and spent[0] > 0:
                self._spent[name] = (spent[0] - 1, spent[1], spent[2])
            return
        share_capacity, share_rate = self._share(name, capacity, rate)
        bucket = self.buckets.peek(name, share_capacity, share_rate)
        bucket.level = max(bucket.level - 1.0, -share_capacity)
        self.buckets.change(name, share_capacity, share_rate)  # refilled from there

    def forget(self, name: str) -> None:
        """The user was deleted, or its limits changed: its share is made afresh."""
        self.buckets.forget(name)
        self._started.pop(name, None)
        self._held.pop(name, None)

    def restore(self, charges: Iterable[Tuple[str, Spent]]) -> None:
        """Charges taken by :meth:`end` that did not reach Redis: still to be charged."""
        for name, (count, capacity, rate) in charges:
            spent = self._spent.get(name)
            self._spent[name] = (count + (spent[0] if spent else 0), capacity, rate)

    def end(self) -> Dict[str, Spent]:
        """The outage is over: the tokens spent meanwhile (and the limits), by user, to charge to Redis."""
        spent = {name: entry for name, entry in self._spent.items() if entry[0] > 0}
        self._spent = {}
        return spent
