"""The replicas side by side: ``/status`` (HTML) and ``/status.json`` on the read port.

Every replica is named by its replica id, which its ``/ready`` carries, with
its read port's URL beside it.  This replica reports from memory; every peer
named by ``--peers`` is asked for its own ``/ready`` and ``/metrics`` (:class:`PeerWatch`, one second
timeout, at most once a second however many people look, and not at all
while nobody does).  A peer that does not answer is shown as unreachable,
with why.  Rates (writes and reads a second) come from two looks at a
counter: this replica's from its :class:`svckit.history.History` (sampled
once a second, ten minutes kept, which also draws the charts), a peer's
from the last two fetches.

"Behind" is the distance, in stream offsets, to the furthest replica seen:
the stream's tail as far as the replicas know it (asking the broker for the
tail means publishing a probe, too much for a page refreshed every second).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import treq
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web import server

from gradesvc.state.phase import ReplicaStatus
from svckit.history import History
from svckit.metrics import sums
from svckit.responses import BytesResponse, JSONResponse
from svckit.statuspage import Cell, Chart, PageParts, Table, json_response, number, page_response

PEER_TIMEOUT = 1.0
"""Seconds a peer has to answer each of its two requests."""
FRESH = 1.0
"""Seconds a peer's answer is reused for."""
MAX_NAME = 200
"""A peer's replica id longer than this is not shown (its URL is)."""
RATE_WINDOW = 10.0
"""Seconds this replica's rates are averaged over."""
WANTED = {
    "applied_total": ("gradesvc_stream_messages_applied_total", {}),
    "reads_total": ("gradesvc_read_http_requests_total", {"route": "get"}),
    "checkpoint_offset": ("gradesvc_checkpoint_offset", {}),
    "checkpoint_age_seconds": ("gradesvc_checkpoint_age_seconds", {}),
    "retention_margin_intervals": ("gradesvc_retention_margin_intervals", {}),
    "lag_seconds": ("gradesvc_replication_lag_seconds", {}),
}
"""What is read off a replica's ``/metrics`` (and sampled from this one's registry)."""


def _unknown_if_negative(value: Optional[float]) -> Optional[float]:
    return None if value is None or value < 0 else value


def replica_row(name: str, url: Optional[str], ready: Mapping[str, Any], numbers: Mapping[str, float],
                writes: Optional[float], reads: Optional[float]) -> Dict[str, Any]:
    """One replica's entry in ``/status.json`` from its ``/ready`` body and ``/metrics`` numbers.

    ``name`` is the replica's id; ``url`` its read port as given in ``--peers`` (None: this replica).
    """
    snapshot = ready.get("snapshot") or {}
    return {
        "name": name,
        "url": url,
        "this": url is None,
        "reachable": True,
        "error": None,
        "ready": bool(ready.get("ready")),
        "phase": ready.get("phase"),
        "broker_connected": bool(ready.get("broker_connected")),
        "broker_node": ready.get("broker_node"),
        "applied_offset": ready.get("applied_offset"),
        "behind": None,
        "lag_seconds": ready.get("lag_seconds"),
        "writes_per_second": writes,
        "reads_per_second": reads,
        "checkpoint_offset": _unknown_if_negative(numbers.get("checkpoint_offset")),
        "checkpoint_age_seconds": _unknown_if_negative(numbers.get("checkpoint_age_seconds")),
        "retention_margin_intervals": _unknown_if_negative(numbers.get("retention_margin_intervals")),
        "bootstrap_peer": snapshot.get("peer"),
        "bootstrap_rows": snapshot.get("rows_loaded"),
        "stalled": ready.get("stalled"),
    }


class PeerWatch:
    """A peer's ``/ready`` and ``/metrics``, fetched on demand and reused for :data:`FRESH` seconds."""

    def __init__(self, url: str, clock: IReactorTime, http: Any = treq) -> None:
        self.url = url
        self.clock = clock
        self.http = http
        self._row: Optional[Dict[str, Any]] = None
        self._at = float("-inf")
        self._waiting: Optional[List[defer.Deferred[Dict[str, Any]]]] = None
        self._totals: Optional[Tuple[float, Dict[str, float]]] = None
        self.name = url
        """The peer's replica id as its ``/ready`` last gave it (its URL until then, or for a previous release)."""

    def row(self) -> defer.Deferred[Dict[str, Any]]:
        """The peer's entry: fresh, or fetched now (one fetch shared by every caller meanwhile)."""
        if self._row is not None and self.clock.seconds() - self._at < FRESH:
            return defer.succeed(self._row)
        d: defer.Deferred[Dict[str, Any]] = defer.Deferred()
        if self._waiting is not None:
            self._waiting.append(d)
            return d
        self._waiting = [d]
        defer.ensureDeferred(self._fetch()).addCallback(self._fetched)
        return d

    def _fetched(self, row: Dict[str, Any]) -> None:
        self._row, self._at = row, self.clock.seconds()
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.callback(row)

    def _unreachable(self, why: str) -> Dict[str, Any]:
        return {"name": self.name, "url": self.url, "this": False, "reachable": False, "error": why, "ready": False}

    async def _get(self, path: str) -> Tuple[int, bytes]:
        response = await self.http.get(self.url + path, timeout=PEER_TIMEOUT)
        body = await response.content()
        return response.code, body

    async def _fetch(self) -> Dict[str, Any]:
        try:
            _, ready_body = await self._get("/ready")
            code, metrics_body = await self._get("/metrics")
            ready = json.loads(ready_body)
            if not isinstance(ready, dict) or code != 200:
                raise ValueError("not a gradesvc read port")
            numbers = sums(text_string_to_metric_families(metrics_body.decode("utf-8")), WANTED)
            now = self.clock.seconds()
            writes = reads = None
            if self._totals is not None and now > self._totals[0]:
                then, before = self._totals
                writes = _rate(before, numbers, "applied_total", now - then)
                reads = _rate(before, numbers, "reads_total", now - then)
            named = ready.get("replica_id")
            if isinstance(named, str) and 0 < len(named) <= MAX_NAME:
                self.name = named
            row = replica_row(self.name, self.url, ready, numbers, writes, reads)
        except Exception as e:  # refused, timed out, not JSON, not Prometheus text, not /ready's shape: shown
            return self._unreachable(f"{type(e).__name__}: {e}".strip().rstrip(":"))
        self._totals = (now, numbers)
        return row


