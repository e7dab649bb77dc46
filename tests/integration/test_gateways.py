"""Several gateways as one: shared users (SQLite file or PostgreSQL), one budget in Redis.

Real ``twistd -n lbsvc`` processes, the machine's PostgreSQL (a database per
test), and a private ``redis-server`` on a free port that tests kill and
restart.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.backends import Backend, servers_file, write_servers
from harness.daemon import assert_no_logged_errors
from harness.databases import create_database, drop_database
from harness.gateway import Gateway
from harness.net import http, metric, wait_until
from harness.redis import RedisServer
from lbsvc.limits.livegateways import INTERVAL, TTL
from lbsvc.limits.redisbuckets import CONFIRM_AFTER
from tests.integration.relay import Relay

pytestmark = pytest.mark.integration


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def gateways(tmp_path: Path, database: str, backend: Backend, redis: RedisServer, count: int = 2,
             **env: str) -> List[Gateway]:
    # Patient health checks: the load tests keep this machine's two cores busy.
    servers_file(tmp_path / "servers.yaml", {"one": backend.url},
                 {"path": "/health", "interval": 2, "timeout": 2, "fall": 3})
    started = []
    for n in range(count):
        gateway = Gateway(tmp_path, database, name=f"lbsvc-{n}")
        gateway.env.update({"LBSVC_BUCKETS": redis.url, **env})
        started.append(gateway.start())
    processes = count * int(env.get("LBSVC_WORKERS", "1"))
    for gateway in started:
        gateway.wait_ready()
    for gateway in started:  # every process's heartbeat counted: the fallback's shares are right from here on
        wait_until(lambda g=gateway: json.loads(http("GET", f"http://127.0.0.1:{g.admin_port}/ready")[2])
                   ["limits"]["gateways"] == processes, 5, "every process's heartbeat")
    return started


def shared_user(a: Gateway, b: Gateway, name: str, capacity: int, rate: float) -> str:
    """A user made on ``a`` with these limits, applied by every process of both within a second; its key."""
    key = a.create(name)

    def change() -> bool:  # idempotent: again while it lands on a process that has not read the creation
        code = a.call("POST", "/user/tokens/change", {"capacity": capacity, "rate_per_sec": rate}, key=key)[0]
        assert code in (200, 401), code
        return bool(code == 200)

    within(1.0, change, "the new limits set on a")

    def applied() -> bool:  # both changes (create, change) by every process (each --workers one syncs alone)
        positions = [s.value for g in (a, b) for f in text_string_to_metric_families(
            http("GET", f"http://127.0.0.1:{g.admin_port}/metrics")[2].decode()) for s in f.samples
            if s.name == "lbsvc_user_changes_applied"]
        return len(positions) >= 2 and min(positions) >= 2

    within(1.0, applied, "the user's changes applied everywhere")
    return key


def within(seconds: float, condition: Callable[[], bool], what: str) -> float:
    """Poll ``condition``; fail unless it holds within ``seconds``; the time it took."""
    start = time.monotonic()
    wait_until(condition, seconds, what)
    return time.monotonic() - start


def admitted(targets: List[Gateway], key: str, seconds: float, connections: int = 100,
             spans: Optional[List[Tuple[float, float]]] = None) -> Tuple[int, float]:
    """Requests answered 200 by ``targets`` (round robin) from ``connections`` threads for ``seconds``;
    with ``spans``, each admitted request's (sent, answered) monotonic times are added to it."""
    ok = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(n: int) -> None:
        gateway = targets[n % len(targets)]
        while time.monotonic() < deadline:
            sent = time.monotonic()
            code = gateway.call("GET", "/x", key=key)[0]
            assert code in (200, 429), code
            if code == 200:
                answered = time.monotonic()
                with lock:
                    ok[0] += 1
                    if spans is not None:
                        spans.append((sent, answered))

    start = time.monotonic()
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(client, range(connections)))
    return ok[0], time.monotonic() - start


def worst_window(spans: List[Tuple[float, float]], capacity: int, rate: float) -> Tuple[float, float, float]:
    """The window [t1, t2] holding the most admissions beyond ``C + R·(t2 - t1) + 1``: (excess, t1, t2).

    Only requests both sent and answered inside a window are counted in it
    (they were certainly admitted there), so client-side latency cannot
    make a window look fuller than it was.
    """
    worst = (float("-inf"), 0.0, 0.0)
    for t1, _ in spans:
        inside = sorted(answered for sent, answered in spans if sent >= t1)
        for count, t2 in enumerate(inside, start=1):
            excess = count - (capacity + rate * (t2 - t1) + 1)
            if excess > worst[0]:
                worst = (excess, t1, t2)
    return worst


