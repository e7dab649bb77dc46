"""The request-target: the only part of a client's request line that goes upstream.

The upstream request is assembled from parsed parts: the connection is made
to the backend's configured host and port (:mod:`lbsvc.proxying.upstream`), and only
the path and query of the client's request-target, once checked here, go into
the request line; never by gluing the client's bytes onto the backend's URL
(``GET 64371/secret`` once made the port ``807064371``, which wrapped around
to any port the client liked).

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
