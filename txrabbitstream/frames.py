"""The stream protocol's frames: built as bytes, cut from a byte stream, read back.

Every frame is ``Size:u32`` then ``Key:u16 Version:u16`` and the command's
content, big-endian (``deps/rabbitmq_stream/docs/PROTOCOL.adoc`` in
rabbitmq-server).  A key with the top bit set is a response.  The builders
here return whole frames (size prefix included) ready for
``transport.write``; :class:`FrameReader` cuts incoming bytes into frames,
however they were split by TCP; :class:`Reader` reads a frame's fields in
order.  Nothing here does I/O.
"""

from __future__ import annotations

import struct
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

# Command keys.
DECLARE_PUBLISHER = 0x0001
PUBLISH = 0x0002
PUBLISH_CONFIRM = 0x0003
PUBLISH_ERROR = 0x0004
QUERY_PUBLISHER_SEQUENCE = 0x0005
DELETE_PUBLISHER = 0x0006
SUBSCRIBE = 0x0007
DELIVER = 0x0008
CREDIT = 0x0009
UNSUBSCRIBE = 0x000C
CREATE = 0x000D
DELETE = 0x000E
METADATA = 0x000F
METADATA_UPDATE = 0x0010
PEER_PROPERTIES = 0x0011
SASL_HANDSHAKE = 0x0012
SASL_AUTHENTICATE = 0x0013
TUNE = 0x0014
OPEN = 0x0015
CLOSE = 0x0016
HEARTBEAT = 0x0017
RESPONSE = 0x8000

# Response codes.
OK = 0x01
STREAM_DOES_NOT_EXIST = 0x02
SUBSCRIPTION_ID_ALREADY_EXISTS = 0x03
SUBSCRIPTION_ID_DOES_NOT_EXIST = 0x04
STREAM_ALREADY_EXISTS = 0x05
STREAM_NOT_AVAILABLE = 0x06
SASL_MECHANISM_NOT_SUPPORTED = 0x07
AUTHENTICATION_FAILURE = 0x08
SASL_ERROR = 0x09
SASL_CHALLENGE = 0x0A
SASL_AUTHENTICATION_FAILURE_LOOPBACK = 0x0B
VIRTUAL_HOST_ACCESS_FAILURE = 0x0C
UNKNOWN_FRAME = 0x0D
FRAME_TOO_LARGE = 0x0E
INTERNAL_ERROR = 0x0F
ACCESS_REFUSED = 0x10
PRECONDITION_FAILED = 0x11
PUBLISHER_DOES_NOT_EXIST = 0x12

CODE_NAMES: Dict[int, str] = {
    OK: "ok", STREAM_DOES_NOT_EXIST: "stream does not exist",
    SUBSCRIPTION_ID_ALREADY_EXISTS: "subscription id already exists",
    SUBSCRIPTION_ID_DOES_NOT_EXIST: "subscription id does not exist", STREAM_ALREADY_EXISTS: "stream already exists",
    STREAM_NOT_AVAILABLE: "stream not available", SASL_MECHANISM_NOT_SUPPORTED: "SASL mechanism not supported",
    AUTHENTICATION_FAILURE: "authentication failure", SASL_ERROR: "SASL error", SASL_CHALLENGE: "SASL challenge",
    SASL_AUTHENTICATION_FAILURE_LOOPBACK: "SASL authentication failure (loopback only)",
    VIRTUAL_HOST_ACCESS_FAILURE: "virtual host access failure", UNKNOWN_FRAME: "unknown frame",
    FRAME_TOO_LARGE: "frame too large", INTERNAL_ERROR: "internal error", ACCESS_REFUSED: "access refused",
    PRECONDITION_FAILED: "precondition failed", PUBLISHER_DOES_NOT_EXIST: "publisher does not exist",
}

# Offset specifications of Subscribe.
OFFSET_FIRST = 1
OFFSET_LAST = 2
OFFSET_NEXT = 3
OFFSET_AT = 4
OFFSET_TIMESTAMP = 5

INITIAL_FRAME_MAX = 8192
"""What the broker accepts before the connection is tuned."""
MAX_SUB_ENTRY_RECORDS = 0xFFFF
"""A sub-entry batch counts its records in 16 bits."""

U8 = struct.Struct(">B")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
I64 = struct.Struct(">q")
_HEAD = struct.Struct(">IHH")  # size, key, version
_REQUEST = struct.Struct(">IHHI")  # size, key, version, correlation id
_ENTRY = struct.Struct(">QI")  # publishing id, size (top bit 0: a simple entry)
_SUB_ENTRY = struct.Struct(">QBHII")  # publishing id, 1|compression|reserved, records, uncompressed, size
_PUBLISH_HEAD = struct.Struct(">IHHBI")  # size, key, version, publisher id, entry count
PUBLISH_OVERHEAD = _PUBLISH_HEAD.size
SUB_ENTRY_OVERHEAD = _SUB_ENTRY.size