def test_two_gateways_behave_as_one(tmp_path: Path, user_database: str, backend: Backend,
                                    redis: RedisServer) -> None:
    a, b = gateways(tmp_path, user_database, backend, redis)  # the defaults: a 50 ms Redis timeout, local shares
    try:
        key = shared_user(a, b, "shared", 40, 10)
        # One budget: 100 connections split over both gateways admit at most C + R·t + 1, in every window.
        spans: List[Tuple[float, float]] = []
        count, elapsed = admitted([a, b], key, 3.0, spans=spans)
        bound = 40 + 10 * elapsed + 1
        assert 40 <= count <= bound, (count, bound)
        assert worst_window(spans, 40, 10)[0] <= 0
        # Redis decides.  On this loaded machine Redis itself (not the gateway: the clock starts once the
        # command is written, and the answer is looked for once more) sometimes answers after 50 ms (about 1%
        # of the decisions with CPython clients, up to half with 100 PyPy client threads); those decisions fall
        # to the shares, which start empty until an outage is confirmed, so the bound above holds regardless.
        by_path = {path: sum(summed(f"http://127.0.0.1:{g.admin_port}", "lbsvc_bucket_decisions_total", path=path)
                             for g in (a, b)) for path in ("redis", "local_share")}
        assert by_path["redis"] > 0, by_path
        # Rotation and deletion on one are seen on the other.
        code, _, body = b.call("POST", "/user/keys/rotate", key=key)
        assert code == 200
        new = json.loads(body)["api_key"]
        within(1.0, lambda: a.call("GET", "/user/tokens/profile", key=key)[0] == 401, "the old key refused on a")
        within(1.0, lambda: a.call("GET", "/user/tokens/profile", key=new)[0] == 200, "the new key on a")
        assert a.call("POST", "/user/delete", key=new)[0] == 200
        within(1.0, lambda: b.call("GET", "/user/tokens/profile", key=new)[0] == 401, "the deletion on b")
    finally:
        for gateway in (a, b):
            gateway.stop()
    assert_no_logged_errors([a, b])


def test_memory_buckets_beside_other_gateways_are_reported(tmp_path: Path, user_database: str,
                                                           backend: Backend) -> None:
    """Two gateways with memory buckets on one user database: each says, once, that it admits a user's whole
    limit beside the other (log, /ready note, metrics) and stays ready; a killed one stops counting."""
    write_servers(tmp_path / "servers.yaml", [backend])
    alone = {"buckets": "memory", "mode": "memory", "gateways": 1}
    a = Gateway(tmp_path, user_database, name="lbsvc-a").start().wait_ready()
    b = Gateway(tmp_path, user_database, name="lbsvc-b")

    def ready(gateway: Gateway) -> dict:
        return dict(json.loads(http("GET", f"http://127.0.0.1:{gateway.admin_port}/ready")[2]))

    try:
        assert ready(a)["limits"] == alone
        b.start().wait_ready()
        for gateway in (a, b):
            admin = f"http://127.0.0.1:{gateway.admin_port}/metrics"
            wait_until(lambda g=gateway: ready(g)["limits"]["gateways"] == 2, 2 * INTERVAL + 2, "the other gateway")
            body = ready(gateway)
            assert body["ready"] is True and "up to 2 times its limit" in body["limits"]["note"]
            assert metric(admin, "lbsvc_limits_per_process") == 1 and metric(admin, "lbsvc_gateways_live") == 2
            assert gateway.log().count("gateways share this user database with memory buckets") == 1
        b.kill()  # no goodbye: its heartbeat row stays, and stops moving
        wait_until(lambda: ready(a)["limits"] == alone, TTL + INTERVAL + 2, "the killed gateway no longer counted")
        assert metric(f"http://127.0.0.1:{a.admin_port}/metrics", "lbsvc_limits_per_process") == 0
    finally:
        for gateway in (a, b):
            gateway.stop()
    assert_no_logged_errors([a, b])


