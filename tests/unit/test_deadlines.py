"""svckit.deadlines.within: a call given up on at its deadline, which goes on by itself."""

from __future__ import annotations

from typing import Any, List

from twisted.internet import defer
from twisted.internet.task import Clock

from svckit.deadlines import within


def outcome(d: defer.Deferred[Any]) -> List[Any]:
    out: List[Any] = []
    d.addBoth(out.append)
    return out


def test_an_answer_in_time_is_passed_on_and_stops_the_timer() -> None:
    clock, call = Clock(), defer.Deferred()
    got = outcome(within(call, 1.0, clock, "it"))
    call.callback("yes")
    assert got == ["yes"] and clock.getDelayedCalls() == []


def test_a_late_answer_is_a_timeout_and_the_call_goes_on() -> None:
    clock, call = Clock(), defer.Deferred()
    got = outcome(within(call, 1.0, clock, "the database"))
    clock.advance(0.999)
    assert got == []
    clock.advance(0.001)
    assert len(got) == 1 and got[0].check(defer.TimeoutError)
    assert "the database did not answer within 1.0s" in str(got[0].value)
    assert not call.called  # not cancelled: its holder may still see the result
    call.callback("late")
    assert len(got) == 1


def test_after_a_turn_the_clock_starts_when_the_reactor_next_looks() -> None:
    clock, call = Clock(), defer.Deferred()
    got = outcome(within(call, 1.0, clock, "Redis", after_a_turn=True))
    clock.advance(1.0)  # a busy reactor: its next turn comes a second later; only then does the clock start
    assert got == []
    clock.advance(0.999)
    assert got == []
    clock.advance(0.001)  # the deadline, and the one more look (a Clock runs both in one advance)
    assert len(got) == 1 and got[0].check(defer.TimeoutError)


def test_a_failure_in_time_is_passed_on() -> None:
    clock, call = Clock(), defer.Deferred()
    got = outcome(within(call, 1.0, clock, "it"))
    call.errback(ValueError("no"))
    assert len(got) == 1 and got[0].check(ValueError) and clock.getDelayedCalls() == []
