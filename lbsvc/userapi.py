"""The user API under ``/user/``: create, profile, change limits."""

from __future__ import annotations

from typing import Any, Dict

from twisted.web.iweb import IRequest

from lbsvc.buckets import Buckets
from lbsvc.keys import authenticate
from lbsvc.users import DuplicateUser, User, UserStore, valid_name
from svckit.jsonweb import HTTPError, JSONResource, JSONResponse, read_json_object

MAX_BODY = 16 * 1024


def _rate(value: float) -> Any:
    return int(value) if float(value).is_integer() else value


def profile(user: User, buckets: Buckets) -> Dict[str, Any]:
    """The profile object: limits and the live level as an integer."""
    bucket = buckets.peek(user.name, user.capacity, user.rate_per_sec)
    return {
        "name": user.name,
        "capacity": user.capacity,
        "rate_per_sec": _rate(user.rate_per_sec),
        "current_capacity": int(bucket.level),
    }


class CreateUser(JSONResource):
    """``POST /user/create {"name": ...}`` → 201 with the API key (shown once)."""

    def __init__(self, users: UserStore) -> None:
        super().__init__()
        self.users = users

    async def render_POST(self, request: IRequest) -> JSONResponse:
        """Create the user."""
        body = read_json_object(request, MAX_BODY)
        unknown = set(body) - {"name"}
        if unknown:
            raise HTTPError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        name = body.get("name")
        if not valid_name(name):
            raise HTTPError(400, "name must be 1-64 characters of letters, digits, _ . @ -")
        try:
            user, key = await self.users.create(name)
        except DuplicateUser:
            raise HTTPError(409, f"user {name!r} already exists")
        return JSONResponse(
            {"name": user.name, "capacity": user.capacity,
             "rate_per_sec": _rate(user.rate_per_sec), "api_key": key},
            201,
        )


class Profile(JSONResource):
    """``GET /user/tokens/profile``: limits and tokens left; costs no token."""

    def __init__(self, users: UserStore, buckets: Buckets) -> None:
        super().__init__()
        self.users = users
        self.buckets = buckets

    def render_GET(self, request: IRequest) -> JSONResponse:
        """The caller's profile."""
        return JSONResponse(profile(authenticate(request, self.users), self.buckets))


class ChangeLimits(JSONResource):
    """``POST /user/tokens/change {"capacity": C, "rate_per_sec": R}`` (either or both)."""

    def __init__(self, users: UserStore, buckets: Buckets) -> None:
        super().__init__()
        self.users = users
        self.buckets = buckets

    async def render_POST(self, request: IRequest) -> JSONResponse:
        """Validate, store, apply at once."""
        user = authenticate(request, self.users)
        body = read_json_object(request, MAX_BODY)
        unknown = set(body) - {"capacity", "rate_per_sec"}
        if unknown:
            raise HTTPError(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        if not body:
            raise HTTPError(400, "give capacity, rate_per_sec or both")
        capacity = body.get("capacity", user.capacity)
        rate = body.get("rate_per_sec", user.rate_per_sec)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= 10**9:
            raise HTTPError(400, "capacity must be an integer from 1 to 1000000000")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 10**9:
            raise HTTPError(400, "rate_per_sec must be a number greater than 0 (at most 1000000000)")
        await self.users.change(user, capacity, float(rate))
        self.buckets.change(user.name, capacity, float(rate))
        return JSONResponse(profile(user, self.buckets))
