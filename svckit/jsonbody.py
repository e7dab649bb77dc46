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

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
"""A JSON string (the unrolled form: a run of plain bytes between escapes, several times faster in ``re``)."""


def _refuse(message: str) -> NoReturn:
    raise HTTPError(400, message)


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}|\[\}|\{\]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_INTEGER = b"0" * (MAX_DIGITS + 1)


def _needs_hooks(outside_strings: bytes) -> bool:
    """Whether the body (its strings removed) holds a float, ``NaN``/``Infinity`` or an integer of more than
    :data:`MAX_DIGITS` digits: what the hooked (slower) parse must check.  Plain byte searches only."""
    rest = outside_strings.replace(b"true", b"").replace(b"false", b"")
    if b"." in rest or b"e" in rest or b"E" in rest or b"N" in rest or b"I" in rest:
        return True
    return _LONG_INTEGER in rest.translate(_DIGITS_AS_ZERO)


def _depth(outside_strings: bytes) -> int:
    """The deepest nesting of arrays and objects (at most ``MAX_DEPTH + 1``), of a body without its strings.

    The brackets alone are kept (two C-level passes), then innermost pairs are
    removed a level at a time: as many regex passes as the document is deep,
    never a Python loop over its bytes.
    """
    if outside_strings.count(b"[") + outside_strings.count(b"{") <= MAX_DEPTH:
        return 0  # cannot be deeper than the brackets it has
    brackets = outside_strings.translate(None, _NOT_BRACKETS)
    depth = 0
    while brackets and depth <= MAX_DEPTH:
        brackets, removed = _INNERMOST.subn(b"", brackets)
        if not removed:
            return MAX_DEPTH + 1  # unbalanced: the parser will refuse it, deep or not
        depth += 1
    return depth


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
    outside_strings = _STRING.sub(b'""', data)
    if _depth(outside_strings) > MAX_DEPTH:
        _refuse(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        if _needs_hooks(outside_strings):
            value = json.loads(text, parse_float=_float, parse_int=_int, parse_constant=_constant)
        else:  # integers of at most MAX_DIGITS digits, no float, no constant: the runtime's fastest parse
            value = json.loads(text)
    except (ValueError, RecursionError):
        _refuse("body is not valid JSON")
    if _SURROGATE_ESCAPE.search(data):  # only a \ud800-\udfff escape can make one (UTF-8 bytes cannot)
        try:
            # One C-level pass finds any string, key or value, that UTF-8 cannot
            # carry (lone surrogates; a well-formed pair is fine).
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
