"""A response's own header lines, kept as bytes and written ahead of the rest.

The headers a daemon puts on every answer (``Server``, ``Date``,
``X-Request-Id``; lbsvc's ``RateLimit`` pair) are the same shape each time
and their values are the daemon's own, never a client's or a backend's.
Setting them through ``twisted.web``'s ``Headers`` encodes and sanitises
every name and value again on every request (a sixth of a proxied
request's Python calls, issue #32); instead they are rendered once into
:attr:`HeadHeaders.block`, which :meth:`svckit.channel.GuardedChannel.writeHeaders`
writes right after the status line.  Everything else (a backend's headers,
``Content-Length``, ``Content-Type``) stays in ``Headers``, sanitised by
Twisted as before.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

from svckit.knownheaders import KnownHeaders


class HeadHeaders(KnownHeaders):
    """``Headers`` and, ahead of them, :attr:`block`: header lines the daemon wrote itself."""

    __slots__ = ("block",)

    def __init__(self) -> None:
        super().__init__()
        self.block = b""
        """``Name: value\\r\\n`` lines, each value the daemon's own (no CR or LF can be in it)."""


def own_header(headers: Headers, name: bytes, value: bytes) -> None:
    """Add one of the daemon's own headers: into the block when ``headers`` has one, else as usual."""
    if isinstance(headers, HeadHeaders):
        headers.block += name + b": " + value + b"\r\n"
    else:
        headers.addRawHeader(name, value)
