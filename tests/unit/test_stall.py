"""No silent stall: a phase without progress for 10 s is named on /ready, and warned about once."""

from __future__ import annotations

from typing import Any, Dict, List

from twisted.internet import task
from twisted.logger import LogLevel, globalLogPublisher

from gradesvc.state.phase import Phase, ReplicaStatus
from gradesvc.status.stall import StallWatch


def test_a_phase_without_progress_says_why_once() -> None:
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        said_why(events)
    finally:
        globalLogPublisher.removeObserver(events.append)


def said_why(events: List[Dict[str, Any]]) -> None:
    clock = task.Clock()
    status = ReplicaStatus(phase=Phase.CATCHING_UP, connected=True, applied_offset=5,
                           waiting_for="its sync marker")
    watch = StallWatch(status, clock, wall=lambda: 1_800_000_000.0 + clock.seconds())
    for _ in range(10):
        watch.check()
        clock.advance(1)
    assert status.stalled is None  # the last look was at 9 s: not yet
    watch.check()
    assert status.stalled is not None and status.stalled["waiting_for"] == "its sync marker"
    assert status.stalled["seconds"] == 10 and status.stalled["applied_offset"] == 5
    assert status.report()["stalled"] == status.stalled
    clock.advance(5)
    watch.check()
    warnings = [e for e in events if e.get("log_level") is LogLevel.warn and "No progress" in e["log_format"]]
    assert len(warnings) == 1  # once per episode
    status.applied_offset = 6  # progress: the episode ends
    watch.check()
    assert status.stalled is None and "stalled" not in status.report()


def test_ready_is_never_stalled() -> None:
    clock = task.Clock()
    status = ReplicaStatus(phase=Phase.READY, connected=True)
    watch = StallWatch(status, clock, wall=lambda: 0.0)
    for _ in range(30):
        watch.check()
        clock.advance(1)
    assert status.stalled is None
