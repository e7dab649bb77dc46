"""Leased tokens through real gateways (the shipped defaults: 2 s leases, 50 ms Redis timeout, local fallback).

Two ``twistd -n lbsvc`` processes on one private ``redis-server``: a steady
user gets what the bound allows, a gateway SIGKILLed while holding blocks
costs at most its block, and a gateway whose wall clock is an hour off
changes nothing.  Redis stopped, killed and restarted empty are in
test_gateways.py, which runs with leases on as shipped.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterator, List, Tuple, cast

import pytest

from harness.backends import Backend
from harness.daemon import assert_no_logged_errors
from harness.gateway import Gateway
from harness.net import http, wait_until
from harness.redis import RedisServer
from tests.integration.relay import Relay
from tests.integration.test_gateways import admitted, gateways, shared_user, summed, worst_window
from tests.integration.test_stream_order import skewed

pytestmark = pytest.mark.integration

C, R = 40, 20.0


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def leases(admin_port: int) -> Dict[str, object]:
    body: Dict[str, object] = json.loads(http("GET", f"http://127.0.0.1:{admin_port}/ready")[2])["limits"]["leases"]
    return body


def how_decided(targets: List[Gateway]) -> Dict[str, float]:
    """Each gateway's decisions by path, Redis errors and fallbacks: what a failed share assertion shows."""
    found: Dict[str, float] = {}
    for n, gateway in enumerate(targets):
        admin = f"http://127.0.0.1:{gateway.admin_port}"
        for path in ("lease", "redis", "local_share", "deny"):
            found[f"{n}:{path}"] = summed(admin, "lbsvc_bucket_decisions_total", path=path)
        for metric in ("lbsvc_bucket_store_errors_total", "lbsvc_bucket_store_fallback_total",
                       "lbsvc_bucket_leases_lost_total"):
            found[f"{n}:{metric}"] = summed(admin, metric)
    return found


def test_a_steady_user_gets_what_the_bound_allows_through_two_gateways(tmp_path: Path, user_database: str,
                                                                        backend: Backend, redis: RedisServer) -> None:
    a, b = gateways(tmp_path, user_database, backend, redis)
    try:
        key = shared_user(a, b, "steady", C, R)
        spans: List[Tuple[float, float]] = []
        count, elapsed = admitted([a, b], key, 4.0, connections=20, spans=spans)
        bound = C + R * elapsed + 1
        assert count <= bound and worst_window(spans, C, R)[0] <= 0, (count, bound)
        # At least 95% of what the bound allows over the 4 s the clients were sending (the clients' own ramp-up
        # and last answers, slow on a loaded machine, are no time the gateways could admit in).
        assert count >= 0.95 * (C + R * 4.0), f"{count} of {C + R * 4.0:g}; {how_decided([a, b])}"
        # Decided both ways: from blocks on lease (and refused locally until a token is due), and on Redis's
        # answers.
        local = sum(summed(f"http://127.0.0.1:{g.admin_port}", "lbsvc_bucket_decisions_total", path="lease")
                    for g in (a, b))
        calls = sum(summed(f"http://127.0.0.1:{g.admin_port}", "lbsvc_bucket_lease_calls_total") for g in (a, b))
        assert local > 0 and calls > 0, (local, calls)
        report = leases(a.admin_port)
        assert {"leases_held", "blocks_fetched", "redis_calls", "local_decisions_per_call"} <= set(report)
    finally:
        for gateway in (a, b):
            gateway.stop()
    assert_no_logged_errors([a, b])
    # SIGTERM: each gave its blocks back before closing its link; nothing is left out on lease.
    client = redis.client()
    fields = client.call("HGETALL", "lbsvc:lease:steady")
    client.close()
    state = dict(zip(fields[::2], fields[1::2]))
    assert not [k for k in state if k.startswith("h:")] and float(state.get("O", 0)) == 0, state
    # (A Redis answer later than 50 ms on a loaded machine is a warning during the load, by design; none may
    # come after SIGTERM: the link is closed only once the blocks are back.)
    after_sigterm = [g.log().split("Received SIGTERM", 1)[-1] for g in (a, b)]
    assert not any("unavailable" in tail for tail in after_sigterm), after_sigterm


def test_a_gateway_killed_holding_blocks_costs_at_most_its_block(tmp_path: Path, user_database: str,
                                                                 backend: Backend, redis: RedisServer) -> None:
    a, b = gateways(tmp_path, user_database, backend, redis)
    try:
        key = shared_user(a, b, "survivor", C, R)
        spans: List[Tuple[float, float]] = []
        admitted([a, b], key, 2.0, connections=20, spans=spans)  # both hold blocks of the user
        assert b.process is not None
        b.process.kill()
        killed = time.monotonic()
        admitted([a], key, 4.0, connections=10, spans=spans)
        assert worst_window(spans, C, R)[0] <= 0
        # b's blocks stay out on lease until they end (2 s): what a admits in the 4 s after is short by at most
        # b's share of the capacity, C/2.
        after = sum(1 for sent, _ in spans if sent >= killed)
        assert after >= R * 4.0 - C / 2 - 1, after
    finally:
        a.stop()
        b.stop()
    assert_no_logged_errors([a])


