"""The read port: ``/get``, ``/``, ``/health``, ``/ready``, ``/metrics`` (and ``/backup``)."""

from __future__ import annotations

from twisted.web import resource
from twisted.web.iweb import IRequest

from gradesvc.status import ReplicaStatus
from gradesvc.storage import FIELDS, GradeStore
from svckit.jsonweb import HTTPError, JSONResource, JSONResponse, JSONRoot, dumps, query_arg
from svckit.metrics import MetricsResource, Registry

JSON_HEADER = b"application/json"


def not_ready(status: ReplicaStatus) -> HTTPError:
    """503 for a replica that is still starting, with ``Retry-After``."""
    return HTTPError(
        503, f"replica not ready (phase {status.phase})", {"Retry-After": "1"}
    )


class GetResource(JSONResource):
    """``GET /get?user_id=ID``: one user's grade."""

    def __init__(self, store: GradeStore, status: ReplicaStatus, registry: Registry) -> None:
        super().__init__()
        self.store = store
        self.status = status
        self._requests = registry.counter(
            "gradesvc_get_requests_total", "GET /get requests by status code.", ("code",)
        )

    def render_GET(self, request: IRequest) -> bytes:
        """Look the user up; 400, 404 or 503 as the contract says."""
        try:
            if not self.status.serving_reads:
                raise not_ready(self.status)
            user_id = query_arg(request, "user_id")
            if not user_id:
                raise HTTPError(400, "user_id query argument is required")
            values = self.store.values(user_id)
            if values is None:
                raise HTTPError(404, "user not found")
        except HTTPError as e:
            self._requests.inc(code=str(e.code))
            raise
        self._requests.inc(code="200")
        result = {"user_id": user_id}
        result.update(zip(FIELDS, values))
        request.setHeader(b"content-type", JSON_HEADER)
        return dumps({"Result": result})


class BannerResource(JSONResource):
    """``GET /``: ``Server {replica_id} answer`` (what lbsvc's demo shows)."""

    def __init__(self, replica_id: str) -> None:
        super().__init__()
        self.body = f"Server {replica_id} answer".encode("utf-8")

    def render_GET(self, request: IRequest) -> bytes:
        """The banner, as text."""
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return self.body


class HealthResource(JSONResource):
    """``GET /health``: 200 while the process runs."""

    def render_GET(self, request: IRequest) -> JSONResponse:
        """Always OK."""
        return JSONResponse({"status": "ok"})


class ReadyResource(JSONResource):
    """``GET /ready``: 200 when caught up and connected, else 503 with the phase."""

    def __init__(self, status: ReplicaStatus) -> None:
        super().__init__()
        self.status = status

    def render_GET(self, request: IRequest) -> JSONResponse:
        """The status report, with 200 or 503."""
        return JSONResponse(self.status.report(), 200 if self.status.ready else 503)


def read_root(
    store: GradeStore,
    status: ReplicaStatus,
    registry: Registry,
    replica_id: str,
    backup: resource.Resource,
) -> resource.Resource:
    """The whole read-port tree."""
    root = JSONRoot()
    root.putChild(b"", BannerResource(replica_id))
    root.putChild(b"get", GetResource(store, status, registry))
    root.putChild(b"health", HealthResource())
    root.putChild(b"ready", ReadyResource(status))
    root.putChild(b"metrics", MetricsResource(registry))
    root.putChild(b"backup", backup)
    return root
