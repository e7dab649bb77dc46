"""What a write is: validating ``POST /set`` bodies and the stream message.

A message on the stream is UTF-8 JSON ``{"replica": ..., "id": ..., "at": ...,
"user_id": ..., "patch": {...}}``: one partial write.  Its version is the
offset the stream gives it; every replica, the writer included, applies it
when it consumes it.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Tuple

import attrs
import pika

from gradesvc.state.store import FIELDS

WRITE_TYPE = "write"
MARKER_TYPE = "sync-marker"
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_USER_ID_LENGTH = 1024


class InvalidWrite(ValueError):
    """A write body that breaks the rules of contract section 2.3."""


@attrs.frozen
class Write:
    """One partial write of one user's grade."""

    user_id: str
    patch: Mapping[str, int]


@attrs.frozen
class WriteMessage:
    """A write as carried by the stream.

    ``write_id`` is unique per write (the writer waits for its own message by
    it); ``written_at`` is the writer's wall clock in milliseconds, used only
    to measure replication delay, never to order anything.
    """

    replica: str
    write_id: str
    written_at: int
    write: Write

    def encode(self) -> bytes:
        """The message body."""
        return json.dumps(
            {
                "replica": self.replica,
                "id": self.write_id,
                "at": self.written_at,
                "user_id": self.write.user_id,
                "patch": dict(self.write.patch),
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")

    @property
    def message_id(self) -> str:
        """A unique id of this write: replica and write id."""
        return f"{self.replica}:{self.write_id}"

    @classmethod
    def decode(cls, body: bytes) -> WriteMessage:
        """Parse and validate a message body (``ValueError`` when malformed)."""
        obj = json.loads(body.decode("utf-8"))
        if not isinstance(obj, dict):
            raise ValueError("message is not an object")
        replica, write_id, written_at = obj.get("replica"), obj.get("id"), obj.get("at", 0)
        stamp = obj.get("ts")
        if write_id is None and isinstance(stamp, int) and not isinstance(stamp, bool):
            # Written by the release before this one (hybrid-logical-clock
            # stamped): still a write; its stream offset is its version too.
            write_id, written_at = f"hlc-{stamp}", stamp >> 16
        if not isinstance(replica, str) or not replica:
            raise ValueError("message has no replica")
        if not isinstance(write_id, str) or not write_id:
            raise ValueError("message has no id")
        if not isinstance(written_at, int) or isinstance(written_at, bool):
            raise ValueError("message has a bad time")
        patch = obj.get("patch", {})
        if not isinstance(patch, dict):
            raise ValueError("message has a bad patch")
        write = parse_write({"user_id": obj.get("user_id"), **patch})
        return cls(replica, write_id, written_at, write)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_write(body: Dict[str, Any]) -> Write:
    """Validate a ``POST /set`` object; raise :class:`InvalidWrite` saying why."""
    unknown = sorted(set(body) - {"user_id", *FIELDS})
    if unknown:
        raise InvalidWrite(f"unknown field(s): {', '.join(unknown)}")
    user_id = body.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        raise InvalidWrite("user_id must be a non-empty string")
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise InvalidWrite(f"user_id longer than {MAX_USER_ID_LENGTH} characters")
    patch: Dict[str, int] = {}
    for name in FIELDS:
        if name not in body:
            continue
        value = body[name]
        if not _is_int(value):
            raise InvalidWrite(f"{name} must be an integer")
        if not INT64_MIN <= value <= INT64_MAX:
            raise InvalidWrite(f"{name} is outside the signed 64-bit range")
        patch[name] = value
    return Write(user_id, patch)


def write_properties(message: WriteMessage) -> pika.BasicProperties:
    """AMQP properties of a write message."""
    return pika.BasicProperties(
        app_id=message.replica,
        message_id=message.message_id,
        content_type="application/json",
        type=WRITE_TYPE,
        timestamp=message.written_at // 1000,
        delivery_mode=2,
    )


def marker_message(replica: str, nonce: str) -> Tuple[bytes, pika.BasicProperties]:
    """Body and properties of a sync marker: a message only its publisher waits for."""
    body = json.dumps({"replica": replica, "marker": nonce}).encode()
    return body, pika.BasicProperties(
        app_id=replica,
        message_id=f"{replica}:marker:{nonce}",
        content_type="application/json",
        type=MARKER_TYPE,
        delivery_mode=2,
    )