def test_a_gateway_an_hour_off_keeps_the_bound(tmp_path: Path, user_database: str, backend: Backend,
                                               redis: RedisServer) -> None:
    env = skewed(+3600)  # its wall clock; leases read only the monotonic one, and Redis's
    a, b = gateways(tmp_path, user_database, backend, redis)
    b.stop()
    b.env.update(env)
    b.start().wait_ready()
    try:
        key = shared_user(a, b, "skewed", C, R)
        spans: List[Tuple[float, float]] = []
        # 20 client threads, as for the steady user (enough to keep both gateways at the limit). With a hundred
        # threads in a PyPy test process one CI run got 93 of 120, never seen again here (eleven runs, some
        # beside two busy loops); a failure now says how each gateway decided.
        count, elapsed = admitted([a, b], key, 4.0, connections=20, spans=spans)
        assert count <= C + R * elapsed + 1 and worst_window(spans, C, R)[0] <= 0, (count, elapsed)
        assert count >= 0.9 * (C + R * 4.0), f"{count} in {elapsed:.2f} s; {how_decided([a, b])}"
    finally:
        for gateway in (a, b):
            gateway.stop()
    assert_no_logged_errors([a, b])


@pytest.mark.parametrize("lease_length", ["2", "0"])
def test_a_gateway_starting_under_load_does_not_take_itself_for_the_only_one(
        tmp_path: Path, user_database: str, backend: Backend, redis: RedisServer, lease_length: str) -> None:
    """Its first requests come before it has reached Redis (or counted the other gateways): they wait for
    the connection instead of going to a local share computed as if it were alone. With leases (the default)
    and with Redis deciding every request (``--lease-length 0``)."""
    (a,) = gateways(tmp_path, user_database, backend, redis, count=1, LBSVC_LEASE_LENGTH=lease_length)
    b = Gateway(tmp_path, user_database, name="lbsvc-late")
    b.env.update({"LBSVC_BUCKETS": redis.url, "LBSVC_LEASE_LENGTH": lease_length})
    try:
        key = shared_user(a, a, "busy", C, R)
        spans: List[Tuple[float, float]] = []
        load = threading.Thread(target=admitted, args=([a], key, 4.0), kwargs={"connections": 10, "spans": spans})
        load.start()
        b.start()
        wait_until(lambda: b.call("GET", "/user/tokens/profile", key=key)[0] == 200, 10, "b serving")
        admitted([b], key, 2.0, connections=10, spans=spans)
        load.join()
        assert worst_window(spans, C, R)[0] <= 0
    finally:
        a.stop()
        b.stop()
    assert_no_logged_errors([a, b])


def test_a_failover_to_a_lagging_replica_keeps_the_bound(tmp_path: Path, user_database: str, backend: Backend,
                                                         redis: RedisServer) -> None:
    """Redis fails over behind one address: the primary SIGKILLed, its replica promoted (``REPLICAOF NO ONE``)
    and the address pointed at it. Replication is asynchronous: here the replica's link is held back from
    before the user's first burst to the failover 1.5 s later, so its copy of the buckets and leases is that
    much behind the primary's (the burst's tokens look free again). Its ``master_replid`` is new, so the
    gateways start an epoch and the users start empty (design.md, "Leased tokens"): nothing is admitted over
    the bound in any window, and admitting resumes when the epoch's refill begins."""
    replica = RedisServer(tmp_path).start()
    relay = Relay(("127.0.0.1", redis.port))
    replication = Relay(("127.0.0.1", redis.port))  # the replica's link to the primary, to be held back
    try:
        assert replica.command("REPLICAOF", "127.0.0.1", str(replication.port)).startswith(b"+OK")
        wait_until(lambda: replica.info("master_link_status") == "up", 10, "the replica in sync")
        front = cast(RedisServer, SimpleNamespace(url=f"redis://127.0.0.1:{relay.port}/0"))
        a, b = gateways(tmp_path, user_database, backend, front)
        try:
            key = shared_user(a, b, "failover", C, R)
            spans: List[Tuple[float, float]] = []
            failed_over: List[float] = []

            def fail_over() -> None:
                redis.kill()
                assert replica.command("REPLICAOF", "NO", "ONE").startswith(b"+OK")
                relay.retarget(("127.0.0.1", replica.port))
                failed_over.append(time.monotonic())

            # The replica's copy stops here, with the user's bucket full. Had the promoted replica been trusted
            # (the epoch kept, and a bucket it never saw started full) it would hand out the burst a second
            # time: 17 over the bound when that was tried.
            replication.stall()
            timer = threading.Timer(1.5, fail_over)
            timer.start()
            admitted([a, b], key, 8.0, connections=20, spans=spans)
            timer.join()
            assert worst_window(spans, C, R)[0] <= 0, worst_window(spans, C, R)
            # The promoted replica keeps an epoch of its own (the state it copied was not trusted), begun when the
            # gateways were back (their reconnection back-off is at most 2 s) ...
            client = replica.client()
            epoch, began = client.call("HMGET", "lbsvc:lease-epoch", "id", "start")
            client.close()
            assert epoch == replica.info("master_replid"), epoch
            began = float(began) - (time.time() - time.monotonic())  # Redis's clock is this machine's
            assert began - failed_over[0] < 3.0, began - failed_over[0]
            # ... and admitting resumed once its refill began, one lease length after its start: what the local
            # fallback admitted during the outage (tokens of the lost state) is not a debt of the new epoch.
            refill = began + 2.0
            after = sorted(sent - refill for sent, _ in spans if sent >= refill)
            assert after and after[0] < 1.0, f"{after[:3]}; {how_decided([a, b])}"
        finally:
            for gateway in (a, b):
                gateway.stop()
        assert_no_logged_errors([a, b])
    finally:
        relay.close()
        replication.close()
        replica.stop()
