"""The admin port: the gateway's own ``/health``, ``/ready`` and ``/metrics``.

It is a separate endpoint (loopback by default) so that no backend path is
shadowed: on the gateway port every path outside ``/user/`` is proxied.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from twisted.web import server

from lbsvc.backends import BackendPool
from svckit import metrics
from svckit.readiness import Readiness
from svckit.responses import BytesResponse, JSONResponse
from svckit.web import Route, Router


def admin_router(pool: BackendPool, readiness: Readiness, registry: CollectorRegistry) -> Router:
    """The admin port's routes."""

    def health(request: server.Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    def ready(request: server.Request) -> JSONResponse:
        body = {
            "ready": readiness.ready,
            "problems": readiness.problems(),
            "backends": {b.name: b.healthy for b in pool.backends},
        }
        return JSONResponse(body, 200 if readiness.ready else 503)

    def scrape(request: server.Request) -> BytesResponse:
        return metrics.render(registry)

    return Router(
        {
            b"/health": Route("health", {b"GET": health}, max_body=0),
            b"/ready": Route("ready", {b"GET": ready}, max_body=0),
            b"/metrics": Route("metrics", {b"GET": scrape}, max_body=0),
        },
        registry=registry,
        prefix="lbsvc_admin",
        max_body=0,
    )
