"""The gateway's handler of every path outside ``/user/``: one token, then forwarding.

The key was checked when the headers arrived (:func:`lbsvc.users.keys.key_guard`),
and the proxy route streams its body (``Route.stream_body``): the handler runs
before the body is in.  It spends a token (429 with ``Retry-After`` and the
``RateLimit`` headers without one) and hands the request to a
:class:`~lbsvc.proxying.forwarding.Forwarding`, which picks a backend, takes a
pooled connection to it (:mod:`lbsvc.proxying.upstream`) and sends the head
(:mod:`lbsvc.proxying.headerrules`) and the body as it arrives, with
back-pressure from the backend to the client; the answer comes back through a
:class:`~lbsvc.proxying.relay.Relay`.  A client that goes away cancels the
handler, which drops the upstream connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import server

from lbsvc.limits.buckets import IBucketStore, Verdict
from lbsvc.limits.ratelimitheaders import POLICY_HEADER, STATE_HEADER, policy, seconds_until_next, state
from lbsvc.proxying.forwarding import Forwarding
from lbsvc.proxying.upstreams import Upstreams
from lbsvc.users.index import User
from lbsvc.users.keys import user_of
from svckit.headblock import own_header
from svckit.responses import HTTPError

log = Logger()

"""Upper bounds of ``lbsvc_upstream_response_seconds``'s buckets."""


class Proxy:
    """The handler of every path outside ``/user/``: rate-limit, forward."""

    def __init__(self, buckets: IBucketStore, upstreams: Upstreams) -> None:
        self.buckets = buckets
        self.upstreams = upstreams

    def __call__(self, request: server.Request) -> Any:
        """Spend a token (429 without one), then forward."""
        user = user_of(request)
        request.log_fields = {"user": user.name}  # type: ignore[attr-defined]
        verdict = self.buckets.take(user.name, user.capacity, user.rate_per_sec)
        if isinstance(verdict, defer.Deferred):  # a shared store: Redis answers later
            return verdict.addCallback(self._admitted, request, user)
        return self._admitted(verdict, request, user)

    def _admitted(self, verdict: Verdict, request: server.Request, user: User) -> Any:
        taken, bucket = verdict
        limits = policy(user.capacity, user.rate_per_sec)
        if not taken:
            raise HTTPError(429, "rate limit exceeded", {
                "Retry-After": str(seconds_until_next(bucket)),
                "RateLimit-Policy": limits.decode("ascii"),
                "RateLimit": state(bucket).decode("ascii"),
            })
        headers = request.responseHeaders
        own_header(headers, POLICY_HEADER, limits)
        own_header(headers, STATE_HEADER, state(bucket))
        return Forwarding(self.upstreams, request).start()
