"""The status pages in a real browser: real daemons, Debian's chromium driven by Playwright.

Each page's numbers are checked against the daemons' own ``/ready`` and
``/metrics``; a peer or a backend is stopped and the open page must show it
within 3 s; every request the page makes must stay on the daemon's own port
(nothing fetched from outside); the page works with JavaScript off; a
screenshot of each page is saved (``build/screenshots``, or
``$SCREENSHOT_DIR``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, List

import pytest

from harness.backends import Backend, servers_file
from harness.daemon import assert_no_logged_errors
from harness.gateway import Gateway
from harness.net import http, metric, wait_until
from harness.replica import GradeReplica
from tests.integration.browser import SCREENSHOTS, Browser

pytestmark = pytest.mark.integration

SHOWN_WITHIN = 3.0
"""Seconds an open page has to show a stopped peer or backend."""


@pytest.fixture
def browser() -> Iterator[Browser]:
    started = Browser()
    yield started
    started.close()


def status_json(base: str) -> dict:
    code, headers, body = http("GET", base + "/status.json")
    assert code == 200 and headers["cache-control"] == "no-store"
    return dict(json.loads(body))


def only_from(browser: Browser, origin: str) -> None:
    """Every request the page made went to ``origin``'s status page."""
    urls: List[str] = browser.call("requests")["urls"]
    assert urls and all(url.startswith(origin + "/status") for url in urls), urls


def refused_politely(base: str) -> None:
    """Hostile requests to the pages: a clear 4xx, no traceback."""
    assert http("GET", base + "/status?part=everything")[0] == 400
    assert http("POST", base + "/status")[0] == 405
    assert http("POST", base + "/status", b"{}")[0] in (405, 413)  # the admin endpoint takes no body at all
    assert http("DELETE", base + "/status.json")[0] == 405
    assert http("GET", base + "/status/../status.json")[0] in (400, 404)
    code, headers, _ = http("GET", base + "/status")
    assert code == 200 and "default-src 'none'" in headers["content-security-policy"]


def test_gradesvc_status_shows_every_replica_and_a_peer_going_away(tmp_path: Path, stream: str,
                                                                   browser: Browser) -> None:
    a = GradeReplica(tmp_path, stream, "a").start().wait_ready()
    b = GradeReplica(tmp_path, stream, "b", peers=[a.read_url]).start().wait_ready()
    try:
        for i in range(5):
            assert a.set({"user_id": f"u{i}", "spp": i})[0] == 200
        wait_until(lambda: b.ready()["applied_offset"] == a.ready()["applied_offset"], 10, "b caught up")
        # The JSON: each replica as its own /ready and /metrics say.
        status = status_json(b.read_url)
        assert status["service"] == "gradesvc" and status["replica"] == "b"
        own, peer = status["replicas"]
        for row, replica in ((own, b), (peer, a)):
            ready = replica.ready()
            assert row["reachable"] and row["ready"] and row["phase"] == ready["phase"] == "ready"
            assert row["applied_offset"] == ready["applied_offset"] == replica.metric("gradesvc_applied_offset")
            assert row["behind"] == 0
        assert own["url"] is None and peer["url"] == a.read_url and own["bootstrap_peer"] == a.read_url
        assert (own["name"], own["this"], peer["name"], peer["this"]) == ("b", True, "a", False)  # by replica id
        assert b.ready()["replica_id"] == "b"
        assert len(status["history"]["series"]["writes/s"]) <= 600
        # The page: the same numbers, drawn.
        assert browser.call("open", url=b.read_url + "/status")["title"] == "gradesvc b"
        rows = browser.call("cells", table="Replicas")["rows"]
        assert [r[:2] for r in rows] == [["b", "this replica"], ["a", a.read_url]]
        for row, replica in zip(rows, (b, a)):
            assert row[2] == "ready" and row[4] == f"{replica.ready()['applied_offset']:,}"
        assert "2 of 2 replicas ready" in browser.call("text")["text"]
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.call("screenshot", path=str(SCREENSHOTS / "gradesvc-status.png"))
        # A peer dies: the open page says so within 3 s, without a reload.
        a.kill()
        assert browser.call("wait_text", text="unreachable", timeout=SHOWN_WITHIN)["seconds"] is not None
        assert "1 of 2 replicas ready" in browser.call("text")["text"]
        gone = status_json(b.read_url)["replicas"][1]
        assert gone["reachable"] is False and gone["name"] == "a"  # still named by its id
        only_from(browser, b.read_url)
        # Without JavaScript: the numbers as of loading, and nothing fetched but the page.
        browser.call("open", url=b.read_url + "/status", javascript=False)
        rows = browser.call("cells", table="Replicas")["rows"]
        assert rows[0][2] == "ready" and rows[0][4] == f"{b.ready()['applied_offset']:,}"
        assert rows[1][:3] == ["a", a.read_url, "unreachable"]
        only_from(browser, b.read_url)
        refused_politely(b.read_url)
    finally:
        a.stop()
        b.stop()
    assert_no_logged_errors([a, b])


