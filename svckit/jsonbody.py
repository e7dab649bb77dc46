"""The one strict JSON parser for request bodies.

Every JSON endpoint of both daemons reads its body through
:func:`parse_object`, so the rules are the same everywhere:

* the body is UTF-8, at most the route's limit (enforced before it is read);
* nesting at most :data:`MAX_DEPTH` levels (checked before parsing, so a
  10,000-level document never reaches the recursive decoder);
* no ``NaN``/``Infinity``, no number that overflows a float, no integer of
  more digits than :data:`MAX_DIGITS`;
* no string (key or value) that cannot be encoded as UTF-8, such as a lone
  surrogate written as ``"\\udc80"``;
* the top level is an object.

Anything else is :class:`~svckit.responses.HTTPError` 400 saying why.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, NoReturn

from svckit.responses import HTTPError

MAX_DEPTH = 32
MAX_DIGITS = 40

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _refuse(message: str) -> NoReturn:
    raise HTTPError(400, message)


def _depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects, ignoring string contents."""
    if data.count(b"[") + data.count(b"{") <= MAX_DEPTH:
        return 0  # cannot be deeper than the brackets it has
    depth = deepest = 0
    for byte in _STRING.sub(b'""', data):
        if byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        _refuse(f"number {text[:20]} is out of range")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        _refuse(f"integer of more than {MAX_DIGITS} digits")
    return int(text)


def _constant(name: str) -> NoReturn:
    _refuse(f"{name} is not a JSON number")


def parse_json(data: bytes) -> Any:
    """Parse ``data`` under the rules above; :class:`HTTPError` 400 otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        _refuse("body is not UTF-8")
    if _depth(data) > MAX_DEPTH:
        _refuse(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(
            text, parse_float=_float, parse_int=_int, parse_constant=_constant
        )
    except (ValueError, RecursionError):
        _refuse("body is not valid JSON")
    try:
        # One C-level pass finds any string, key or value, that UTF-8 cannot
        # carry (lone surrogates from \ud800-style escapes).
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        _refuse("JSON strings must be valid Unicode (no lone surrogates)")
    return value


def parse_object(data: bytes) -> Dict[str, Any]:
    """Parse ``data`` as a JSON object."""
    value = parse_json(data)
    if not isinstance(value, dict):
        _refuse("body must be a JSON object")
    return value
