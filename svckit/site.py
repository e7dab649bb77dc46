"""The HTTP server side: a site whose requests are admitted before their bodies are read.

:func:`make_site` builds the :class:`GuardedSite` for a router: its channels
are :class:`~svckit.channel.GuardedChannel` (head limits, idle and head
timeouts), its requests :class:`~svckit.guardedrequest.GuardedRequest`
(admitted or refused once the headers are in, bodies streamed or refused
before they are stored), its log the buffered
:class:`~svckit.accesslog.AccessLog`, and HTML form parsing off (every body
here is JSON or bytes to proxy).  :func:`listen` serves it on a Twisted
endpoint string.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.web import http, server

from svckit.accesslog import AccessLog
from svckit.channel import GuardedChannel
from svckit.guardedrequest import GuardedRequest
from svckit.web import Router

IDLE_TIMEOUT = 60.0


class GuardedSite(server.Site):
    """A site whose root is a :class:`Router` and whose log is an :class:`AccessLog`."""

    protocol = GuardedChannel  # type: ignore[assignment]
    requestFactory = GuardedRequest

    def __init__(self, router: Router, access_log: AccessLog, timeout: float = IDLE_TIMEOUT) -> None:
        # The access log's clock is the daemon's reactor: connection timeouts run on it too (a test's clock
        # in memory, not the global reactor).
        super().__init__(router, logPath=None, timeout=timeout, reactor=access_log.clock)
        self._parsePOSTFormSubmission = False
        self.router = router
        self.access_log = access_log

    _date_second = -1
    _date = b""

    _head_block = b""

    def date(self) -> bytes:
        """The ``Date`` header's value, formatted once a second."""
        now = int(time.time())
        if now != self._date_second:
            self._date_second, self._date = now, http.datetimeToString(now)
            self._head_block = b"Server: " + server.version + b"\r\nDate: " + self._date + b"\r\n"
        return self._date

    def head_block(self) -> bytes:
        """``Server`` and ``Date`` as header lines, made once a second (:mod:`svckit.headblock`)."""
        self.date()
        return self._head_block

    def log(self, request: server.Request) -> None:  # type: ignore[override]
        """Buffer the access log line of a finished request."""
        self.access_log.record(request)

    def refused(self, request: Optional[server.Request], code: int, length: int) -> None:
        """Count and log a request refused before its body was read."""
        path = getattr(request, "path", None)
        route = self.router.route_for(path) if path is not None else None
        self.router.count(route, code)
        if request is not None:
            request.sentLength = length
            self.access_log.record(request, code)


def make_site(router: Router, access_log: AccessLog) -> GuardedSite:
    """The site serving ``router``."""
    return GuardedSite(router, access_log)


def listen(reactor: Any, description: str, router: Router, access_log: AccessLog) -> service.Service:
    """A service serving ``router`` on a Twisted endpoint string."""
    endpoint = endpoints.serverFromString(reactor, description)
    return StreamServerEndpointService(endpoint, make_site(router, access_log))
