"""What a write is: validating ``POST /set`` bodies and the messages on the stream.

Three kinds of message travel on the stream, each UTF-8 JSON:

* ``write``: ``{"replica", "id", "at", "user_id", "patch": {...}}``, one
  partial write;
* ``write-batch``: ``{"replica", "id", "at", "writes": [{"user_id", "patch"},
  ...]}``, a bulk ``/set``: one message, so it has one offset and is applied in
  one step everywhere, whichever protocol carried it (replicas of the release
  before it skip it as malformed: upgrade them all before sending arrays);
* ``sync-marker``: ``{"replica", "marker"}``, which only its publisher waits for.

A message's version is the offset the stream gives it; every replica, the
writer included, applies it when it consumes it.  The kind travels as the
AMQP 0.9.1 ``type`` property, or the application property ``x-basic-type``
on the stream protocol (the same thing once stored).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import attrs

from gradesvc.state.store import FIELDS
from gradesvc.stream.link import Outgoing

WRITE_TYPE = "write"
BATCH_TYPE = "write-batch"
MARKER_TYPE = "sync-marker"
MAX_BATCH = 10_000
"""Elements of one bulk ``/set``."""
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


@attrs.frozen
class WriteBatch:
    """A bulk write as carried by the stream: many partial writes, one message, one offset."""

    replica: str
    write_id: str
    written_at: int
    writes: Tuple[Write, ...]

    def encode(self) -> bytes:
        """The message body."""
        return json.dumps(
            {"replica": self.replica, "id": self.write_id, "at": self.written_at,
             "writes": [{"user_id": w.user_id, "patch": dict(w.patch)} for w in self.writes]},
            separators=(",", ":"), ensure_ascii=False,
        ).encode("utf-8")

    @property
    def message_id(self) -> str:
        """A unique id of this batch: replica and write id."""
        return f"{self.replica}:{self.write_id}"

    def merged(self) -> Dict[str, Dict[str, int]]:
        """Each user's patches merged in array order (a later element's field wins): what one offset
        applies."""
        merged: Dict[str, Dict[str, int]] = {}
        for write in self.writes:
            merged.setdefault(write.user_id, {}).update(write.patch)
        return merged

    @classmethod
    def decode(cls, body: bytes) -> WriteBatch:
        """Parse and validate a batch body (``ValueError`` when malformed)."""
        obj = json.loads(body.decode("utf-8"))
        if not isinstance(obj, dict):
            raise ValueError("batch is not an object")
        replica, write_id, written_at, writes = obj.get("replica"), obj.get("id"), obj.get("at", 0), obj.get("writes")
        if not isinstance(replica, str) or not replica:
            raise ValueError("batch has no replica")
        if not isinstance(write_id, str) or not write_id:
            raise ValueError("batch has no id")
        if not _is_int(written_at):
            raise ValueError("batch has a bad time")
        if not isinstance(writes, list) or not 0 < len(writes) <= MAX_BATCH:
            raise ValueError("batch has no writes")
        parsed: List[Write] = []
        for item in writes:
            if not isinstance(item, dict) or not isinstance(item.get("patch", {}), dict):
                raise ValueError("batch has a bad write")
            parsed.append(parse_write({"user_id": item.get("user_id"), **item.get("patch", {})}))
        return cls(replica, write_id, written_at, tuple(parsed))


def parse_writes(body: Any) -> Tuple[Write, ...]:
    """The writes of a ``POST /set`` body: one object, or an array of 1 to :data:`MAX_BATCH` objects.

    Raises :class:`InvalidWrite` saying why (for an array, which element).
    """
    if isinstance(body, dict):
        return (parse_write(body),)
    if not isinstance(body, list):
        raise InvalidWrite("body must be a JSON object or an array of them")
    if not 0 < len(body) <= MAX_BATCH:
        raise InvalidWrite(f"an array of writes holds 1 to {MAX_BATCH} elements, not {len(body)}")
    writes = []
    for index, element in enumerate(body):
        if not isinstance(element, dict):
            raise InvalidWrite(f"element {index}: not a JSON object")
        try:
            writes.append(parse_write(element))
        except InvalidWrite as e:
            raise InvalidWrite(f"element {index}: {e}") from None
    return tuple(writes)


def outgoing(message: WriteMessage | WriteBatch) -> Outgoing:
    """A write or a batch, ready to publish."""
    kind = BATCH_TYPE if isinstance(message, WriteBatch) else WRITE_TYPE
    return Outgoing(kind, message.encode(), message.replica, message.message_id, message.written_at)


def marker_message(replica: str, nonce: str) -> Outgoing:
    """A sync marker: a message only its publisher waits for."""
    body = json.dumps({"replica": replica, "marker": nonce}).encode()
    return Outgoing(MARKER_TYPE, body, replica, f"{replica}:marker:{nonce}")


def batch_of(replica: str, write_id: str, written_at: int, writes: Sequence[Write]) -> WriteMessage | WriteBatch:
    """One write as a ``write`` message, several as one ``write-batch``."""
    if len(writes) == 1:
        return WriteMessage(replica, write_id, written_at, writes[0])
    return WriteBatch(replica, write_id, written_at, tuple(writes))
