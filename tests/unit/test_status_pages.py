"""The status pages' parts in memory: the ring buffer, quantiles, the HTML, a peer fetched through StubTreq."""

from __future__ import annotations

import json
from typing import Any, Dict, List

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from treq.testing import StubTreq
from twisted.internet import defer, task
from twisted.web import resource, server
from twisted.web.test.requesthelper import DummyRequest

from gradesvc.status.overview import FRESH, PeerWatch, parts
from lbsvc.overview import numbers, quantile
from svckit.history import History
from svckit.responses import HTTPError
from svckit.statuspage import Chart, Table, body, document, page_response
from tests.unit.fired import fired


def test_history_keeps_a_bounded_ring_and_turns_counters_into_rates() -> None:
    clock = task.Clock()
    counter = [0.0]
    history = History(clock, lambda: {"n": counter[0], "level": counter[0] / 10}, size=5)
    history.startService()
    for step in (3, 3, 6, 0, 2, 2):
        clock.advance(1)
        counter[0] += step
    assert len(history.points) == 5  # bounded: the oldest dropped
    # Sampled at 0..6 s (each before that second's step): 0, 0, 3, 6, 12, 12, 14; the last five kept.
    assert history.rates("n") == [3.0, 6.0, 0.0, 2.0]
    assert history.values("level") == [0.3, 0.6, 1.2, 1.2, 1.4]
    assert history.rate_over("n", 2) == 1.0 and history.rate_over("n", 100) == 2.75  # as far back as kept
    counter[0] = 1  # a restarted counter: no rate for that step, not a negative one
    clock.advance(1)
    assert history.rates("n")[-1] is None and history.rates("missing") == [None] * 4
    history.stopService()
    clock.advance(5)
    assert len(history.points) == 5 and history.points[-1][0] == 7


def test_a_failed_sample_is_a_missing_point_not_a_stopped_loop() -> None:
    clock = task.Clock()
    answers: List[Any] = [{"n": 1.0}, defer.fail(ConnectionError("worker gone")), {"n": 3.0}]
    history = History(clock, lambda: answers.pop(0))
    history.startService()
    clock.advance(1)
    clock.advance(1)
    assert [values["n"] for _, values in history.points] == [1.0, 3.0]