class FrameError(Exception):
    """A frame that cannot be read: truncated, too large, or not what its key says."""


def string(text: str) -> bytes:
    """A protocol string: ``Size:i16`` and UTF-8 bytes."""
    raw = text.encode("utf-8")
    if len(raw) > 0x7FFF:
        raise ValueError("string longer than 32767 bytes")
    return U16.pack(len(raw)) + raw


def properties(pairs: Mapping[str, str]) -> bytes:
    """A ``[Key Value]`` array of strings."""
    return U32.pack(len(pairs)) + b"".join(string(k) + string(v) for k, v in pairs.items())


def command(key: int, content: bytes, version: int = 1) -> bytes:
    """A frame without a correlation id."""
    return _HEAD.pack(4 + len(content), key, version) + content


def request(key: int, correlation: int, content: bytes, version: int = 1) -> bytes:
    """A frame with a correlation id."""
    return _REQUEST.pack(8 + len(content), key, version, correlation) + content


def response(key: int, correlation: int, code: int) -> bytes:
    """A response frame (to a request of the broker's: ``Close``)."""
    return _REQUEST.pack(10, key | RESPONSE, 1, correlation) + U16.pack(code)


# --- the client's requests -------------------------------------------------------

def peer_properties(correlation: int, pairs: Mapping[str, str]) -> bytes:
    return request(PEER_PROPERTIES, correlation, properties(pairs))


def sasl_handshake(correlation: int) -> bytes:
    return request(SASL_HANDSHAKE, correlation, b"")


def sasl_authenticate(correlation: int, mechanism: str, data: bytes) -> bytes:
    return request(SASL_AUTHENTICATE, correlation, string(mechanism) + U32.pack(len(data)) + data)


def plain(username: str, password: str) -> bytes:
    """SASL PLAIN's message (RFC 4616): no authorisation id, the user, the password."""
    return b"\x00" + username.encode("utf-8") + b"\x00" + password.encode("utf-8")


def tune(frame_max: int, heartbeat: int) -> bytes:
    return command(TUNE, U32.pack(frame_max) + U32.pack(heartbeat))


def open_vhost(correlation: int, vhost: str) -> bytes:
    return request(OPEN, correlation, string(vhost))


def close(correlation: int, code: int, reason: str) -> bytes:
    return request(CLOSE, correlation, U16.pack(code) + string(reason))


def heartbeat() -> bytes:
    return command(HEARTBEAT, b"")


def create(correlation: int, stream: str, arguments: Mapping[str, str]) -> bytes:
    return request(CREATE, correlation, string(stream) + properties(arguments))


def delete(correlation: int, stream: str) -> bytes:
    return request(DELETE, correlation, string(stream))


def metadata(correlation: int, streams: Sequence[str]) -> bytes:
    return request(METADATA, correlation, U32.pack(len(streams)) + b"".join(string(s) for s in streams))


def declare_publisher(correlation: int, publisher_id: int, reference: str, stream: str) -> bytes:
    return request(DECLARE_PUBLISHER, correlation, U8.pack(publisher_id) + string(reference) + string(stream))


def query_publisher_sequence(correlation: int, reference: str, stream: str) -> bytes:
    return request(QUERY_PUBLISHER_SEQUENCE, correlation, string(reference) + string(stream))


def delete_publisher(correlation: int, publisher_id: int) -> bytes:
    return request(DELETE_PUBLISHER, correlation, U8.pack(publisher_id))


def subscribe(correlation: int, subscription_id: int, stream: str, offset_type: int, offset: int, credit: int,
              options: Mapping[str, str] = {}) -> bytes:
    spec = U16.pack(offset_type)
    if offset_type == OFFSET_AT:
        spec += U64.pack(offset)
    elif offset_type == OFFSET_TIMESTAMP:
        spec += I64.pack(offset)
    return request(SUBSCRIBE, correlation, U8.pack(subscription_id) + string(stream) + spec + U16.pack(credit)
                   + properties(options))


def credit(subscription_id: int, chunks: int) -> bytes:
    return command(CREDIT, U8.pack(subscription_id) + U16.pack(chunks))


def unsubscribe(correlation: int, subscription_id: int) -> bytes:
    return request(UNSUBSCRIBE, correlation, U8.pack(subscription_id))


def simple_entry(publishing_id: int, message: bytes) -> bytes:
    """One message of a ``Publish``: ``PublishingId:u64`` and the message as ``bytes``."""
    return _ENTRY.pack(publishing_id, len(message)) + message


def sub_entry(publishing_id: int, messages: Sequence[bytes]) -> bytes:
    """Several messages as one entry (one publishing id, one confirm): an uncompressed sub-entry batch.

    ``[1:1|compression 0:3|reserved:4] Records:u16 UncompressedSize:u32 Size:u32`` then each message
    as ``[0:1 Size:31]`` and its bytes; the broker stores it as one entry of as many records.
    """
    if not 0 < len(messages) <= MAX_SUB_ENTRY_RECORDS:
        raise ValueError(f"a sub-entry batch holds 1 to {MAX_SUB_ENTRY_RECORDS} messages")
    data = b"".join([U32.pack(len(m)) + m for m in messages])
    return _SUB_ENTRY.pack(publishing_id, 0x80, len(messages), len(data), len(data)) + data


