"""The one web layer of both daemons: exact routes, plain handlers, one error path.

A :class:`Router` is the root resource of a site.  It maps exact paths (no
child resources, no trailing-slash or ``//`` variants) to :class:`Route`\\ s;
a route maps HTTP methods to *handlers*: plain functions, sync or async,
that take the ``twisted.web.server.Request`` and return a response from
:mod:`svckit.responses` or raise :class:`~svckit.responses.HTTPError`.

The router owns everything around the handler:

* **admission** (:meth:`Router.admit`), which the site's channel calls as soon
  as a request's headers are in, before any body byte is stored: the site's
  and the route's guards (credentials) and the route's body limit;
* **one error path**: an ``HTTPError`` becomes ``{"Error": message}`` with its
  status and headers; any other exception is logged once, with the request,
  and answered 500;
* **disconnects**: when the client goes away the handler's Deferred is
  cancelled, nothing more is written, and nothing is logged as unhandled;
* **request ids** (``request_ids=True``): every answer carries
  ``X-Request-Id`` (:mod:`svckit.requestid`) and every error body its
  ``request_id`` beside ``Error``;
* **outcome metrics**: ``<prefix>_http_requests_total{route, code}`` for every
  request, including those refused at admission; a client that left before its
  answer counts as code ``499``.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Dict, Mapping, Optional, Tuple, Union

import attrs
from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from svckit.jsonbody import parse_json, parse_object
from svckit.metrics import incrementer
from svckit.requestid import request_id
from svckit.responses import (
    JSON_TYPE,
    PHRASES,
    BytesResponse,
    HTTPError,
    JSONResponse,
    Response,
    Streamed,
    dumps,
    too_large,
)

log = Logger()

Handler = Callable[[server.Request], Union[Response, Awaitable[Response]]]
"""A handler: the request in, a response (or an awaitable of one) out."""

Guard = Callable[[server.Request], None]
"""Checks a request's headers before its body is read; raises ``HTTPError``."""

DEFAULT_MAX_BODY = 64 * 1024
CLIENT_GONE = 499  # nginx's code for "the client closed the connection"
UNMATCHED = "unmatched"


@attrs.frozen
class Route:
    """One exact path: its handlers by method, body limit and guard."""

    name: str
    methods: Mapping[bytes, Handler]
    max_body: int = DEFAULT_MAX_BODY
    guard: Optional[Guard] = None
    any_method: Optional[Handler] = None
    """The handler of every method not in ``methods`` (a proxy's)."""
    stream_body: bool = False
    """Dispatch when the headers are admitted and hand the handler the body as
    it arrives (``request.body``, a :class:`svckit.requestbody.RequestBody`)."""
    max_array_body: Optional[int] = None
    """A JSON array body (its first non-blank byte ``[``) may be this large; any
    other body stays within :attr:`max_body`, decided at its first byte."""

    def limit_for(self, first: bytes) -> int:
        """The body limit once the body's first non-blank byte is ``first``."""
        if self.max_array_body is not None and first == b"[":
            return self.max_array_body
        return self.max_body

    def handler(self, method: bytes) -> Optional[Handler]:
        """The handler of ``method`` (``HEAD`` falls back to ``GET``)."""
        handler = self.methods.get(method)
        if handler is None and method == b"HEAD":
            handler = self.methods.get(b"GET")
        return handler or self.any_method


def write_head(request: server.Request, code: int, content_type: bytes,
               headers: Mapping[str, str]) -> None:
    """Set the status and headers of ``request``."""
    request.setResponseCode(code, PHRASES.get(code))
    request.setHeader(b"content-type", content_type)
    for name, value in headers.items():
        request.setHeader(name.encode("ascii"), value.encode("latin-1"))


def encode(request: server.Request, response: Union[JSONResponse, BytesResponse]) -> bytes:
    """Set status and headers for ``response``; return its body."""
    if isinstance(response, JSONResponse):
        write_head(request, response.code, JSON_TYPE, response.headers)
        return dumps(response.body)
    write_head(request, response.code, response.content_type, response.headers)
    return response.body


def stored_body(request: server.Request) -> bytes:
    """The body a request stored (the router has bounded its size); ``b""`` without one."""
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body: bytes = content.read()
    return body


def read_json_value(request: server.Request) -> Any:
    """The request body as any JSON value."""
    return parse_json(stored_body(request))


def read_json(request: server.Request) -> Dict[str, Any]:
    """The request body as a JSON object."""
    return parse_object(stored_body(request))


def first_byte(data: bytes) -> bytes:
    """The first byte of ``data`` that is not JSON whitespace (``b""``: none yet)."""
    stripped = data.lstrip(b" \t\r\n")
    return stripped[:1]


def body_size(request: server.Request) -> int:
    """How many body bytes ``request`` holds (0 without a body)."""
    content = request.content
    if content is None:
        return 0
    content.seek(0, 2)
    size: int = content.tell()
    content.seek(0)
    return size


def log_unhandled(message: str, failure: Optional[Failure], request: server.Request) -> None:
    """Log a failure nobody expected, once, with the request it broke."""
    log.failure(message + " ({method} {uri})", failure,
                method=request.method.decode("latin-1"), uri=request.uri.decode("latin-1"))


