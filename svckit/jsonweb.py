"""One JSON request/response path for every resource of both daemons.

Handlers are methods ``render_<METHOD>`` that return a :class:`JSONResponse`,
raw ``bytes`` (headers already set), or a coroutine that produces either.  Every
exception becomes a JSON error body ``{"Error": "..."}``; an :class:`HTTPError`
chooses its status code, anything else is logged and answered with 500.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Coroutine, Dict, Mapping, Optional, Union

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.iweb import IRequest

log = Logger()

JSON_TYPE = b"application/json"


@attrs.frozen
class JSONResponse:
    """A JSON body with its status code and extra headers."""

    body: Any
    code: int = 200
    headers: Mapping[str, str] = attrs.field(factory=dict)


class HTTPError(Exception):
    """An error meant for the client: status code, message, extra headers."""

    def __init__(
        self, code: int, message: str, headers: Optional[Mapping[str, str]] = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers: Mapping[str, str] = headers or {}


Result = Union[JSONResponse, bytes, int]
Handler = Callable[[IRequest], Union[Result, Coroutine[Any, Any, Result]]]


def dumps(obj: Any) -> bytes:
    """Encode ``obj`` as compact UTF-8 JSON."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def write_response(request: IRequest, response: JSONResponse) -> bytes:
    """Set status and headers of ``request`` for ``response``; return the body."""
    request.setResponseCode(response.code)
    request.setHeader(b"content-type", JSON_TYPE)
    for name, value in response.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("latin-1"))
    return dumps(response.body)


def error_response(error: HTTPError) -> JSONResponse:
    """The JSON response for a client error."""
    return JSONResponse({"Error": error.message}, error.code, error.headers)


def _failure_response(failure: Failure) -> JSONResponse:
    if failure.check(HTTPError):
        return error_response(failure.value)  # type: ignore[arg-type]
    log.failure("Unhandled error while rendering", failure)
    return JSONResponse({"Error": "internal error"}, 500)


class JSONResource(resource.Resource):
    """A leaf resource whose ``render_<METHOD>`` handlers speak JSON."""

    isLeaf = True

    def render(self, request: IRequest) -> Union[bytes, int]:  # type: ignore[override]
        """Dispatch to the handler; 405 with ``Allow`` for unknown methods."""
        method = request.method.decode("ascii", "replace")
        handler: Optional[Handler] = getattr(self, "render_" + method, None)
        if handler is None:
            allowed = ", ".join(sorted(self.allowedMethods()))
            return write_response(
                request,
                error_response(
                    HTTPError(405, f"method {method} not allowed", {"Allow": allowed})
                ),
            )
        try:
            result = handler(request)
        except Exception:
            return write_response(request, _failure_response(Failure()))
        if isinstance(result, (bytes, int)):
            return result  # a body, or NOT_DONE_YET from a streaming handler
        if isinstance(result, JSONResponse):
            return write_response(request, result)
        return self._render_async(request, result)

    def allowedMethods(self) -> list[str]:
        """Names of the HTTP methods this resource answers."""
        return [n[len("render_"):] for n in dir(self) if n.startswith("render_") and n != "render_HEAD"]

    def _render_async(
        self, request: IRequest, coro: Coroutine[Any, Any, Result]
    ) -> int:
        d = defer.ensureDeferred(coro)
        request.notifyFinish().addErrback(lambda _: d.cancel())

        def done(result: Union[Result, Failure]) -> None:
            if isinstance(result, Failure):
                if result.check(defer.CancelledError) and request.finished:  # type: ignore[attr-defined]
                    return
                result = _failure_response(result)
            body = result if isinstance(result, bytes) else write_response(request, result)
            if not request.finished:  # type: ignore[attr-defined]
                request.write(body)
                request.finish()

        d.addBoth(done)
        return server.NOT_DONE_YET


class LimitedRequest(server.Request):
    """A request that stops buffering its body past ``maxBody`` bytes.

    The resource then answers 413 (see :func:`read_json_body`) instead of the
    daemon holding an arbitrarily large upload in memory or on disk.
    """

    maxBody = 64 * 1024
    tooLarge = False
    _received = 0

    def process(self) -> None:
        """Answer without Nagle delays, then process as usual.

        A streamed answer ends with a small final write that Nagle's algorithm
        would hold until the client's delayed ACK (about 40 ms).
        """
        transport = getattr(self.channel, "transport", None)
        if transport is not None and hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        super().process()

    def gotLength(self, length: Optional[int]) -> None:
        """Mark oversize bodies from ``Content-Length`` before reading them."""
        if length is not None and length > self.maxBody:
            self.tooLarge = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Count body bytes and drop everything past the limit."""
        self._received += len(data)
        if self._received > self.maxBody:
            self.tooLarge = True
        if not self.tooLarge:
            super().handleContentChunk(data)


def read_body(request: IRequest, limit: int) -> bytes:
    """The request body, or :class:`HTTPError` 413 when it exceeds ``limit``."""
    if getattr(request, "tooLarge", False):
        raise HTTPError(413, f"body larger than {limit} bytes")
    request.content.seek(0)
    data: bytes = request.content.read(limit + 1)
    if len(data) > limit:
        raise HTTPError(413, f"body larger than {limit} bytes")
    return data


def read_json_object(request: IRequest, limit: int) -> Dict[str, Any]:
    """The request body parsed as a JSON object, or :class:`HTTPError` 400/413."""
    data = read_body(request, limit)
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "body is not valid JSON")
    if not isinstance(obj, dict):
        raise HTTPError(400, "body must be a JSON object")
    return obj


def query_arg(request: IRequest, name: str) -> Optional[str]:
    """The first value of query argument ``name`` decoded as UTF-8, or None."""
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[0].decode("utf-8")  # type: ignore[no-any-return]
    except UnicodeDecodeError:
        raise HTTPError(400, f"{name} is not valid UTF-8")


class NotFound(JSONResource):
    """404 in JSON for any method."""

    def render(self, request: IRequest) -> bytes:  # type: ignore[override]
        """Answer 404."""
        return write_response(request, error_response(HTTPError(404, "no such path")))


class JSONRoot(resource.Resource):
    """A container whose unknown children answer a JSON 404."""

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        """Any unknown path is :class:`NotFound`."""
        return NotFound()
