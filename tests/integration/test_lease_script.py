"""The lease script, run by a real ``redis-server`` with its clock given, under a model of gateway processes.

Each modelled process asks for blocks, spends them (only before its own
end of the lease: asked + length - margin), reports, gives back, loses
answers (a timeout: Redis ran the call, the process never read it), and
Redis loses its data (a new replication id; the processes' blocks of the
old one are still spent until their end).  After every step: ``b + O <= C``
in Redis, ``O`` is the sum of the leases, no process holds more unspent
tokens than Redis counts for it, and no window of the admissions so far
holds more than ``C + R*t`` of them.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.redis import RedisServer, RespClient
from lbsvc.limits.leases import margin
from lbsvc.limits.leasescript import ANSWERS, EPOCH_KEY, KEY_PREFIX, SCRIPT

pytestmark = pytest.mark.integration

C, R, L = 40, 4.0, 2.0  # R*L well below C: a token counted twice would show in a window
KEY = KEY_PREFIX + "user"


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RespClient]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    client = server.client()
    yield client
    client.close()
    server.stop()


class Process:
    """A gateway process's view of its lease of the one user."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lease_id = ""
        self.unspent = 0
        self.spent = 0
        self.end = 0.0
        self.epoch = ""
        """The replication id of the Redis that granted the lease."""


class World:
    """Redis's clock, the processes, and every admission's time."""

    def __init__(self, redis: RespClient, processes: int) -> None:
        self.redis = redis
        self.now = 1000.0
        self.replid, self.previous = "epoch-0", ""
        self.processes = [Process(f"p{n}") for n in range(processes)]
        self.admissions: List[float] = []
        redis.call("FLUSHALL")

    def call(self, process: Process, want: int, give_back: bool = False, read: bool = True,
             charge: int = 0) -> List[Any]:
        if give_back or self.now >= process.end:
            process.unspent = 0
        keep = process.unspent
        share = math.ceil(C / len(self.processes))
        args = [self.replid, self.previous, process.name, repr(L), repr(self.now),
                C, repr(R), want, process.lease_id, process.spent, keep, share, charge]
        answer: List[Any] = self.redis.call("EVAL", SCRIPT, 2, EPOCH_KEY, KEY, *args)
        assert len(answer) == ANSWERS
        if read:
            granted, _, lease_id, kept, _ = int(answer[0]), answer[1], answer[2] or "", int(answer[3]), answer[4]
            if lease_id != process.lease_id:
                process.lease_id, process.unspent, process.spent = lease_id, 0, 0
                process.epoch = self.replid
            elif kept < keep:
                process.unspent -= keep - kept
            process.unspent += granted
            if lease_id:
                process.end = self.now + L - margin(L)
        return answer

    def spend(self, process: Process, count: int) -> None:
        for _ in range(count):
            if process.unspent > 0 and self.now < process.end:
                process.unspent -= 1
                process.spent += 1
                self.admissions.append(self.now)

    def restart(self) -> None:
        """Redis loses everything and comes back with a new replication id."""
        self.redis.call("FLUSHALL")
        number = int(self.replid.split("-")[1]) + 1
        self.previous, self.replid = self.replid, f"epoch-{number}"

    def check(self) -> None:
        raw = self.redis.call("HGETALL", KEY)
        fields = dict(zip(raw[::2], raw[1::2]))
        if fields:
            b, outstanding = float(fields["b"]), float(fields["O"])
            held = {k[2:]: float(v) for k, v in fields.items() if k.startswith("h:")}
            assert outstanding == pytest.approx(sum(held.values()))
            assert b + outstanding <= C + 1e-9, fields
        else:
            held = {}
        for process in self.processes:  # what a process may still spend, Redis counts as out on lease to it
            if process.unspent and self.now < process.end and process.epoch == self.replid:
                assert fields.get("i:" + process.name) == process.lease_id, (process.name, fields)
                assert process.unspent <= held.get(process.name, 0), (process.name, fields)
        times = self.admissions
        for i in range(len(times)):
            for j in range(i, len(times)):
                assert j - i + 1 <= C + R * (times[j] - times[i]) + 1e-9, (times[i], times[j], j - i + 1)


