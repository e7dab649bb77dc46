"""Write validation and the stream message."""

from __future__ import annotations

import json

import pytest

from gradesvc.stream.amqp import properties_of
from gradesvc.stream.messages import INT64_MAX, INT64_MIN, InvalidWrite, Write, WriteMessage, outgoing, parse_write


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
    message = WriteMessage("a", "w42", 1_800_000_000_123, Write("u,\"1", {"spp": 3}))
    assert WriteMessage.decode(message.encode()) == message
    assert message.message_id == "a:w42"
    props = properties_of(outgoing(message))
    assert (props.timestamp, props.type, props.message_id) == (1_800_000_000, "write", "a:w42")
    for bad in (b"[]", b"{}", json.dumps({"replica": "a", "id": ""}).encode(), b"\xff",
                json.dumps({"replica": "a", "id": "x", "user_id": "u", "patch": []}).encode(),
                json.dumps({"replica": "a", "id": "x", "at": 1.5, "user_id": "u"}).encode()):
        with pytest.raises(ValueError):
            WriteMessage.decode(bad)


def test_messages_of_the_previous_release_are_still_writes() -> None:
    body = json.dumps({"replica": "a", "ts": (1_800_000_000_123 << 16) | 5, "user_id": "u", "patch": {"spp": 1}})
    message = WriteMessage.decode(body.encode())
    assert (message.replica, message.written_at, message.write) == ("a", 1_800_000_000_123, Write("u", {"spp": 1}))
