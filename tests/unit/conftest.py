"""Unit tests leave nothing on the global reactor (trial's clean-reactor discipline).

A unit test that builds a real ``HTTPChannel`` on a ``StringTransport`` arms its
idle timeout on the global reactor; left there, it fires whenever a later test
runs the reactor (pytest-twisted, an integration test) and logs an error that
test never made.  Every delayed call a unit test leaves on the global reactor
is cancelled after it.
"""

from __future__ import annotations

from typing import Iterator

import pytest
from twisted.internet import reactor


@pytest.fixture(autouse=True)
def no_delayed_calls_left_behind() -> Iterator[None]:
    before = set(reactor.getDelayedCalls())  # type: ignore[attr-defined]
    yield
    for call in reactor.getDelayedCalls():  # type: ignore[attr-defined]
        if call not in before and call.active():
            call.cancel()
