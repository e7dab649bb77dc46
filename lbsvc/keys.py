"""Reading the API key from a request: ``Authorization: KEY`` or ``Bearer KEY``."""

from __future__ import annotations

from typing import Optional

from twisted.web.iweb import IRequest

from lbsvc.users import User, UserStore
from svckit.jsonweb import HTTPError


def api_key(request: IRequest) -> Optional[str]:
    """The key in the ``Authorization`` header, or None."""
    header = request.getHeader(b"authorization")
    if not header:
        return None
    value = header.decode("latin-1").strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    return value or None


def authenticate(request: IRequest, users: UserStore) -> User:
    """The user the request's key belongs to, or :class:`HTTPError` 401."""
    key = api_key(request)
    if key is None:
        raise HTTPError(401, "missing API key in Authorization header")
    user = users.authenticate(key)
    if user is None:
        raise HTTPError(401, "unknown API key")
    return user
