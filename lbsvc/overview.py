"""The gateway at a glance: ``/status`` (HTML) and ``/status.json`` on the admin endpoint.

Every backend with its health (active checks and passive ejection), requests
in flight, requests a second, error rate and upstream latency percentiles;
the limiter (who decides the buckets, Redis reachable, decisions by path);
the user store (database, change-log position, last sync); the workers; and
charts of proxied requests a second by status class and of upstream latency
over the last ten minutes.  Nothing about users or their keys is shown.

The numbers come from the metrics (this process's registry, or with
``--workers`` every process's, through :class:`lbsvc.workermetrics.WorkerScrape`),
sampled once a second into a :class:`svckit.history.History`: rates and
percentiles are differences between two samples, so the page costs nothing
per proxied request beyond the counters ``/metrics`` keeps anyway.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web import server

from lbsvc.backends.pool import BackendPool
from lbsvc.proxying.upstreams import LATENCY_BUCKETS
from lbsvc.users.store import UserStore
from svckit.history import History
from svckit.readiness import Readiness
from svckit.responses import BytesResponse, JSONResponse
from svckit.statuspage import Cell, Chart, PageParts, Table, json_response, number, page_response

WINDOW = 10.0
"""Seconds the table's rates, error rates and percentiles are taken over."""
Window = Tuple[Mapping[str, float], Mapping[str, float], float]
"""Two samples of the history and the seconds between them (:meth:`History.window`)."""
CLASSES = ("2xx", "3xx", "4xx", "5xx")
BOUNDS = [*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"]
"""The ``le`` labels of the latency histogram, as the exposition writes them."""


def numbers(families: Iterable[Metric]) -> Dict[str, float]:
    """What the page samples, from metric families: totals by status class, backend, path and bucket."""
    out: Dict[str, float] = {f"proxied:{c}": 0.0 for c in CLASSES}  # a class never seen is 0 a second

    def add(key: str, value: float) -> None:
        out[key] = out.get(key, 0.0) + value

    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "lbsvc_http_requests_total":
                if labels.get("route") == "proxy":
                    add(f"proxied:{labels.get('code', '0')[0]}xx", value)
            elif name == "lbsvc_upstream_requests_total":
                backend, outcome = labels.get("backend", ""), labels.get("outcome", "")
                add(f"requests:{backend}", value)
                if not (outcome.isdigit() and outcome[0] in "1234"):
                    add(f"errors:{backend}", value)
            elif name == "lbsvc_upstream_response_seconds_bucket":
                le = labels.get("le", "")
                add(f"le:{labels.get('backend', '')}:{le}", value)
                add(f"le:*:{le}", value)
            elif name == "lbsvc_backend_in_flight":
                add(f"in_flight:{labels.get('backend', '')}", value)
            elif name == "lbsvc_bucket_decisions_total":
                add(f"decisions:{labels.get('path', '')}", value)
    return out


def quantile(q: float, cumulative: Sequence[Tuple[float, float]]) -> Optional[float]:
    """The ``q`` quantile of a histogram given as (upper bound, cumulative count), as Prometheus's
    ``histogram_quantile`` estimates it (linear within a bucket); None without observations."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower
            width = count - below
            return lower + (bound - lower) * ((rank - below) / width if width > 0 else 1.0)
        lower, below = bound, count
    return lower


def _buckets(after: Mapping[str, float], before: Mapping[str, float], backend: str) -> List[Tuple[float, float]]:
    return [(float(le), max(0.0, after.get(f"le:{backend}:{le}", 0.0) - before.get(f"le:{backend}:{le}", 0.0)))
            for le in BOUNDS]


class Overview:
    """``/status`` and ``/status.json`` of one gateway (all its processes)."""

    def __init__(self, pool: BackendPool, users: UserStore, readiness: Readiness, registry: CollectorRegistry,
                 clock: IReactorTime, limits: Callable[[], Dict[str, Any]],
                 redis_up: Callable[[], Optional[bool]],
                 workers: Callable[[], Dict[str, int]],
                 families: Optional[Callable[[], defer.Deferred[List[Metric]]]] = None) -> None:
        self.pool = pool
        self.users = users
        self.readiness = readiness
        self.registry = registry
        self.clock = clock
        self.limits = limits
        self.redis_up = redis_up
        self.workers = workers
        self.families = families
        """Every process's metrics (``--workers``); None: this process's registry."""
        self.history = History(clock, self.sample)

    def sample(self) -> Any:
        """The numbers now (the history's sampler)."""
        if self.families is None:
            return numbers(self.registry.collect())
        return self.families().addCallback(numbers)

    def backends(self, window: Optional[Window] = None) -> List[Dict[str, Any]]:
        """Each backend's entry (over ``window``, by default the last :data:`WINDOW` seconds of history)."""
        before, after, seconds = window or self.history.window(WINDOW)
        now = self.clock.seconds()
        rows = []
        for backend in self.pool.backends:
            name = backend.name
            requests = after.get(f"requests:{name}", 0.0) - before.get(f"requests:{name}", 0.0)
            errors = after.get(f"errors:{name}", 0.0) - before.get(f"errors:{name}", 0.0)
            buckets = _buckets(after, before, name)
            latency = {f"p{q}": _ms(quantile(q / 100, buckets)) for q in (50, 90, 99)}
            rows.append({
                "name": name,
                "url": backend.url,
                "healthy": backend.healthy,
                "ejected": backend.ejected_until > now,
                "in_rotation": backend.available,
                "in_flight": backend.in_flight if self.families is None  # live; with workers, every process's
                else int(after.get(f"in_flight:{name}", backend.in_flight)),  # as of the last sample
                "requests_per_second": round(requests / seconds, 3) if seconds > 0 else None,
                "error_rate": round(errors / requests, 4) if requests > 0 else None,
                "latency_ms": latency,
            })
        return rows

    def charts(self) -> Dict[str, Any]:
        """Proxied requests a second by status class, and upstream latency, per sample."""
        proxied = self.history.chart({c: (f"proxied:{c}", True) for c in CLASSES})
        points = list(self.history.points)
        p50: List[Optional[float]] = []
        p99: List[Optional[float]] = []
        for (_, before), (_, after) in zip(points, points[1:]):
            buckets = _buckets(after, before, "*")
            p50.append(_ms(quantile(0.5, buckets)))
            p99.append(_ms(quantile(0.99, buckets)))
        return {"proxied_per_second": proxied,
                "upstream_latency_ms": {"interval": self.history.interval, "series": {"p50": p50, "p99": p99}}}

    def report(self) -> Dict[str, Any]:
        """The body of ``/status.json``."""
        window = self.history.window(WINDOW)
        after = window[1]
        synced = self.users.synced_at
        return {
            "service": "lbsvc",
            "ready": self.readiness.ready,
            "problems": self.readiness.problems(),
            "backends": self.backends(window),
            "panic": self.pool.panicking,
            "limits": {**self.limits(), "redis_up": self.redis_up(),
                       "decisions": {k.split(":", 1)[1]: v for k, v in after.items() if k.startswith("decisions:")}},
            "users": {
                "database": self.users.database.description,
                "count": len(self.users),
                "change_log_position": self.users.applied,
                "synced_seconds_ago": None if synced is None else round(self.clock.seconds() - synced, 3),
            },
            "workers": self.workers(),
            "history": self.charts(),
        }

    def json(self, request: server.Request) -> JSONResponse:
        """``GET /status.json``."""
        return json_response(self.report())

    def page(self, request: server.Request) -> BytesResponse:
        """``GET /status``."""
        return page_response(request, "lbsvc", parts(self.report()))


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 3)


def _backend_cells(row: Mapping[str, Any]) -> List[Cell]:
    health: Cell = ("up", "ok") if row["healthy"] else ("down", "bad")
    passive: Cell = ("ejected", "bad") if row["ejected"] else ("ok", "ok")
    rotation: Cell = ("yes", "ok") if row["in_rotation"] else ("no", "bad")
    errors = row["error_rate"]
    latency = row["latency_ms"]
    return [
        row["name"], health, passive, rotation, number(row["in_flight"]),
        number(row["requests_per_second"], 1),
        (number(None if errors is None else errors * 100, 1, "%"),
         "bad" if errors and errors > 0.05 else "ok") if errors is not None else "—",
        *(number(latency[p], 1, "ms") for p in ("p50", "p90", "p99")),
    ]


def parts(report: Mapping[str, Any]) -> PageParts:
    """What the page shows of a ``/status.json`` body."""
    backends = report["backends"]
    up = sum(1 for b in backends if b["in_rotation"])
    limits, users, workers = report["limits"], report["users"], report["workers"]
    summary: List[Cell] = [
        ("ready", "ok") if report["ready"] else ("not ready: " + ", ".join(report["problems"]), "bad"),
        (f"{up} of {len(backends)} backends in rotation", "ok" if up == len(backends) else "bad"),
        (f"limits: {limits['mode']}", "ok" if limits["mode"] in ("redis", "memory") else "warn"),
        f"{workers['running']} of {workers['configured']} processes",
    ]
    if report["panic"]:
        summary.append(("panic: every backend in rotation", "bad"))
    table = Table("Backends (rates and latency over the last 10 s)",
                  ["backend", "health check", "passive", "in rotation", "in flight", "req/s", "errors",
                   "p50", "p90", "p99"], [_backend_cells(b) for b in backends])
    redis = limits.get("redis_up")
    limiter: List[List[Cell]] = [
        ["buckets", str(limits["buckets"])],
        ["mode", (str(limits["mode"]), "ok" if limits["mode"] in ("redis", "memory") else "warn")],
        ["live gateway processes", number(limits.get("gateways"))],
        ["Redis reachable", "—" if redis is None else (("yes", "ok") if redis else ("no", "bad"))],
    ]
    for path, count in sorted(limits["decisions"].items()):
        limiter.append([f"decisions by {path}", number(count)])
    leases = limits.get("leases")
    if leases:  # this process's (the parent's, with --workers)
        limiter += [["leases held", number(leases["leases_held"])],
                    ["blocks fetched", number(leases["blocks_fetched"])],
                    ["local decisions per Redis call", number(leases["local_decisions_per_call"], 1)]]
    if "note" in limits:
        limiter.append(["note", (str(limits["note"]), "warn")])
    synced = users["synced_seconds_ago"]
    store: List[List[Cell]] = [
        ["database", str(users["database"])],
        ["users", number(users["count"])],
        ["change log position", number(users["change_log_position"])],
        ["last read of the change log", "—" if synced is None else
         (number(synced, 2, "s ago"), "ok" if synced < 3 else "bad")],
    ]
    history = report["history"]
    proxied, latency = history["proxied_per_second"], history["upstream_latency_ms"]
    return "lbsvc", summary, [
        table,
        Table("Limiter", ["", ""], limiter),
        Table("Users", ["", ""], store),
        Chart("Proxied requests per second by status, last 10 minutes", "req/s", proxied["series"],
              proxied["interval"]),
        Chart("Upstream latency, last 10 minutes", "ms", latency["series"], latency["interval"]),
    ]
