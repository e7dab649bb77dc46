"""The gateway's routes: the user API under ``/user/``, every other path proxied."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from twisted.web import server

from lbsvc.proxying.proxy import Proxy
from lbsvc.proxying.target import origin_target
from lbsvc.users.api import MAX_BODY, UserAPI
from lbsvc.users.keys import key_guard
from lbsvc.users.store import UserStore
from svckit.responses import HTTPError
from svckit.web import Route, Router


def gateway_router(users: UserStore, api: UserAPI, proxy: Proxy, max_body: int,
                   registry: CollectorRegistry) -> Router:
    """The user API (create, profile, change, rotate, delete); the rest is proxied.

    Other paths under ``/user/`` are 404: they are the gateway's, never a backend's.
    """
    keyed = key_guard(users)

    def proxied(request: server.Request) -> None:
        keyed(request)
        path, _ = origin_target(request.uri)
        if path.startswith(b"/user/"):  # an absolute-form target naming the gateway's own API
            raise HTTPError(404, "no such path")

    return Router(
        {
            b"/user/create": Route("user_create", {b"POST": api.create}, max_body=MAX_BODY),
            b"/user/tokens/profile": Route("user_profile", {b"GET": api.profile},
                                           max_body=MAX_BODY, guard=keyed),
            b"/user/tokens/change": Route("user_change", {b"POST": api.change},
                                          max_body=MAX_BODY, guard=keyed),
            b"/user/keys/rotate": Route("user_rotate", {b"POST": api.rotate}, max_body=MAX_BODY, guard=keyed),
            b"/user/delete": Route("user_delete", {b"POST": api.delete}, max_body=MAX_BODY, guard=keyed),
        },
        fallback=Route("proxy", {}, max_body=max_body, guard=proxied, any_method=proxy, stream_body=True),
        reserved=(b"/user/",),
        registry=registry,
        prefix="lbsvc",
        max_body=MAX_BODY,
        request_ids=True,
    )
