"""The user API under ``/user/``: create, profile, change limits."""

from __future__ import annotations

from typing import Any, Dict, Union

from twisted.web import server

from lbsvc.limits.buckets import IBucketStore, settled
from lbsvc.users.database import StorageUnavailable
from lbsvc.users.index import User, valid_name
from lbsvc.users.keys import user_of
from lbsvc.users.store import DuplicateUser, UserStore
from svckit.responses import HTTPError, JSONResponse, unavailable
from svckit.web import body_size, read_json

MAX_BODY = 16 * 1024
MAX_CAPACITY = 1_000_000_000
MIN_RATE = 0.001
MAX_RATE = 1_000_000
MAX_GRACE = 86_400


def _rate(value: float) -> Union[int, float]:
    return int(value) if float(value).is_integer() else value


async def profile(user: User, buckets: IBucketStore) -> Dict[str, Any]:
    """The profile object: limits and the live level as an integer."""
    bucket = await settled(buckets.peek(user.name, user.capacity, user.rate_per_sec))
    return {
        "name": user.name,
        "capacity": user.capacity,
        "rate_per_sec": _rate(user.rate_per_sec),
        "current_capacity": int(bucket.level),
    }


def _fields(body: Dict[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise HTTPError(400, f"unknown field(s): {', '.join(sorted(unknown))}")


def _limit(value: float) -> str:
    return f"{value:g}" if value < 1e6 else str(int(value))


def parse_capacity(value: Any, ceiling: int = MAX_CAPACITY) -> int:
    """An integer 1 … ``ceiling`` (at most 1,000,000,000)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ceiling:
        raise HTTPError(400, f"capacity must be an integer from 1 to {ceiling}")
    return value


def parse_rate(value: Any, ceiling: float = MAX_RATE) -> float:
    """A number 0.001 … ``ceiling`` (at most 1,000,000)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not MIN_RATE <= value <= ceiling:
        raise HTTPError(400, f"rate_per_sec must be a number from {MIN_RATE} to {_limit(ceiling)}")
    return float(value)


def parse_grace(value: Any) -> float:
    """Seconds 0 … 86,400."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_GRACE:
        raise HTTPError(400, f"grace_seconds must be a number from 0 to {MAX_GRACE}")
    return float(value)


def optional_json(request: server.Request) -> Dict[str, Any]:
    """The body as a JSON object, or ``{}`` when there is none."""
    return read_json(request) if body_size(request) else {}


class UserAPI:
    """The handlers of ``/user/...``."""

    def __init__(self, users: UserStore, buckets: IBucketStore, max_capacity: int = MAX_CAPACITY,
                 max_rate: float = MAX_RATE) -> None:
        self.users = users
        self.buckets = buckets
        self.max_capacity = max_capacity
        self.max_rate = max_rate

    async def create(self, request: server.Request) -> JSONResponse:
        """``POST /user/create {"name": ...}`` → 201 with the API key (shown once)."""
        body = read_json(request)
        _fields(body, {"name"})
        name = body.get("name")
        if not isinstance(name, str) or not valid_name(name):
            raise HTTPError(400, "name must be 1-64 characters of letters, digits, _ . @ -")
        try:
            user, key = await self.users.create(name)
        except DuplicateUser:
            raise HTTPError(409, f"user {name!r} already exists") from None
        except StorageUnavailable as e:
            raise unavailable(str(e)) from None
        return JSONResponse(
            {"name": user.name, "capacity": user.capacity,
             "rate_per_sec": _rate(user.rate_per_sec), "api_key": key},
            201,
        )

    async def profile(self, request: server.Request) -> JSONResponse:
        """``GET /user/tokens/profile``: limits and tokens left; costs no token."""
        return JSONResponse(await profile(user_of(request), self.buckets))

    async def change(self, request: server.Request) -> JSONResponse:
        """``POST /user/tokens/change {"capacity": C, "rate_per_sec": R}`` (either or both)."""
        user = user_of(request)
        body = read_json(request)
        _fields(body, {"capacity", "rate_per_sec"})
        if not body:
            raise HTTPError(400, "give capacity, rate_per_sec or both")
        capacity = parse_capacity(body["capacity"], self.max_capacity) if "capacity" in body else user.capacity
        rate = parse_rate(body["rate_per_sec"], self.max_rate) if "rate_per_sec" in body else user.rate_per_sec
        try:
            await self.users.change(user, capacity, rate)
        except StorageUnavailable as e:
            raise unavailable(str(e)) from None
        await settled(self.buckets.change(user.name, capacity, rate))
        return JSONResponse(await profile(user, self.buckets))

    async def rotate(self, request: server.Request) -> JSONResponse:
        """``POST /user/keys/rotate [{"grace_seconds": S}]``: a new key; the old ones last S more seconds."""
        user = user_of(request)
        body = optional_json(request)
        _fields(body, {"grace_seconds"})
        grace = parse_grace(body.get("grace_seconds", 0))
        try:
            key = await self.users.rotate(user, grace)
        except StorageUnavailable as e:
            raise unavailable(str(e)) from None
        return JSONResponse({"name": user.name, "api_key": key, "previous_keys_valid_for": _rate(grace)})

    async def delete(self, request: server.Request) -> JSONResponse:
        """``POST /user/delete``: the user and every key of it are gone."""
        user = user_of(request)
        _fields(optional_json(request), set())
        try:
            await self.users.delete(user)
        except StorageUnavailable as e:
            raise unavailable(str(e)) from None
        await settled(self.buckets.forget(user.name))
        return JSONResponse({"deleted": user.name})