def client_gone(request: server.Request) -> bool:
    """Whether the connection of ``request`` is gone."""
    return bool(getattr(request, "_disconnected", False))


class Router(resource.Resource):
    """The root resource of a site: exact paths to routes.

    ``fallback`` answers every path no route names (lbsvc's proxy), except
    those under a ``reserved`` prefix; without it they are 404.  ``guard``
    runs for every request of the site (gradesvc's write port needs
    credentials whatever the path), before the route's own.
    """

    isLeaf = True

    def __init__(
        self,
        routes: Mapping[bytes, Route],
        *,
        registry: CollectorRegistry,
        prefix: str,
        fallback: Optional[Route] = None,
        reserved: Tuple[bytes, ...] = (),
        guard: Optional[Guard] = None,
        max_body: int = DEFAULT_MAX_BODY,
        request_ids: bool = False,
    ) -> None:
        super().__init__()
        self.request_ids = request_ids
        self.routes = dict(routes)
        self.fallback = fallback
        self.reserved = reserved
        self.guard = guard
        self.max_body = max_body
        self._requests = Counter(
            f"{prefix}_http_requests", "HTTP requests by route and status code"
            " (499: the client went away first).", ["route", "code"], registry=registry,
        )
        self._children: Dict[Tuple[str, int], Callable[[float], None]] = {}

    def route_for(self, path: bytes) -> Optional[Route]:
        """The route of exactly ``path``, else the fallback (or None)."""
        route = self.routes.get(path)
        if route is None and not (self.reserved and path.startswith(self.reserved)):
            return self.fallback
        return route

    def count(self, route: Optional[Route], code: int) -> None:
        """Count one request's outcome."""
        key = (route.name if route is not None else UNMATCHED, code)
        increment = self._children.get(key)
        if increment is None:
            increment = self._children[key] = incrementer(self._requests.labels(key[0], str(code)))
        increment(1)

    def admit(self, request: server.Request) -> int:
        """Check a request whose headers are in; return its body limit.

        Raises ``HTTPError`` (401, ...) from a guard.  Called by the site's
        channel before any body byte is stored, and by :meth:`render` for
        requests that did not come through such a channel.
        """
        route = self.route_for(request.path)
        if self.guard is not None:
            self.guard(request)
        if route is None:
            return self.max_body
        if route.guard is not None:
            route.guard(request)
        return max(route.max_body, route.max_array_body or 0)

    def render(self, request: server.Request) -> Union[bytes, int]:
        """Dispatch to the handler and answer what it returns or raises."""
        route = self.route_for(request.path)
        try:
            rejection: Optional[HTTPError] = getattr(request, "rejection", None)
            if rejection is not None:
                raise rejection
            if not getattr(request, "admitted", False):
                self._admit_here(request)
            if route is None:
                raise HTTPError(404, "no such path")
            method = request.method
            handler = route.handler(method)
            if handler is None:
                allowed = ", ".join(sorted(m.decode("ascii") for m in route.methods))
                raise HTTPError(405, f"method {method.decode('latin-1')} not allowed",
                                {"Allow": allowed})
            result = handler(request)
        except Exception:
            result = self._failure_response(request, Failure())
        if isinstance(result, (JSONResponse, BytesResponse)):
            self.count(route, result.code)
            return encode(request, result)
        d: defer.Deferred[Response] = (
            defer.succeed(result) if isinstance(result, Streamed)
            else defer.ensureDeferred(result)  # type: ignore[arg-type]
        )
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addBoth(self._answer, request, route)
        return server.NOT_DONE_YET

    def _admit_here(self, request: server.Request) -> None:
        limit = self.admit(request)
        route = self.route_for(request.path)
        if route is not None and route.max_array_body is not None and request.content is not None:
            request.content.seek(0)
            limit = route.limit_for(first_byte(request.content.read(4096)) or b"[")
        if body_size(request) > limit:
            raise too_large(limit)

    def _failure_response(self, request: server.Request, failure: Failure) -> JSONResponse:
        if isinstance(failure.value, HTTPError):
            error = failure.value
        else:
            log_unhandled("Unhandled error", failure, request)
            error = HTTPError(500, "internal error")
        if self.request_ids:
            return JSONResponse({"Error": error.message, "request_id": request_id(request).decode("ascii")},
                                error.code, error.headers)
        return error.response()

    def _answer(self, result: Union[Response, Failure], request: server.Request,
                route: Optional[Route]) -> None:
        if client_gone(request):
            if isinstance(result, Failure) and not result.check(defer.CancelledError, HTTPError):
                log_unhandled("Failed after the client went away", result, request)
            self.count(route, CLIENT_GONE)
            return
        if isinstance(result, Failure):
            if request.startedWriting:
                # Status and part of the body are out: all we can do is cut
                # the connection so the client sees the answer is incomplete.
                if not result.check(defer.CancelledError):
                    log_unhandled("Failed while streaming the answer", result, request)
                self.count(route, request.code)
                request.loseConnection()
                return
            result = self._failure_response(request, result)
        if isinstance(result, Streamed):
            self.count(route, request.code)
        else:
            self.count(route, result.code)
            body = encode(request, result)
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
        if not request.finished:
            request.finish()