def test_quantiles_as_prometheus_estimates_them() -> None:
    buckets = [(0.1, 50.0), (0.2, 90.0), (0.5, 99.0), (float("inf"), 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.15)
    assert quantile(0.99, buckets) == pytest.approx(0.5)
    assert quantile(0.999, buckets) == 0.5  # in the +Inf bucket: its lower bound
    assert quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None


def test_gateway_numbers_from_its_metrics() -> None:
    registry = CollectorRegistry()
    requests = Counter("lbsvc_http_requests", "", ["route", "code"], registry=registry)
    requests.labels("proxy", "200").inc(7)
    requests.labels("proxy", "429").inc(2)
    requests.labels("user_create", "201").inc(5)  # not proxied
    upstream = Counter("lbsvc_upstream_requests", "", ["backend", "outcome"], registry=registry)
    upstream.labels("a", "200").inc(6)
    upstream.labels("a", "502").inc(1)
    upstream.labels("a", "timeout").inc(1)
    latency = Histogram("lbsvc_upstream_response_seconds", "", ["backend"], buckets=(0.1, 1.0), registry=registry)
    latency.labels("a").observe(0.05)
    seen = numbers(registry.collect())
    assert seen["proxied:2xx"] == 7 and seen["proxied:4xx"] == 2 and seen["proxied:5xx"] == 0
    assert seen["requests:a"] == 8 and seen["errors:a"] == 2
    assert seen["le:a:0.1"] == seen["le:*:+Inf"] == 1


def test_the_page_escapes_what_it_shows_and_draws_gaps() -> None:
    html = body("<b>title</b>", [("<script>", "bad")], [
        Table("t", ["a"], [[("<img src=x onerror=alert(1)>", "ok")]]),
        Chart("c", "ms", {"<i>": [None, 1.0, 2.0, None, 3.0]}, slots=5),
    ])
    assert "<script>" not in html and "<img" not in html and "<i>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.count("<polyline") == 2  # the gap splits the line
    page = document("t", html).decode()
    assert page.count("<script>") == 1 and "http://" not in page and "https://" not in page


def test_the_body_alone_for_the_script_and_a_bad_part_refused() -> None:
    parts = ("t", ["fact"], [Table("t", ["a"], [])])
    request = DummyRequest([b"status"])
    whole = page_response(request, "t", parts)
    assert whole.body.startswith(b"<!DOCTYPE html>") and "default-src 'none'" in whole.headers["Content-Security-Policy"]
    request.args = {b"part": [b"body"]}
    assert page_response(request, "t", parts).body.startswith(b"<h1>")
    request.args = {b"part": [b"body", b"body"]}
    with pytest.raises(HTTPError) as refused:
        page_response(request, "t", parts)
    assert refused.value.code == 400


class FakePeer(resource.Resource):
    """A peer's read port: ``/ready`` and ``/metrics``, counting the requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hits: List[bytes] = []
        self.applied = 10
        self.replica_id: Any = None
        self.down = False

    def render_GET(self, request: server.Request) -> bytes:
        self.hits.append(request.path)
        if self.down:
            request.setResponseCode(502)
            return b"gone"
        if request.path == b"/ready":
            request.setResponseCode(200)
            ready = {"ready": True, "phase": "ready", "broker_connected": True, "applied_offset": 41,
                     "lag_seconds": 0.002, "snapshot": {"peer": None, "rows_loaded": 0}}
            if self.replica_id is not None:
                ready["replica_id"] = self.replica_id
            return json.dumps(ready).encode()
        return (f"gradesvc_stream_messages_applied_total {self.applied}.0\n"
                "gradesvc_checkpoint_offset -1.0\n").encode()


def test_a_peer_is_fetched_once_a_second_however_many_look() -> None:
    clock = task.Clock()
    peer = FakePeer()
    watch = PeerWatch("http://peer:8070", clock, StubTreq(peer))
    first = fired(watch.row())
    assert first["ready"] and first["applied_offset"] == 41 and first["checkpoint_offset"] is None
    assert first["writes_per_second"] is None  # one look: no rate yet
    assert fired(watch.row()) is first and len(peer.hits) == 2  # reused within FRESH
    clock.advance(FRESH * 2)
    peer.applied = 30
    assert fired(watch.row())["writes_per_second"] == pytest.approx(10.0)  # 20 more in 2 s
    assert len(peer.hits) == 4


def test_a_peer_that_is_not_a_replica_is_shown_unreachable() -> None:
    class Teapot(resource.Resource):
        isLeaf = True

        def render_GET(self, request: server.Request) -> bytes:
            request.setResponseCode(418)
            return b"<html>not json</html>"

    row: Dict[str, Any] = fired(PeerWatch("http://teapot", task.Clock(), StubTreq(Teapot())).row())
    assert row["reachable"] is False and row["ready"] is False and "JSONDecodeError" in row["error"]


def test_a_peer_whose_ready_has_another_shape_is_shown_unreachable() -> None:
    class Odd(FakePeer):
        def render_GET(self, request: server.Request) -> bytes:
            if request.path == b"/ready":
                return json.dumps({"ready": True, "snapshot": ["not", "an", "object"]}).encode()
            return super().render_GET(request)

    watch = PeerWatch("http://odd", task.Clock(), StubTreq(Odd()))
    row: Dict[str, Any] = fired(watch.row())
    assert row["reachable"] is False and "AttributeError" in row["error"]


def test_a_peer_is_named_by_the_id_its_ready_gives_and_keeps_it_while_unreachable() -> None:
    clock = task.Clock()
    peer = FakePeer()
    watch = PeerWatch("http://127.0.0.1:8072", clock, StubTreq(peer))
    row: Dict[str, Any] = fired(watch.row())
    assert (row["name"], row["url"], row["this"]) == ("http://127.0.0.1:8072", "http://127.0.0.1:8072", False)
    peer.replica_id = "bravo"
    clock.advance(FRESH * 2)
    row = fired(watch.row())
    assert (row["name"], row["url"]) == ("bravo", "http://127.0.0.1:8072")
    peer.down = True
    clock.advance(FRESH * 2)
    row = fired(watch.row())
    assert (row["name"], row["reachable"]) == ("bravo", False)  # the last id seen, not the URL
    cells = parts({"replica": "alpha", "replicas": [row], "history": {"series": {"writes/s": [], "lag s": []},
                                                                     "interval": 1}})[2][0].rows[0]
    assert cells[:3] == ["bravo", "http://127.0.0.1:8072", ("unreachable", "bad")]


@pytest.mark.parametrize("odd", [["a", "list"], 7, "", "x" * 201])
def test_an_odd_replica_id_leaves_the_peer_named_by_its_url(odd: Any) -> None:
    peer = FakePeer()
    peer.replica_id = odd
    row: Dict[str, Any] = fired(PeerWatch("http://peer:8070", task.Clock(), StubTreq(peer)).row())
    assert row["reachable"] and row["name"] == "http://peer:8070"
