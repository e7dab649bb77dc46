"""The read port: ``/get``, ``/backup``, ``/``, ``/health``, ``/ready``, ``/metrics``."""

from __future__ import annotations

from typing import Any, Awaitable, Dict, Mapping, Optional, Tuple, Union

from prometheus_client import CollectorRegistry
from twisted.web import server

from gradesvc.state.phase import ReplicaStatus
from gradesvc.state.store import FIELDS, GradeStore
from gradesvc.stream.progress import StreamProgress
from svckit import metrics
from svckit.responses import BytesResponse, HTTPError, JSONResponse, Response, unavailable
from svckit.web import Guard, Handler, Route, Router

READ_WAIT = 2.0
MAX_OFFSET = 2**63 - 1
NO_BODY = 1024
"""Bytes of body tolerated (and ignored) on the read port, where nothing takes one."""


def query_arg(request: server.Request, name: str) -> str:
    """The one value of query argument ``name`` as text ('' when absent)."""
    values = request.args.get(name.encode("ascii"))
    if not values:
        return ""
    if len(values) > 1:
        raise HTTPError(400, f"{name} given more than once")
    try:
        return values[0].decode("utf-8")  # type: ignore[no-any-return]
    except UnicodeDecodeError:
        raise HTTPError(400, f"{name} is not valid UTF-8") from None


def parse_offset(text: str) -> int:
    """A stream offset: a decimal integer 0 … 2^63 - 1."""
    if not text.isdigit() or not text.isascii() or len(text) > 19 or int(text) > MAX_OFFSET:
        raise HTTPError(400, "min_offset must be a stream offset (an integer from 0)")
    return int(text)


class ReadAPI:
    """The handlers of the read port."""

    def __init__(self, store: GradeStore, status: ReplicaStatus, progress: StreamProgress,
                 replica_id: str, read_wait: float = READ_WAIT) -> None:
        self.store = store
        self.status = status
        self.progress = progress
        self.read_wait = read_wait
        self.banner = BytesResponse(f"Server {replica_id} answer".encode())

    def get(self, request: server.Request) -> Union[JSONResponse, Awaitable[JSONResponse]]:
        """``GET /get?user_id=ID[&min_offset=N]``: one user's grade; 400, 404 or 503 otherwise.

        With ``min_offset`` the answer waits (up to ``--read-wait``) until this
        replica has applied offset N: the way to read one's own write, made on
        another replica, from this one.
        """
        if not self.status.serving_reads:
            raise self.status.not_ready()
        user_id = query_arg(request, "user_id")
        if not user_id:
            raise HTTPError(400, "user_id query argument is required")
        wanted = query_arg(request, "min_offset")
        if wanted:
            offset = parse_offset(wanted)
            if offset > self.status.applied_offset:
                return self._get_after(user_id, offset)
        return self._answer(user_id)

    async def _get_after(self, user_id: str, offset: int) -> JSONResponse:
        if not await self.progress.reached(offset, self.read_wait):
            raise unavailable(f"offset {offset} is not applied on this replica yet"
                              f" (applied: {self.status.applied_offset})")
        if not self.status.serving_reads:
            raise self.status.not_ready()
        return self._answer(user_id)

    def _answer(self, user_id: str) -> JSONResponse:
        values = self.store.values(user_id)
        if values is None:
            raise HTTPError(404, "user not found")
        result: Dict[str, Any] = {"user_id": user_id}
        result.update(zip(FIELDS, values))
        return JSONResponse({"Result": result})

    def root(self, request: server.Request) -> BytesResponse:
        """``GET /``: ``Server {replica_id} answer`` (what lbsvc's demo shows)."""
        return self.banner

    def health(self, request: server.Request) -> JSONResponse:
        """``GET /health``: 200 while the process runs."""
        return JSONResponse({"status": "ok"})

    def ready(self, request: server.Request) -> JSONResponse:
        """``GET /ready``: 200 when caught up and connected, else 503 with the phase."""
        return JSONResponse(self.status.report(), 200 if self.status.ready else 503)


def read_router(api: ReadAPI, backup: Handler, registry: CollectorRegistry,
                pages: Mapping[bytes, Tuple[str, Handler]] = {}, backup_guard: Optional[Guard] = None) -> Router:
    """The whole read port; ``pages`` adds GET routes (path → name, handler): the status pages;
    ``backup_guard`` puts ``/backup`` behind credentials (``--backup-auth``)."""

    def get(name: str, handler: Handler, guard: Optional[Guard] = None) -> Route:
        return Route(name, {b"GET": handler}, max_body=NO_BODY, guard=guard)

    def scrape(request: server.Request) -> Response:
        return metrics.render(registry)

    return Router(
        {
            b"/": get("root", api.root),
            b"/get": get("get", api.get),
            b"/backup": get("backup", backup, backup_guard),
            b"/health": get("health", api.health),
            b"/ready": get("ready", api.ready),
            b"/metrics": get("metrics", scrape),
            **{path: get(name, handler) for path, (name, handler) in pages.items()},
        },
        registry=registry,
        prefix="gradesvc_read",
        max_body=NO_BODY,
    )
