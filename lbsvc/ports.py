"""Where a built gateway listens: its own port, a ``--workers`` parent's, or a worker's; and the admin port.

A single process listens on ``--endpoint``.  A ``--workers N`` parent binds
the port once, serves it itself and starts N-1 workers that adopt the same
socket (:mod:`lbsvc.workers`); it alone has the admin port, where it shows
every worker's metrics.  A worker adopts the socket it was handed, watches
its parent, and reports its metrics to it over a Unix socket.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

from lbsvc.admin import admin_router
from lbsvc.build import Gateway
from lbsvc.overview import Overview
from lbsvc.workermetrics import METRICS_SOCKET, SocketDirectory, WorkerScrape, worker_metrics_service
from lbsvc.workers import AdoptedPort, ParentWatch, Workers, bind, inherited
from svckit.accesslog import OFF, AccessLog
from svckit.site import listen


def open_ports(gateway: Gateway, argv: List[str]) -> None:
    """Add the ports to ``gateway``'s services; ``argv`` starts a worker (``--workers``)."""
    settings, reactor, top = gateway.settings, gateway.reactor, gateway.service
    adopted = inherited()
    if adopted is not None:  # a worker of a --workers parent: its socket, metrics for the parent only
        AdoptedPort(reactor, adopted[0], adopted[1], gateway.site()).setServiceParent(gateway.ports)
        ParentWatch(reactor).setServiceParent(top)
        socket_path = os.environ.get(METRICS_SOCKET)
        if socket_path:
            worker_metrics_service(reactor, socket_path, gateway.registry).setServiceParent(top)
        return
    scrape: Optional[WorkerScrape] = None
    running: Callable[[], Dict[str, int]] = lambda: {"configured": 1, "running": 1}  # noqa: E731
    if settings.workers > 1:
        try:
            shared = bind(settings.endpoint)
        except (OSError, ValueError) as e:
            raise SystemExit(f"lbsvc: cannot listen on {settings.endpoint} for {settings.workers} workers: {e}") from None
        AdoptedPort(reactor, shared.fileno(), shared.family, gateway.site()).setServiceParent(gateway.ports)
        sockets = SocketDirectory()
        workers = Workers(reactor, settings.workers, shared.fileno(), shared.family, argv, sockets)
        workers.socket = shared  # kept open as long as the pool
        workers.setServiceParent(top)
        scrape = WorkerScrape(reactor, gateway.registry, sockets, list(range(1, settings.workers)))
        running = lambda: {"configured": settings.workers, "running": workers.processes}  # noqa: E731
    else:
        listen(reactor, settings.endpoint, gateway.router, gateway.access_log).setServiceParent(gateway.ports)
    limits = gateway.limits
    overview = Overview(gateway.backends, gateway.users, gateway.readiness, gateway.registry, reactor,
                        limits.report, limits.redis_up, running, scrape.families if scrape is not None else None)
    overview.history.setServiceParent(top)
    admin = admin_router(gateway.backends, gateway.readiness, gateway.registry, limits.report, running, scrape,
                         {b"/status": ("status", overview.page), b"/status.json": ("status_json", overview.json)})
    listen(reactor, settings.admin_endpoint, admin, AccessLog(OFF, reactor)).setServiceParent(top)
