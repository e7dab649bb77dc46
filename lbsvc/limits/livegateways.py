"""How many gateway processes are live: a heartbeat in Redis or in the user database.

Every gateway process (each ``--workers`` process too) beats every
:data:`INTERVAL` seconds and reads back how many gateways are live; no
gateway's clock is trusted by another.  Two places keep the beats:

* :class:`RedisHeartbeat` (``--buckets redis://``): a sorted set scored by the
  Redis server's own clock (``TIME``), members not seen for :data:`TTL`
  seconds dropped, all in one script.  The count is what the ``local``
  fallback divides each user's budget by (:mod:`lbsvc.limits.fallbackshare`); while
  Redis cannot be asked it keeps its last value, which is the count of the
  gateways that lost Redis with it.
* :class:`DatabaseHeartbeat` (memory buckets): a counter per gateway in the
  user database's ``lbsvc_gateways`` table.  A gateway is live while this
  process sees its counter move: within :data:`TTL` seconds of this
  process's own monotonic clock, so neither the database's clock nor the
  other gateway's is read.  Used to tell the operator that memory buckets on
  a shared user database multiply a user's limit (:mod:`lbsvc.limits.memorylimits`).
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attrs
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from lbsvc.users.database import IUserDatabase
from svckit.deadlines import within

log = Logger()

KEY = "lbsvc:gateways"
INTERVAL = 1.0
TTL = 3.0
"""Seconds without a beat after which a gateway no longer counts."""
FORGET = 60.0
"""Seconds after which the database row of a gateway that stopped beating is deleted."""
DEADLINE = 1.5
"""Seconds a database beat may take."""
SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000))
return redis.call('ZCARD', KEYS[1])
"""


class IHeartbeat(Interface):
    """Where gateways beat, and how many are live."""

    def beat(member: str) -> defer.Deferred[int]:
        """Record a beat of ``member``; the live gateways, ``member`` included."""

    def leave(member: str) -> defer.Deferred[None]:
        """Remove ``member`` now (best effort: it stops counting after :data:`TTL` anyway)."""


@implementer(IHeartbeat)
class RedisHeartbeat:
    """Beats in a Redis sorted set scored by Redis's clock."""

    def __init__(self, link: Any) -> None:
        self.link = link

    def beat(self, member: str) -> defer.Deferred[int]:
        """One script: add, drop the silent, count (as soon as Redis is connected, while it is not)."""
        d: defer.Deferred[Any] = self.link.connected()
        d.addCallback(lambda redis: redis.eval(SCRIPT, [KEY], [member, repr(TTL)]))
        return d.addCallback(int)

    def leave(self, member: str) -> defer.Deferred[None]:
        """``ZREM``."""
        redis = self.link.current()
        if redis is None:
            return defer.succeed(None)
        d: defer.Deferred[Any] = redis.execute_command("ZREM", KEY, member)
        return d.addCallback(lambda _: None)


@attrs.define
class _Sighting:
    beats: int
    first_seen: float
    moved_at: Optional[float] = None


class BeatWatch:
    """Which gateways' counters moved within :data:`TTL` seconds of this process's clock.

    A counter seen for the first time does not count until it moves: a row
    left by a gateway that was killed is never taken for a live one.
    """

    def __init__(self, ttl: float = TTL, forget: float = FORGET) -> None:
        self.ttl = ttl
        self.forget = forget
        self._seen: Dict[str, _Sighting] = {}

    def observe(self, rows: Sequence[Tuple[str, int]], now: float, me: str) -> Tuple[int, List[Tuple[str, int]]]:
        """The live gateways (``me`` included), and the rows silent for :data:`FORGET` seconds."""
        live = 1
        silent: List[Tuple[str, int]] = []
        seen: Dict[str, _Sighting] = {}
        for member, beats in rows:
            if member == me:
                continue
            sighting = self._seen.get(member)
            if sighting is None:
                sighting = _Sighting(beats, now)
            elif sighting.beats != beats:
                sighting.beats, sighting.moved_at = beats, now
            seen[member] = sighting
            last = sighting.moved_at if sighting.moved_at is not None else sighting.first_seen
            if sighting.moved_at is not None and now - sighting.moved_at < self.ttl:
                live += 1
            elif now - last >= self.forget:
                silent.append((member, beats))
        self._seen = seen
        return live, silent