class Load:
    """Four threads calling the gateway until stopped; the status codes seen."""

    def __init__(self, gateway: Gateway, key: str) -> None:
        self.codes: List[int] = []
        self.running = True
        self.threads = [threading.Thread(target=self._run, args=(gateway, key)) for _ in range(4)]
        for thread in self.threads:
            thread.start()

    def _run(self, gateway: Gateway, key: str) -> None:
        while self.running:
            self.codes.append(gateway.call("GET", "/x", key=key)[0])

    def stop(self) -> List[int]:
        self.running = False
        for thread in self.threads:
            thread.join()
        return self.codes


@pytest.mark.parametrize("mode", ["local", "deny"])
def test_redis_killed_and_restarted_under_load(tmp_path: Path, backend: Backend, redis: RedisServer,
                                               mode: str) -> None:
    (gateway,) = gateways(tmp_path, str(tmp_path / "users.sqlite3"), backend, redis, count=1,
                          LBSVC_BUCKET_STORE_FALLBACK=mode)
    admin = f"http://127.0.0.1:{gateway.admin_port}/metrics"
    load: Optional[Load] = None
    try:
        key = gateway.create("steady")
        assert gateway.call("POST", "/user/tokens/change", {"capacity": 1000, "rate_per_sec": 1000},
                            key=key)[0] == 200
        assert gateway.call("GET", "/x", key=key)[0] == 200
        load = Load(gateway, key)  # requests keep flowing through the kill and the restart
        redis.kill()
        if mode == "local":
            # Its share: refilled at R/N at once, and its part of the last level once the outage is confirmed.
            within(2 * CONFIRM_AFTER, lambda: all(gateway.call("GET", "/x", key=key)[0] == 200 for _ in range(20)),
                   "the share admitting")
        else:
            answers = [gateway.call("GET", "/x", key=key) for _ in range(20)]
            assert [a[0] for a in answers] == [503] * 20
            assert answers[0][1]["retry-after"] == "1"
        assert metric(admin, "lbsvc_bucket_store_fallback_total", mode=mode) >= 19
        assert metric(admin, "lbsvc_bucket_store_up") == 0
        redis.start()
        within(10.0, lambda: gateway.call("GET", "/x", key=key)[0] == 200
               and metric(admin, "lbsvc_bucket_store_up") == 1, "Redis used again")
        codes = load.stop()
        # 429: Redis back, and empty (it lost every level); 503: the outage with the deny fallback.
        assert codes and set(codes) <= ({200, 429} if mode == "local" else {200, 429, 503}), set(codes)
        fallbacks = metric(admin, "lbsvc_bucket_store_fallback_total", mode=mode)
        # Redis decides again.  It lost every level: users start empty for one lease length (blocks of the lost
        # state may still be spent meanwhile), and what the local shares admitted is charged as a debt; so the
        # next requests may be refused for a while, by Redis, until the bucket has refilled.
        within(5.0, lambda: all(gateway.call("GET", "/x", key=key)[0] == 200 for _ in range(10)), "admitting again")
        assert metric(admin, "lbsvc_bucket_store_fallback_total", mode=mode) == fallbacks
        log = gateway.log()
        assert "unavailable" in log and "reachable again" in log
    finally:
        if load is not None:
            load.stop()
        gateway.stop()
    assert_no_logged_errors([gateway])


def test_postgresql_unreachable_is_503_and_recovers_without_restart(tmp_path: Path, backend: Backend) -> None:
    url = create_database()
    relay = Relay(("127.0.0.1", 5432))
    through_relay = url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
    write_servers(tmp_path / "servers.yaml", [backend])
    gateway = Gateway(tmp_path, through_relay).start().wait_ready()
    ready = f"http://127.0.0.1:{gateway.admin_port}/ready"
    try:
        key = gateway.create("known")
        relay.cut()
        start = time.monotonic()
        code, headers, body = gateway.call("POST", "/user/create", {"name": "during"})
        assert code == 503 and headers["retry-after"] and "Error" in json.loads(body)
        assert time.monotonic() - start < 2.5
        assert gateway.call("POST", "/user/tokens/change", {"capacity": 9}, key=key)[0] == 503
        assert gateway.call("GET", "/x", key=key)[0] == 200  # known users are still served
        wait_until(lambda: http("GET", ready)[0] == 503, 10, "/ready to say the user changes are unseen")
        assert "user_sync" in json.loads(http("GET", ready)[2])["problems"]
        relay.restore()
        wait_until(lambda: gateway.call("POST", "/user/create", {"name": "after"})[0] == 201, 15,
                   "writes accepted again")
        wait_until(lambda: http("GET", ready)[0] == 200, 10, "/ready again")
    finally:
        gateway.stop()
        relay.close()
        drop_database(url)
    errors = [line for line in gateway.logged_errors() if "User database" not in line]
    assert errors == []


