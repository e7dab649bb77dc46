"""Request ids: the one name a request goes by in every log and answer.

A client (or a gateway in front) may name its request with ``X-Request-Id``;
a short, safe value (at most :data:`MAX_LENGTH` characters of
``[A-Za-z0-9._:-]``) is kept as it is, so one id follows a request through
every hop.  Anything else (too long, other characters, several values) is
ignored and an id is made: this process's random prefix and a counter, unique
across processes and restarts without a random draw per request.

The id is worked out the first time it is asked for and kept on the request.
"""

from __future__ import annotations

import os
import re
from itertools import count
from typing import Any

MAX_LENGTH = 128
HEADER = b"x-request-id"
_SAFE = re.compile(rb"[A-Za-z0-9._:\-]{1,%d}" % MAX_LENGTH)
_PREFIX = os.urandom(6).hex().encode("ascii")
_counter = count(1)


def new_request_id() -> bytes:
    """A fresh id: ``<12 hex digits of this process>-<counter in hex>``."""
    return b"%s-%x" % (_PREFIX, next(_counter))


def safe_request_id(values: Any) -> bytes | None:
    """The one incoming ``X-Request-Id`` value, if it is short and safe."""
    if values is None or len(values) != 1:
        return None
    value: bytes = values[0]
    return value if _SAFE.fullmatch(value) else None


def request_id(request: Any) -> bytes:
    """The id of ``request``: the client's if safe, else a new one; the same on every call."""
    known: bytes | None = getattr(request, "request_id", None)
    if known is None:
        known = safe_request_id(request.requestHeaders.getRawHeaders(HEADER)) or new_request_id()
        request.request_id = known
    return known
