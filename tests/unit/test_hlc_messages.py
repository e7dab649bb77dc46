"""Hybrid logical clock and write validation."""

from __future__ import annotations

import json

import pytest

from gradesvc.hlc import HybridLogicalClock, physical_seconds
from gradesvc.messages import INT64_MAX, INT64_MIN, InvalidWrite, Write, WriteMessage, parse_write


def test_hlc_monotonic_when_wall_clock_stalls_or_goes_back() -> None:
    now = [1000.0]
    clock = HybridLogicalClock(lambda: now[0])
    a = clock.now()
    b = clock.now()
    now[0] = 999.0
    c = clock.now()
    assert a < b < c
    assert physical_seconds(a) == 1000.0


def test_hlc_observe_orders_later_writes_after_remote_ones() -> None:
    clock = HybridLogicalClock(lambda: 1.0)
    remote = HybridLogicalClock(lambda: 500.0).now()
    clock.observe(remote)
    assert clock.now() > remote


@pytest.mark.parametrize(
    "body, error",
    [
        ({}, "user_id must be a non-empty string"),
        ({"user_id": ""}, "user_id must be a non-empty string"),
        ({"user_id": 1}, "user_id must be a non-empty string"),
        ({"user_id": "1", "spp": 1.5}, "spp must be an integer"),
        ({"user_id": "1", "spp": True}, "spp must be an integer"),
        ({"user_id": "1", "spp": "3"}, "spp must be an integer"),
        ({"user_id": "1", "spp": None}, "spp must be an integer"),
        ({"user_id": "1", "spp": INT64_MAX + 1}, "outside the signed 64-bit range"),
        ({"user_id": "1", "spp": INT64_MIN - 1}, "outside the signed 64-bit range"),
        ({"user_id": "1", "bonus": 1}, "unknown field(s): bonus"),
        ({"user_id": "x" * 1025}, "longer than"),
    ],
)
def test_invalid_writes(body: dict, error: str) -> None:
    with pytest.raises(InvalidWrite, match=error.replace("(", r"\(").replace(")", r"\)")):
        parse_write(body)


def test_valid_partial_write_and_limits() -> None:
    write = parse_write({"user_id": "é 1", "spp": INT64_MIN, "return_fee": 0})
    assert write == Write("é 1", {"spp": INT64_MIN, "return_fee": 0})


def test_message_round_trip_and_rejects_garbage() -> None:
    message = WriteMessage("a", 42, Write("u,\"1", {"spp": 3}))
    assert WriteMessage.decode(message.encode()) == message
    assert message.message_id == "a:42"
    for bad in (b"[]", b"{}", json.dumps({"replica": "a", "ts": 0}).encode(), b"\xff"):
        with pytest.raises(ValueError):
            WriteMessage.decode(bad)