def test_lbsvc_status_shows_backends_limits_and_a_backend_going_down(tmp_path: Path, browser: Browser) -> None:
    one, two = Backend("one"), Backend("two")
    # The shipped health-check settings (every 2 s, out after 2 failures), not the tests' quick ones.
    servers_file(tmp_path / "servers.yaml", {b.name: b.url for b in (one, two)}, {"path": "/health"})
    gateway = Gateway(tmp_path, "users.sqlite3").start().wait_ready()  # relative: the screenshot shows no path
    admin = f"http://127.0.0.1:{gateway.admin_port}"
    try:
        key = gateway.create("viewer")
        assert gateway.call("POST", "/user/tokens/change", {"capacity": 1000, "rate_per_sec": 100}, key=key)[0] == 200
        sent = [0]

        def traffic_until_sampled(samples: int) -> bool:  # a few requests, until the history has that many points
            for _ in range(5):
                assert gateway.call("GET", "/x", key=key)[0] == 200
                sent[0] += 1
            return len(status_json(admin)["history"]["upstream_latency_ms"]["series"]["p50"]) >= samples

        wait_until(lambda: traffic_until_sampled(4), 10, "four samples with traffic")
        status = status_json(admin)
        ready = json.loads(http("GET", admin + "/ready")[2])
        assert status["service"] == "lbsvc" and status["ready"] is ready["ready"] is True
        assert {b["name"]: b["healthy"] for b in status["backends"]} == ready["backends"] == {"one": True,
                                                                                              "two": True}
        for row in status["backends"]:
            assert row["in_flight"] == metric(admin + "/metrics", "lbsvc_backend_in_flight", backend=row["name"])
            assert row["error_rate"] == 0 and row["latency_ms"]["p50"] is not None
        answered = sum(metric(admin + "/metrics", "lbsvc_upstream_response_seconds_count", backend=name)
                       for name in ("one", "two"))
        assert answered == metric(admin + "/metrics", "lbsvc_http_requests_total", route="proxy", code="200") == sent[0]
        assert all(b["requests_per_second"] is not None for b in status["backends"])
        assert status["limits"]["mode"] == ready["limits"]["mode"] == "memory" and status["limits"]["redis_up"] is None
        users = status["users"]
        assert users["count"] == metric(admin + "/metrics", "lbsvc_users") == 1
        assert users["change_log_position"] == metric(admin + "/metrics", "lbsvc_user_changes_applied") == 2
        assert status["workers"] == ready["workers"]
        # Nothing about users' keys (or names) is ever shown.
        assert key not in json.dumps(status) and "viewer" not in json.dumps(status)
        # The page.
        assert browser.call("open", url=admin + "/status")["title"] == "lbsvc"
        rows = browser.call("cells", table="Backends")["rows"]
        assert [(r[0], r[1], r[3]) for r in rows] == [("one", "up", "yes"), ("two", "up", "yes")]
        text = browser.call("text")["text"]
        assert "2 of 2 backends in rotation" in text and key not in text and "viewer" not in text
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.call("screenshot", path=str(SCREENSHOTS / "lbsvc-status.png"))
        # A backend stops while users' requests flow: the first one that cannot reach it takes it out of
        # rotation (passive; the active checks alone would take two 2 s intervals), and the open page
        # shows it within 3 s.
        two.stop()
        for _ in range(4):
            assert gateway.call("GET", "/x", key=key)[0] == 200  # retried on the other backend
        assert browser.call("wait_text", text="1 of 2 backends in rotation", timeout=SHOWN_WITHIN)["seconds"] \
            is not None
        rows = browser.call("cells", table="Backends")["rows"]
        assert [(r[0], r[1], r[3]) for r in rows] == [("one", "up", "yes"), ("two", "down", "no")]
        only_from(browser, admin)
        browser.call("open", url=admin + "/status", javascript=False)
        assert browser.call("cells", table="Backends")["rows"][1][1] == "down"
        only_from(browser, admin)
        refused_politely(admin)
    finally:
        gateway.stop()
        one.stop()
        two.stop()
    assert_no_logged_errors([gateway])