def children(pid: int) -> List[int]:
    """Process ids whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_workers_share_the_port_and_one_budget(tmp_path: Path, user_database: str, backend: Backend,
                                               redis: RedisServer) -> None:
    (gateway,) = gateways(tmp_path, user_database, backend, redis, count=1, LBSVC_WORKERS="2")
    assert gateway.process is not None
    parent = gateway.process.pid
    try:
        wait_until(lambda: len(children(parent)) == 1, 10, "one worker process")
        (worker,) = children(parent)
        key = shared_user(gateway, gateway, "busy", 40, 10)
        before = cpu_ticks(worker)
        spans: List[Tuple[float, float]] = []
        count, elapsed = admitted([gateway], key, 2.0, spans=spans)
        assert 40 <= count <= 40 + 10 * elapsed + 1, (count, elapsed)
        assert worst_window(spans, 40, 10)[0] <= 0
        assert cpu_ticks(worker) > before  # the worker took its share of the connections
        # The parent's /metrics covers both processes; its /ready counts them.
        admin = f"http://127.0.0.1:{gateway.admin_port}"
        text = http("GET", admin + "/metrics")[2].decode()
        proxied = {s.labels["worker"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "lbsvc_http_requests_total" and s.labels.get("route") == "proxy"
                   and s.labels.get("code") == "200"}
        assert set(proxied) == {"0", "1"} and all(v > 0 for v in proxied.values()) and sum(proxied.values()) == count
        assert metric(admin + "/metrics", "lbsvc_worker_up", worker="1") == 1
        assert json.loads(http("GET", admin + "/ready")[2])["workers"] == {"configured": 2, "running": 2}
        gateway.process.kill()  # the parent dies: its worker stops too
        gateway.process.wait()
        wait_until(lambda: not Path(f"/proc/{worker}").exists() or "Z" in
                   Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0], 5, "the worker to stop")
    finally:
        gateway.stop()
    assert_no_logged_errors([gateway])


def summed(admin: str, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels`` (every worker's, say)."""
    text = http("GET", admin + "/metrics")[2].decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


@pytest.mark.parametrize("fault, workers", [("stop", 1), ("kill", 1), ("stop", 2)])
def test_default_settings_stay_within_the_bound_through_a_redis_fault(tmp_path: Path, user_database: str,
                                                                      backend: Backend, redis: RedisServer,
                                                                      fault: str, workers: int) -> None:
    """The issue's measurement, with the defaults (50 ms Redis timeout, local fallback): 100 connections
    over two gateways (of one or two processes each), Redis SIGSTOPped for 3 s (or SIGKILLed, and a new
    one started 3 s later: every level lost) in the middle; the whole run, and every window of it, admits
    at most C + R·t + 1."""
    a, b = gateways(tmp_path, user_database, backend, redis, LBSVC_WORKERS=str(workers))
    if fault == "stop":
        stalled = threading.Timer(2.0, lambda: redis.process.send_signal(signal.SIGSTOP))  # type: ignore[union-attr]
        resumed = threading.Timer(5.0, lambda: redis.process.send_signal(signal.SIGCONT))  # type: ignore[union-attr]
    else:
        stalled, resumed = threading.Timer(2.0, redis.kill), threading.Timer(5.0, redis.start)
    try:
        key = shared_user(a, b, "bounded", 10, 20)
        stalled.start()
        resumed.start()
        spans: List[Tuple[float, float]] = []
        count, elapsed = admitted([a, b], key, 8.0, spans=spans)
        bound = 10 + 20 * elapsed + 1
        assert count <= bound, (count, bound)
        assert worst_window(spans, 10, 20)[0] <= 0
        assert count >= 0.5 * bound, (count, bound)  # and it did admit: shares, not a denial
        shared = sum(summed(f"http://127.0.0.1:{g.admin_port}", "lbsvc_bucket_decisions_total",
                            path="local_share") for g in (a, b))
        assert shared > 0  # the stall was decided by the shares
    finally:
        stalled.cancel()
        resumed.cancel()
        if redis.process is not None and fault == "stop":
            redis.process.send_signal(signal.SIGCONT)
        for gateway in (a, b):
            gateway.stop()
    assert_no_logged_errors([a, b])