def publish(publisher_id: int, entries: Sequence[bytes]) -> bytes:
    """A ``Publish`` frame of entries made by :func:`simple_entry` or :func:`sub_entry`."""
    size = sum(len(e) for e in entries)
    return _PUBLISH_HEAD.pack(PUBLISH_OVERHEAD - 4 + size, PUBLISH, 1, publisher_id, len(entries)) + b"".join(entries)


def pack_publishes(publisher_id: int, entries: Iterable[bytes], frame_max: int) -> List[bytes]:
    """``Publish`` frames of at most ``frame_max`` bytes each (0: no limit) holding ``entries`` in order."""
    frames: List[bytes] = []
    batch: List[bytes] = []
    size = PUBLISH_OVERHEAD
    for entry in entries:
        if frame_max and PUBLISH_OVERHEAD + len(entry) > frame_max:
            raise FrameError(f"an entry of {len(entry)} bytes does not fit a frame of {frame_max}")
        if batch and frame_max and size + len(entry) > frame_max:
            frames.append(publish(publisher_id, batch))
            batch, size = [], PUBLISH_OVERHEAD
        batch.append(entry)
        size += len(entry)
    if batch:
        frames.append(publish(publisher_id, batch))
    return frames


# --- reading -------------------------------------------------------------------

class FrameReader:
    """Cuts a byte stream into frames (``Key`` onwards, without the size)."""

    def __init__(self, frame_max: int = 0) -> None:
        self.frame_max = frame_max
        """The largest frame accepted (0: any); a larger one is a :class:`FrameError`."""
        self._buffer = bytearray()

    def feed(self, data: bytes) -> List[bytes]:
        """The frames completed by ``data``, in order."""
        buffer = self._buffer
        buffer += data
        frames: List[bytes] = []
        position, end = 0, len(buffer)
        unpack = U32.unpack_from
        while end - position >= 4:
            size = unpack(buffer, position)[0]
            if self.frame_max and size > self.frame_max:
                raise FrameError(f"a frame of {size} bytes, over the {self.frame_max} agreed")
            if size < 4:
                raise FrameError(f"a frame of {size} bytes has no key and version")
            if end - position - 4 < size:
                break
            frames.append(bytes(buffer[position + 4:position + 4 + size]))
            position += 4 + size
        if position:
            del buffer[:position]
        return frames

    @property
    def pending(self) -> int:
        """Bytes received of a frame not yet complete."""
        return len(self._buffer)


class Reader:
    """Reads one frame's fields in order; running past its end is a :class:`FrameError`."""

    __slots__ = ("data", "position")

    def __init__(self, data: bytes, position: int = 0) -> None:
        self.data = data
        self.position = position

    def _take(self, shape: struct.Struct) -> int:
        try:
            value: int = shape.unpack_from(self.data, self.position)[0]
        except struct.error as e:
            raise FrameError(f"frame ends inside a field at byte {self.position}") from e
        self.position += shape.size
        return value

    def u8(self) -> int:
        return self._take(U8)

    def u16(self) -> int:
        return self._take(U16)

    def u32(self) -> int:
        return self._take(U32)

    def u64(self) -> int:
        return self._take(U64)

    def raw(self, size: int) -> bytes:
        end = self.position + size
        if size < 0 or end > len(self.data):
            raise FrameError(f"frame ends inside a field of {size} bytes at byte {self.position}")
        value = self.data[self.position:end]
        self.position = end
        return value

    def string(self) -> Optional[str]:
        size = self._take(U16)
        if size == 0xFFFF:
            return None
        try:
            return self.raw(size).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FrameError("a string that is not UTF-8") from e

    def bytes_(self) -> Optional[bytes]:
        size = self._take(U32)
        return None if size == 0xFFFFFFFF else self.raw(size)

    def properties(self) -> Dict[str, str]:
        pairs: Dict[str, str] = {}
        for _ in range(self.u32()):
            key, value = self.string(), self.string()
            pairs[key or ""] = value or ""
        return pairs

    def array(self, shape: struct.Struct) -> List[int]:
        count = self.u32()
        if count * shape.size > len(self.data) - self.position:
            raise FrameError(f"an array of {count} items does not fit the frame")
        values = [v for (v,) in shape.iter_unpack(self.data[self.position:self.position + count * shape.size])]
        self.position += count * shape.size
        return values


def head(frame: bytes) -> Tuple[int, int]:
    """``(key, version)`` of a frame cut by :class:`FrameReader`."""
    if len(frame) < 4:
        raise FrameError("a frame without key and version")
    key, version = struct.unpack_from(">HH", frame, 0)
    return key, version
