"""What a handler answers: a JSON body, raw bytes, a streamed body, or an error.

Handlers of :class:`svckit.web.Router` return one of these (or raise
:class:`HTTPError`); the router is the only place that turns them into bytes
on the wire, so every daemon answers errors the same way: ``{"Error": ...}``.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Union

import attrs

JSON_TYPE = b"application/json"
PHRASES = {
    413: b"Content Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
}
"""Reason phrases Twisted does not know (RFC 9110, RFC 6585)."""
TEXT_TYPE = b"text/plain; charset=utf-8"


def dumps(obj: Any) -> bytes:
    """Encode ``obj`` as compact UTF-8 JSON."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@attrs.frozen
class JSONResponse:
    """A JSON body with its status code and extra headers."""

    body: Any
    code: int = 200
    headers: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class BytesResponse:
    """A body that is already bytes, with its content type."""

    body: bytes
    code: int = 200
    content_type: bytes = TEXT_TYPE
    headers: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Streamed:
    """The handler wrote the status, headers and body itself; only finish it."""


STREAMED = Streamed()

Response = Union[JSONResponse, BytesResponse, Streamed]


class HTTPError(Exception):
    """An error meant for the client: status code, message, extra headers."""

    def __init__(
        self, code: int, message: str, headers: Optional[Mapping[str, str]] = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers: Mapping[str, str] = headers or {}

    def response(self) -> JSONResponse:
        """The JSON answer for this error: ``{"Error": message}``."""
        return JSONResponse({"Error": self.message}, self.code, self.headers)


def retry_after(seconds: float, ceiling: int = 3600) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1, at most ``ceiling``."""
    if not seconds < ceiling:  # also catches NaN and infinity
        return str(ceiling)
    whole = int(seconds)
    if whole < seconds:
        whole += 1
    return str(max(1, whole))


def too_large(limit: int) -> HTTPError:
    """413 for a body over ``limit`` bytes."""
    return HTTPError(413, f"body larger than {limit} bytes")


def unavailable(message: str, seconds: float = 1) -> HTTPError:
    """503 with ``Retry-After``."""
    return HTTPError(503, message, {"Retry-After": retry_after(seconds)})
