"""Supervised loops: a failure is logged, reported, and the loop restarts with back-off."""

from __future__ import annotations

from typing import List

from twisted.internet import task
from twisted.internet.task import Clock

from svckit.readiness import Readiness
from svckit.supervisor import Supervisor
from tests.conftest import LoggedErrors


def test_a_failing_loop_is_logged_reported_and_restarted(logged_errors: LoggedErrors) -> None:
    clock = Clock()
    readiness = Readiness()
    ticks: List[float] = []
    broken = [True, True, False]

    def tick() -> None:
        ticks.append(clock.seconds())
        if len(ticks) in (2, 3) and broken.pop(0):
            raise RuntimeError("tick failed")

    loop = task.LoopingCall(tick)
    supervisor = Supervisor.looping("refill", loop, 1.0, clock, on_failure=lambda n: readiness.fail(n),
                                    on_running=readiness.ok, initial_delay=0.5)
    supervisor.startService()
    assert readiness.ready
    clock.advance(1.0)  # the first tick works
    clock.advance(1.0)  # the second fails
    assert not readiness.ready and readiness.problems() == {"refill": "failed"}
    assert len(logged_errors.flush(RuntimeError)) == 1
    assert not loop.running
    clock.advance(0.5)  # restarted after 0.5 s
    assert loop.running and readiness.ready
    clock.advance(1.0)  # fails again: the next delay doubles
    assert len(logged_errors.flush(RuntimeError)) == 1
    assert supervisor.delay() == 1.0
    clock.advance(0.5)
    assert not loop.running
    clock.advance(0.5)
    assert loop.running and readiness.ready
    supervisor.stopService()
    assert not loop.running
    clock.advance(10)
    assert not loop.running


def test_restart_after_a_configuration_change_is_quiet(logged_errors: LoggedErrors) -> None:
    clock = Clock()
    intervals = [1.0]
    calls: List[float] = []
    loop = task.LoopingCall(lambda: calls.append(clock.seconds()))
    loop.clock = clock
    supervisor = Supervisor("checks", lambda: loop.start(intervals[0]), clock, stop=loop.stop)
    supervisor.startService()
    intervals[0] = 5.0
    supervisor.restart()
    assert loop.running and loop.interval == 5.0
    assert logged_errors.events == []
    supervisor.stopService()