@implementer(IHeartbeat)
class DatabaseHeartbeat:
    """Beats as counters in the user database (``lbsvc_gateways``), judged by this process's clock."""

    def __init__(self, database: IUserDatabase, clock: IReactorTime) -> None:
        self.database = database
        self.clock = clock
        self.watch = BeatWatch()
        self._silent: List[Tuple[str, int]] = []
        self._busy = False
        """A beat's interaction still runs in adbapi's thread (its caller may have given up on it)."""

    def beat(self, member: str) -> defer.Deferred[int]:
        """Count up this gateway's row, delete long-silent ones, read every counter.

        While a slow database still holds the previous beat, none is queued
        behind it: beats must not pile up in adbapi's queue during an outage.
        """
        if self._busy:
            return defer.fail(defer.TimeoutError("the previous heartbeat is still in the database's hands"))
        sql = self.database.sql
        silent = self._silent

        def work(cursor: Any) -> List[Tuple[str, int]]:
            cursor.execute(sql("UPDATE lbsvc_gateways SET beats = beats + 1 WHERE id = ?"), (member,))
            if cursor.rowcount == 0:
                cursor.execute(sql("INSERT INTO lbsvc_gateways (id, beats) VALUES (?, 1)"), (member,))
            for other, beats in silent:  # unchanged since judged silent: still gone
                cursor.execute(sql("DELETE FROM lbsvc_gateways WHERE id = ? AND beats = ?"), (other, beats))
            cursor.execute("SELECT id, beats FROM lbsvc_gateways")
            return [(str(row[0]), int(row[1])) for row in cursor.fetchall()]

        self._busy = True
        running: defer.Deferred[List[Tuple[str, int]]] = self.database.pool.runInteraction(work)

        def finished(result: Any) -> Any:
            self._busy = False
            return result

        d = within(running.addBoth(finished), DEADLINE, self.clock, "the user database")

        def counted(rows: List[Tuple[str, int]]) -> int:
            live, self._silent = self.watch.observe(rows, self.clock.seconds(), member)
            return live

        return d.addCallback(counted)

    def leave(self, member: str) -> defer.Deferred[None]:
        """Delete this gateway's row."""
        statement = self.database.sql("DELETE FROM lbsvc_gateways WHERE id = ?")
        d: defer.Deferred[Any] = self.database.pool.runOperation(statement, (member,))
        d.addTimeout(DEADLINE, self.clock)
        return d.addCallback(lambda _: None)


class LiveGateways(service.Service):
    """This process's heartbeat, and the number of live gateway processes it reads back."""

    def __init__(self, heartbeat: IHeartbeat, clock: IReactorTime,
                 on_count: Optional[Callable[[int], None]] = None) -> None:
        self.heartbeat = heartbeat
        self.id = uuid.uuid4().hex
        self.count = 1
        """Live gateway processes, this one included (1 until the heartbeat said otherwise)."""
        self.on_count = on_count
        self.loop = task.LoopingCall(self.beat)
        self.loop.clock = clock

    def startService(self) -> None:
        """Beat now and every :data:`INTERVAL` seconds."""
        super().startService()
        self.loop.start(INTERVAL, now=True)

    def stopService(self) -> defer.Deferred[None]:
        """Stop beating and leave."""
        super().stopService()
        if self.loop.running:
            self.loop.stop()
        return self.heartbeat.leave(self.id).addErrback(lambda _: None)

    def beat(self) -> defer.Deferred[None]:
        """One heartbeat; failures leave the count as it was."""

        def counted(count: int) -> None:
            number = max(1, count)
            if number != self.count:
                log.info("Live gateway processes: {count}", count=number)
            self.count = number
            if self.on_count is not None:
                self.on_count(number)

        def failed(reason: Failure) -> None:
            log.debug("Heartbeat not written: {error}", error=reason.getErrorMessage())

        return self.heartbeat.beat(self.id).addCallbacks(counted, failed)
