"""API keys on requests: ``Authorization: KEY`` or ``Authorization: Bearer KEY``.

:func:`key_guard` checks the key when a request's headers arrive, before its
body is read, and leaves the user on ``request.principal``.
"""

from __future__ import annotations

from typing import Optional

from twisted.web import server

from lbsvc.users.index import User
from lbsvc.users.store import UserStore
from svckit.responses import HTTPError
from svckit.web import Guard

MAX_KEY_LENGTH = 256


def api_key(request: server.Request) -> Optional[str]:
    """The key in the ``Authorization`` header, or None.

    Two ``Authorization`` headers are refused (400): which one is meant is
    not for the gateway to guess, and a backend behind it might pick the other.
    """
    header = request.requestHeaders.getRawHeaders(b"authorization")
    if not header:
        return None
    if len(header) > 1:
        raise HTTPError(400, "more than one Authorization header")
    value = header[0].decode("latin-1").strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    return value or None


def key_guard(users: UserStore) -> Guard:
    """A guard admitting requests whose key belongs to a user (401 otherwise)."""

    def guard(request: server.Request) -> None:
        key = api_key(request)
        if key is None:
            raise HTTPError(401, "missing API key in Authorization header")
        user = users.authenticate(key) if len(key) <= MAX_KEY_LENGTH else None
        if user is None:
            raise HTTPError(401, "unknown API key")
        request.principal = user  # type: ignore[attr-defined]

    return guard


def user_of(request: server.Request) -> User:
    """The user a :func:`key_guard` admitted."""
    user = getattr(request, "principal", None)
    if not isinstance(user, User):
        raise HTTPError(401, "missing API key in Authorization header")
    return user