Step = Tuple[str, int, int]
steps = st.lists(st.one_of(
    st.tuples(st.just("ask"), st.integers(0, 2), st.integers(0, 30)),
    st.tuples(st.just("spend"), st.integers(0, 2), st.integers(1, 30)),
    st.tuples(st.just("advance"), st.just(0), st.integers(1, 2000)),
    st.tuples(st.just("give back"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("unread"), st.integers(0, 2), st.integers(0, 30)),
    st.tuples(st.just("charge"), st.integers(0, 2), st.integers(1, 10)),
    st.tuples(st.just("restart"), st.just(0), st.just(0)),
), min_size=1, max_size=40)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=steps)
def test_the_bound_holds_under_any_interleaving(redis: RespClient, steps: List[Step]) -> None:
    world = World(redis, 3)
    for kind, who, amount in steps:
        process = world.processes[who]  # (unused by "advance" and "restart")
        if kind == "ask":
            world.call(process, amount)
        elif kind == "spend":
            world.spend(process, amount)
        elif kind == "advance":
            world.now += amount / 1000
        elif kind == "give back":
            world.call(process, 0, give_back=True)
        elif kind == "unread":
            world.call(process, amount, read=False)
        elif kind == "charge":
            world.call(process, 0, charge=amount)
        else:
            world.restart()
        world.check()


def test_a_first_start_is_full_and_a_lost_state_starts_empty(redis: RespClient) -> None:
    world = World(redis, 2)
    a, b = world.processes
    assert int(world.call(a, 10)[0]) == 10  # a first start: the user's bucket is full
    world.restart()
    world.now += 0.1
    answer = world.call(b, 10)
    assert int(answer[0]) == 0 and float(answer[1]) == 0  # Redis lost its data: empty ...
    assert int(world.call(a, 10)[4]) == 1  # ... and a's lease of the lost state is gone (a says so)
    world.now += L + 0.5  # ... refilling from one lease length after the new epoch began (its first call), at R
    assert float(world.call(b, 0)[1]) == pytest.approx(R * 0.5, abs=1e-6)


def test_what_a_fallback_spent_of_a_lost_state_is_not_charged_to_the_epoch_that_starts_empty(
        redis: RespClient) -> None:
    """A charge within one lease length of an empty epoch's start is dropped (the empty start counts what the
    outage spent; charged, it would deny the user for up to C/R seconds more); after that, or in an epoch that
    started full, it is a debt as in any outage."""
    world = World(redis, 2)
    a, b = world.processes
    world.call(a, 0, charge=C)  # the first start: users start full, and a charge counts
    assert float(world.call(b, 0)[1]) == pytest.approx(0, abs=1e-6)
    world.restart()
    world.now += 0.5
    world.call(a, 0, charge=C)  # the epoch began with this call: dropped
    world.now += L - 0.01
    world.call(b, 0, charge=C)  # still within one lease length of its start: dropped
    world.now += 0.51
    assert float(world.call(a, 0)[1]) == pytest.approx(R * 0.5, abs=1e-6)  # refilling from the start plus L
    answer = world.call(b, 0, charge=C)  # after it: a debt
    assert float(answer[1]) == pytest.approx(R * 0.5 - C, abs=1e-6)


def test_leases_end_by_redis_clock_and_what_a_dead_process_held_comes_back_by_refill(redis: RespClient) -> None:
    world = World(redis, 2)
    a, b = world.processes
    assert int(world.call(a, C // 2)[0]) == C // 2  # a holds its share, and so does b: nothing is free
    assert int(world.call(b, C // 2)[0]) == C // 2
    world.spend(b, C // 2)
    world.now += 1.0  # a dies holding its share; b reports what it spent, and asks again
    answer = world.call(b, 10)
    assert float(answer[1]) == pytest.approx(0) and int(answer[0]) == 0  # refill capped at C - O: 0
    world.now += L  # a's lease has ended by Redis's clock: its tokens leave O, none of them back to b
    answer = world.call(b, 5)
    assert int(answer[0]) == 5 and float(answer[1]) == pytest.approx(R * L - 5)


def test_a_report_sent_twice_is_counted_once_and_a_grant_never_read_comes_back(redis: RespClient) -> None:
    world = World(redis, 1)
    (a,) = world.processes
    world.call(a, 10)
    world.spend(a, 4)
    world.call(a, 0)
    world.call(a, 0)  # the same running total again
    fields = redis.call("HGETALL", KEY)
    assert dict(zip(fields[::2], fields[1::2]))["h:p0"] == "6"
    world.call(a, 5, read=False)  # granted 5 more, but the answer was lost
    answer = world.call(a, 0)  # a keeps its 6: the 5 it never read go back to b
    assert int(answer[3]) == 6
    fields = redis.call("HGETALL", KEY)
    assert dict(zip(fields[::2], fields[1::2]))["h:p0"] == "6"
