"""AMQP 1.0 messages, as streams store them: made from a body and string properties, read back.

Whatever protocol published a message, a stream stores it as an AMQP 1.0
message: a run of described sections (``0x00 0x53 <code>`` and a value).  A
stream client needs two of them: the *application properties* (``0x74``, a
map) and the *data* (``0x75``, binary; several data sections are one body
joined).  :func:`encode` makes a message of those two; :func:`decode` reads
them from any message (an AMQP 0.9.1 publisher's too: RabbitMQ keeps its
``type`` as the application property ``x-basic-type``), skipping the other
sections by their sizes, and decoding the application properties' values of
the simple kinds (strings, symbols, binaries, integers, booleans, null).
"""

from __future__ import annotations

import struct
from typing import Any, Dict, List, Mapping, Tuple

APPLICATION_PROPERTIES = 0x74
DATA = 0x75
_U32 = struct.Struct(">I")
_FIXED = {0x40: 0, 0x41: 0, 0x42: 0, 0x43: 0, 0x44: 0, 0x45: 0, 0x50: 1, 0x51: 1, 0x52: 1, 0x53: 1, 0x54: 1,
          0x55: 1, 0x56: 1, 0x60: 2, 0x61: 2, 0x70: 4, 0x71: 4, 0x72: 4, 0x73: 4, 0x74: 4, 0x80: 8, 0x81: 8,
          0x82: 8, 0x83: 8, 0x84: 8, 0x94: 16, 0x98: 16}
"""Fixed-width format codes and their widths."""
_SIGNED = {0x51: ">b", 0x54: ">b", 0x55: ">b", 0x61: ">h", 0x71: ">i", 0x81: ">q", 0x83: ">q"}
_UNSIGNED = {0x50: ">B", 0x52: ">B", 0x53: ">B", 0x60: ">H", 0x70: ">I", 0x80: ">Q"}


class MessageError(ValueError):
    """Bytes that are not an AMQP 1.0 message this module can read."""


def _str8_or_32(code8: int, code32: int, raw: bytes) -> bytes:
    if len(raw) < 256:
        return bytes((code8, len(raw))) + raw
    return bytes((code32,)) + _U32.pack(len(raw)) + raw


def _string(text: str) -> bytes:
    return _str8_or_32(0xA1, 0xB1, text.encode("utf-8"))


def application_properties(pairs: Mapping[str, str]) -> bytes:
    """The application-properties section of string keys and string values."""
    items = b"".join(_string(k) + _string(v) for k, v in pairs.items())
    count = 2 * len(pairs)
    if len(items) + 1 < 256 and count < 256:
        return b"\x00\x53\x74\xc1" + bytes((len(items) + 1, count)) + items
    return b"\x00\x53\x74\xd1" + _U32.pack(len(items) + 4) + _U32.pack(count) + items


def data(body: bytes) -> bytes:
    """A data section holding ``body``."""
    return b"\x00\x53\x75" + _str8_or_32(0xA0, 0xB0, body)


def encode(body: bytes, properties: Mapping[str, str] = {}) -> bytes:
    """A message: application properties (if any), then ``body`` as one data section."""
    return (application_properties(properties) if properties else b"") + data(body)


def _skip(raw: bytes, position: int) -> int:
    """The position after the value at ``position``."""
    code = raw[position]
    if code == 0x00:
        return _skip(raw, _skip(raw, position + 1))
    if code in (0xA0, 0xA1, 0xA3, 0xC0, 0xC1, 0xE0):
        return position + 2 + raw[position + 1]
    if code in (0xB0, 0xB1, 0xB3, 0xD0, 0xD1, 0xF0):
        size: int = _U32.unpack_from(raw, position + 1)[0]
        return position + 5 + size
    width = _FIXED.get(code)
    if width is None:
        raise MessageError(f"unknown AMQP 1.0 format code {code:#04x}")
    return position + 1 + width


def _value(raw: bytes, position: int) -> Tuple[Any, int]:
    """A simple value at ``position``: (value, next position)."""
    code = raw[position]
    if code in (0xA1, 0xA3):
        size = raw[position + 1]
        return raw[position + 2:position + 2 + size].decode("utf-8"), position + 2 + size
    if code in (0xB1, 0xB3):
        size = _U32.unpack_from(raw, position + 1)[0]
        return raw[position + 5:position + 5 + size].decode("utf-8"), position + 5 + size
    if code == 0xA0:
        size = raw[position + 1]
        return raw[position + 2:position + 2 + size], position + 2 + size
    if code == 0xB0:
        size = _U32.unpack_from(raw, position + 1)[0]
        return raw[position + 5:position + 5 + size], position + 5 + size
    if code == 0x40:
        return None, position + 1
    if code in (0x41, 0x42):
        return code == 0x41, position + 1
    if code == 0x56:
        return raw[position + 1] == 1, position + 2
    if code in (0x43, 0x44):
        return 0, position + 1
    shape = _SIGNED.get(code) or _UNSIGNED.get(code)
    if shape is not None:
        return struct.unpack_from(shape, raw, position + 1)[0], position + 1 + struct.calcsize(shape)
    return None, _skip(raw, position)  # a kind not needed here: skipped


def _map(raw: bytes, position: int) -> Tuple[Dict[Any, Any], int]:
    code = raw[position]
    if code == 0xC1:
        end, count, position = position + 2 + raw[position + 1], raw[position + 2], position + 3
    elif code == 0xD1:
        size, count = struct.unpack_from(">II", raw, position + 1)
        end, position = position + 5 + size, position + 9
    elif code == 0x40:
        return {}, position + 1
    else:
        raise MessageError(f"application properties are not a map (format code {code:#04x})")
    items: List[Any] = []
    for _ in range(count):
        item, position = _value(raw, position)
        items.append(item)
    if position != end:
        raise MessageError("a map whose items do not fill it")
    return dict(zip(items[::2], items[1::2])), end


def decode(raw: bytes) -> Tuple[Dict[Any, Any], bytes]:
    """``(application properties, body)`` of a message; the body is its data sections joined."""
    properties: Dict[Any, Any] = {}
    parts: List[bytes] = []
    position, end = 0, len(raw)
    try:
        while position < end:
            if raw[position] != 0x00 or raw[position + 1] != 0x53:
                raise MessageError(f"no section at byte {position}")
            code = raw[position + 2]
            position += 3
            if code == DATA:
                body, position = _value(raw, position)
                if not isinstance(body, bytes):
                    raise MessageError("a data section that is not binary")
                parts.append(body)
            elif code == APPLICATION_PROPERTIES:
                properties, position = _map(raw, position)
            else:
                position = _skip(raw, position)
    except (IndexError, struct.error, UnicodeDecodeError) as e:
        raise MessageError(f"truncated or malformed message: {e}") from e
    if position != end:
        raise MessageError("a section runs past the message")
    return properties, parts[0] if len(parts) == 1 else b"".join(parts)
