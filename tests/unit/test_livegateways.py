"""Live gateways: the heartbeat in the user database, judged by this process's clock; memory buckets told."""

from __future__ import annotations

import sqlite3
from typing import Any, Callable, Dict, List

from twisted.internet import defer, task
from twisted.logger import LogLevel, globalLogPublisher
from zope.interface import implementer

from lbsvc.limits.livegateways import DEADLINE, FORGET, INTERVAL, TTL, BeatWatch, DatabaseHeartbeat, IHeartbeat, LiveGateways
from lbsvc.limits.memorylimits import PerProcessLimits
from lbsvc.users.sqlite import SQLiteDatabase


def test_a_counter_counts_while_it_moves_by_this_clock() -> None:
    watch = BeatWatch()
    # First sight: a row left by a killed gateway looks the same as a live one's, so neither counts yet.
    assert watch.observe([("me", 1), ("b", 7)], 0.0, "me") == (1, [])
    assert watch.observe([("me", 2), ("b", 8)], 1.0, "me") == (2, [])  # b moved: live
    assert watch.observe([("me", 3), ("b", 8)], TTL + 0.9, "me") == (2, [])  # within TTL of its move
    assert watch.observe([("me", 4), ("b", 8)], TTL + 1.0, "me") == (1, [])  # silent for TTL: gone
    # Long silent rows are handed back for deletion; a row that disappeared is forgotten.
    assert watch.observe([("me", 5), ("b", 8)], 1.0 + FORGET, "me") == (1, [("b", 8)])
    assert watch.observe([("me", 6)], 2.0 + FORGET, "me") == (1, [])
    assert watch.observe([("me", 7), ("b", 9)], 3.0 + FORGET, "me") == (1, [])  # back: first sight again


def test_a_row_never_seen_moving_is_deleted_after_forget() -> None:
    watch = BeatWatch()
    watch.observe([("ghost", 3)], 0.0, "me")
    assert watch.observe([("ghost", 3)], FORGET - 0.1, "me") == (1, [])
    assert watch.observe([("ghost", 3)], FORGET, "me") == (1, [("ghost", 3)])


class InlinePool:
    """adbapi's ``runInteraction`` and ``runOperation``, run at once on one SQLite connection."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def runInteraction(self, work: Callable[[Any], Any]) -> defer.Deferred[Any]:
        cursor = self.connection.cursor()
        result = work(cursor)
        self.connection.commit()
        return defer.succeed(result)

    def runOperation(self, statement: str, args: Any) -> defer.Deferred[None]:
        self.connection.execute(statement, args)
        self.connection.commit()
        return defer.succeed(None)


def sqlite_heartbeat(path: str, clock: task.Clock) -> DatabaseHeartbeat:
    database = SQLiteDatabase(path)
    database.pool.close()
    connection = sqlite3.connect(path)
    database.migrate(connection.cursor())
    connection.commit()
    database.pool = InlinePool(connection)
    return DatabaseHeartbeat(database, clock)


def counted(d: defer.Deferred[int]) -> int:
    results: List[int] = []
    d.addCallback(results.append)
    assert len(results) == 1
    return results[0]


def test_two_gateways_on_one_sqlite_file_see_each_other_and_forget_the_dead(tmp_path: Any) -> None:
    clock = task.Clock()
    path = str(tmp_path / "users.sqlite3")
    a, b = sqlite_heartbeat(path, clock), sqlite_heartbeat(path, clock)
    assert counted(a.beat("a")) == 1
    assert counted(b.beat("b")) == 1  # a seen for the first time: not counted yet
    clock.advance(INTERVAL)
    assert counted(a.beat("a")) == 1  # b seen for the first time
    assert counted(b.beat("b")) == 2  # a moved since b first saw it
    clock.advance(INTERVAL)
    assert counted(a.beat("a")) == 2
    # b dies without leaving (SIGKILL): its row stays, but stops moving.
    for _ in range(int(TTL / INTERVAL)):
        clock.advance(INTERVAL)
        last = counted(a.beat("a"))
    assert last == 1
    # After FORGET seconds a deletes the dead row (unless it moved again meanwhile).
    clock.advance(FORGET)
    counted(a.beat("a"))
    counted(a.beat("a"))
    rows = sqlite3.connect(path).execute("SELECT id FROM lbsvc_gateways").fetchall()
    assert rows == [("a",)]
    counted(a.leave("a"))  # type: ignore[arg-type]
    assert sqlite3.connect(path).execute("SELECT count(*) FROM lbsvc_gateways").fetchone() == (0,)


class StuckPool:
    """A database that takes every interaction and answers only when told."""

    def __init__(self) -> None:
        self.pending: List[defer.Deferred[Any]] = []

    def runInteraction(self, work: Callable[[Any], Any]) -> defer.Deferred[Any]:
        self.pending.append(defer.Deferred())
        return self.pending[-1]


def test_beats_do_not_pile_up_behind_a_stuck_database(tmp_path: Any) -> None:
    clock = task.Clock()
    heartbeat = sqlite_heartbeat(str(tmp_path / "users.sqlite3"), clock)
    pool = StuckPool()
    heartbeat.database.pool = pool
    failures: List[Any] = []
    heartbeat.beat("a").addErrback(failures.append)
    clock.advance(DEADLINE)  # given up on; the interaction still runs
    heartbeat.beat("a").addErrback(failures.append)  # not queued behind it
    assert len(failures) == 2 and len(pool.pending) == 1
    pool.pending[0].callback([("a", 1)])  # the database answers at last: a late answer is dropped
    heartbeat.beat("a")
    assert len(pool.pending) == 2


@implementer(IHeartbeat)
class ScriptedHeartbeat:
    def __init__(self) -> None:
        self.answers: List[Any] = []
        self.left: List[str] = []

    def beat(self, member: str) -> defer.Deferred[int]:
        answer = self.answers.pop(0)
        return defer.fail(answer) if isinstance(answer, Exception) else defer.succeed(answer)

    def leave(self, member: str) -> defer.Deferred[None]:
        self.left.append(member)
        return defer.fail(ConnectionError("gone"))  # best effort: a failure is swallowed


def test_the_service_beats_each_interval_and_keeps_its_count_through_a_failure() -> None:
    clock = task.Clock()
    heartbeat = ScriptedHeartbeat()
    heartbeat.answers = [2, ConnectionError("Redis is not connected"), 0]
    seen: List[int] = []
    live = LiveGateways(heartbeat, clock, on_count=seen.append)
    live.startService()
    assert live.count == 2
    clock.advance(INTERVAL)
    assert live.count == 2  # a failed beat changes nothing
    clock.advance(INTERVAL)
    assert live.count == 1 and seen == [2, 1]  # never fewer than this process
    d = live.stopService()
    assert heartbeat.left == [live.id] and counted(d.addCallback(lambda _: 0)) == 0


def test_memory_buckets_beside_others_warn_once_and_note_it() -> None:
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        limits = PerProcessLimits()
        assert limits.report() == {"buckets": "memory", "mode": "memory", "gateways": 1}
        limits.counted(2)
        limits.counted(3)
        report = limits.report()
        assert limits.multiplied and report["gateways"] == 3 and "3 times its limit" in report["note"]
        limits.counted(1)
        assert "note" not in limits.report() and not limits.multiplied
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_level") is LogLevel.warn]
    assert len(warnings) == 1 and warnings[0]["gateways"] == 2
