"""The request-target, and the only URLs the gateway ever sends upstream.

The upstream URL is assembled from parsed parts: scheme, host and port from
the backend's configuration, path and query from the client's request-target
after it is checked, never by gluing the client's bytes onto the backend's
URL (``GET 64371/secret`` once made the port ``807064371``, which wrapped
around to any port the client liked).

Accepted request-targets are origin-form (``/path?query``) and absolute-form
(``http://anything/path?query``, of which only the path and query are used);
everything else (``*``, authority-form, a bare ``path``, control characters,
a fragment) is refused with 400 when the headers arrive, before a backend is
chosen.
"""

from __future__ import annotations

import re
from typing import Tuple
from urllib.parse import urlsplit

from twisted.web.client import URI

from svckit.responses import HTTPError

_ABSOLUTE = re.compile(rb"\Ahttps?://", re.IGNORECASE)
_FORBIDDEN = re.compile(rb"[\x00-\x20\x7f-\xff#\\]")


def origin_target(target: bytes) -> Tuple[bytes, bytes]:
    """``(path, query)`` of a request-target; :class:`HTTPError` 400 otherwise."""
    if _FORBIDDEN.search(target):
        raise HTTPError(400, "request-target holds a character it may not")
    if _ABSOLUTE.match(target):
        try:
            parts = urlsplit(target.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise HTTPError(400, "malformed absolute-form request-target") from None
        path, query = parts.path.encode("ascii") or b"/", parts.query.encode("ascii")
    elif target.startswith(b"/"):
        path, _, query = target.partition(b"?")
    else:
        raise HTTPError(400, "request-target must be origin-form (/path?query)")
    if not path.startswith(b"/"):
        raise HTTPError(400, "request-target must be origin-form (/path?query)")
    return path, query


def upstream_url(scheme: bytes, host: bytes, port: int, target: bytes) -> bytes:
    """The URL to request from a backend at ``scheme://host:port`` for ``target``."""
    path, query = origin_target(target)
    netloc = b"%s:%d" % (host if b":" not in host else b"[" + host + b"]", port)
    url: bytes = URI(scheme, netloc, host, port, path, b"", query, b"").toBytes()
    return url
