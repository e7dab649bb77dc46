"""The admin port: the gateway's own ``/health``, ``/ready`` and ``/metrics``.

It is a separate endpoint (loopback by default) so that no backend path is
shadowed: on the gateway port every path outside ``/user/`` is proxied.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from prometheus_client import CollectorRegistry
from twisted.web import server

from lbsvc.backends.pool import BackendPool
from svckit import metrics
from svckit.readiness import Readiness
from svckit.responses import BytesResponse, JSONResponse
from svckit.web import Handler, Route, Router


def admin_router(pool: BackendPool, readiness: Readiness, registry: CollectorRegistry,
                 limits: Callable[[], Dict[str, Any]],
                 workers: Callable[[], Dict[str, int]],
                 scrape: Optional[Handler] = None,
                 pages: Mapping[bytes, Tuple[str, Handler]] = {}) -> Router:
    """The admin port's routes.

    ``workers`` reports ``{"configured", "running"}`` processes for ``/ready``
    (with ``--workers``); ``limits`` who decides the buckets now (``/ready``'s
    ``limits``: store, mode, live gateways, and a note when memory buckets
    multiply a limit); ``scrape`` answers ``/metrics`` instead of this
    process's registry alone (:class:`lbsvc.workermetrics.WorkerScrape`); ``pages`` adds GET
    routes (path → name, handler): the status page (:mod:`lbsvc.overview`).
    """

    def health(request: server.Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    def ready(request: server.Request) -> JSONResponse:
        body = {
            "ready": readiness.ready,
            "problems": readiness.problems(),
            "backends": {b.name: b.healthy for b in pool.backends},
            "workers": workers(),
            "limits": limits(),
        }
        return JSONResponse(body, 200 if readiness.ready else 503)

    def own_metrics(request: server.Request) -> BytesResponse:
        return metrics.render(registry)

    return Router(
        {
            b"/health": Route("health", {b"GET": health}, max_body=0),
            b"/ready": Route("ready", {b"GET": ready}, max_body=0),
            b"/metrics": Route("metrics", {b"GET": scrape or own_metrics}, max_body=0),
            **{path: Route(name, {b"GET": handler}, max_body=0) for path, (name, handler) in pages.items()},
        },
        registry=registry,
        prefix="lbsvc_admin",
        max_body=0,
    )