def _rate(before: Mapping[str, float], after: Mapping[str, float], key: str, seconds: float) -> Optional[float]:
    a, b = before.get(key), after.get(key)
    if a is None or b is None or b < a:
        return None
    return (b - a) / seconds


class Overview:
    """``/status`` and ``/status.json`` of one replica and its peers."""

    def __init__(self, replica_id: str, status: ReplicaStatus, registry: CollectorRegistry,
                 peers: Sequence[PeerWatch], clock: IReactorTime) -> None:
        self.replica_id = replica_id
        self.status = status
        self.registry = registry
        self.peers = list(peers)
        self.history = History(clock, self.sample)

    def sample(self) -> Dict[str, float]:
        """This replica's numbers now (the history's sampler); a counter not yet counting is 0."""
        return {"applied_total": 0.0, "reads_total": 0.0, **sums(self.registry.collect(), WANTED)}

    def own_row(self) -> Dict[str, Any]:
        """This replica's entry."""
        numbers = self.history.points[-1][1] if self.history.points else self.sample()
        return replica_row(self.replica_id, None, self.status.report(), numbers,
                           self.history.rate_over("applied_total", RATE_WINDOW),
                           self.history.rate_over("reads_total", RATE_WINDOW))

    async def report(self) -> Dict[str, Any]:
        """The body of ``/status.json``."""
        rows = [self.own_row()]
        rows += await defer.gatherResults([peer.row() for peer in self.peers])
        offsets = [r["applied_offset"] for r in rows if r.get("reachable") and isinstance(r.get("applied_offset"), int)]
        tail = max(offsets, default=None)
        for row in rows:
            if tail is not None and isinstance(row.get("applied_offset"), int):
                row["behind"] = max(0, tail - row["applied_offset"] - (0 if row["applied_offset"] >= 0 else 1))
        return {
            "service": "gradesvc",
            "replica": self.replica_id,
            "replicas": rows,
            "history": self.history.chart({"writes/s": ("applied_total", True), "lag s": ("lag_seconds", False)}),
        }

    async def json(self, request: server.Request) -> JSONResponse:
        """``GET /status.json``."""
        return json_response(await self.report())

    async def page(self, request: server.Request) -> BytesResponse:
        """``GET /status``."""
        return page_response(request, f"gradesvc {self.replica_id}", parts(await self.report()))


def _replica_cells(row: Mapping[str, Any]) -> List[Cell]:
    where = "this replica" if row.get("this") else str(row.get("url"))
    if not row.get("reachable"):
        return [row["name"], where, ("unreachable", "bad"), (row.get("error") or "", "bad")] + ["—"] * 9
    ready: Cell = ("ready", "ok") if row["ready"] else (str(row.get("phase")), "bad")
    broker: Cell = (_host(row.get("broker_node")) or "connected", "ok") if row.get("broker_connected") \
        else ("disconnected", "bad")
    behind = row.get("behind")
    lag = row.get("lag_seconds")
    margin = row.get("retention_margin_intervals")
    return [
        row["name"], where, ready, broker,
        number(row.get("applied_offset")),
        (number(behind), "ok" if behind == 0 else "warn") if behind is not None else "—",
        (number(lag, 3, "s"), "warn" if lag is not None and lag > 1 else "ok") if lag is not None else "—",
        number(row.get("writes_per_second"), 1),
        number(row.get("reads_per_second"), 1),
        number(row.get("checkpoint_offset")),
        number(row.get("checkpoint_age_seconds"), 0, "s"),
        (number(margin, 1), "warn" if margin < 3 else "ok") if margin is not None else "—",
        str(row.get("bootstrap_peer") or "own checkpoint / stream"),
    ]


def _host(url: Any) -> str:
    """``host:port`` of a broker URL (the JSON has the whole URL, its password masked)."""
    if not isinstance(url, str):
        return ""
    try:
        parts = urlsplit(url)
        return f"{parts.hostname}:{parts.port or 5672}" if parts.hostname else url
    except ValueError:
        return url


def parts(report: Mapping[str, Any]) -> PageParts:
    """What the page shows of a ``/status.json`` body."""
    rows = report["replicas"]
    ready = sum(1 for r in rows if r.get("ready"))
    summary: List[Cell] = [(f"{ready} of {len(rows)} replicas ready", "ok" if ready == len(rows) else "bad")]
    table = Table("Replicas", ["replica", "read port", "state", "broker node", "applied offset", "behind", "lag", "writes/s",
                               "reads/s", "checkpoint offset", "checkpoint age", "retention margin (intervals)",
                               "bootstrapped from"], [_replica_cells(r) for r in rows])
    history = report["history"]
    series = history["series"]
    charts = [Chart("Writes applied per second, last 10 minutes (this replica)", "writes/s",
                    {"writes/s": series["writes/s"]}, history["interval"]),
              Chart("Replication lag, last 10 minutes (this replica)", "s", {"lag": series["lag s"]},
                    history["interval"])]
    return f"gradesvc: replica {report['replica']}", summary, [table, *charts]
