"""Several real replicas on one real stream (contract 2.4, 2.5).

Each test ends by checking that every acknowledged write is on every replica
and that the replicas' full states (values and per-field versions) agree.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pika
import pytest

from gradesvc.state.store import FIELDS
from harness.broker import BROKER_URL
from harness.net import free_port, http, wait_until
from harness.replica import GradeReplica
from tests.integration.relay import Relay

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stream_protocol")]

Make = Callable[..., GradeReplica]


def backup_rows(replica: GradeReplica) -> Dict[str, Tuple[str, ...]]:
    code, _, body = http("GET", replica.read_url + "/backup", timeout=60)
    assert code == 200, body[:200]
    rows = list(csv.reader(io.StringIO(gzip.decompress(body).decode(), newline="")))
    assert rows[1][0] == "stream_offset" and rows[5][:5] == ["user_id", *FIELDS]
    assert [r[0] for r in rows[2:5]] == ["stream_vhost", "stream_name", "anchor_sha256"]
    return {r[0]: tuple(r[1:]) for r in rows[6:]}


def assert_converged(replicas: List[GradeReplica], timeout: float = 30.0) -> Dict[str, Tuple[str, ...]]:
    """Wait until all replicas are ready and hold identical data (values and versions)."""
    states: List[Dict[str, Tuple[str, ...]]] = []
    for replica in replicas:  # one may be reconnecting after a fault: convergence is of ready replicas
        replica.wait_ready(timeout)

    def same() -> bool:
        states[:] = [backup_rows(r) for r in replicas]
        return all(s == states[0] for s in states[1:])

    wait_until(same, timeout, "replicas to converge")
    return states[0]


def expect(state: Dict[str, Tuple[str, ...]], acked: Dict[str, Dict[str, int]]) -> None:
    """Every acknowledged final value is in ``state``."""
    for user, fields in acked.items():
        assert user in state, user
        for name, value in fields.items():
            assert int(state[user][FIELDS.index(name)]) == value, (user, name)


@pytest.fixture
def trio(replicas: Make) -> List[GradeReplica]:
    a = replicas("a").wait_ready()
    b = replicas("b", [a])
    c = replicas("c", [a, b])
    return [a, b.wait_ready(), c.wait_ready()]


def test_writes_travel_between_replicas(trio: List[GradeReplica]) -> None:
    a, b, c = trio
    assert a.set({"user_id": "1", "spp": 1, "return_fee": 2})[0] == 200
    for r in (b, c):
        wait_until(lambda r=r: r.get("1")[0] == 200, what=f"user 1 on {r.name}")
        assert r.get("1")[1]["Result"]["spp"] == 1
    assert b.set({"user_id": "1", "spp": 5})[0] == 200
    wait_until(lambda: a.get("1")[1]["Result"]["spp"] == 5, what="b's write on a")
    assert a.get("1")[1]["Result"]["return_fee"] == 2
    assert_converged(trio)


def writer(replicas: List[GradeReplica], users: List[str], count: int, seed: int, codes: List[int]) -> None:
    """Random partial writes; the status codes go to ``codes`` (checked by the test, not here)."""
    rnd = random.Random(seed)
    for i in range(count):
        replica = replicas[i % len(replicas)]
        fields = rnd.sample(FIELDS, rnd.randint(1, len(FIELDS)))
        body = {"user_id": rnd.choice(users), **{f: rnd.randint(-1000, 1000) for f in fields}}
        codes.append(replica.set(body)[0])


def test_concurrent_conflicting_writes_converge(trio: List[GradeReplica]) -> None:
    users = ["u1", "u2", "u3"]
    codes: List[int] = []
    threads = [
        threading.Thread(target=writer, args=(trio[i:] + trio[:i], users, 80, i, codes))
        for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(codes) == 6 * 80 and set(codes) == {200}
    state = assert_converged(trio)
    assert set(state) == set(users)
    for r in trio:
        assert r.metric("gradesvc_stream_messages_applied_total") > 0


def test_sigkill_restart_catches_up(trio: List[GradeReplica]) -> None:
    a, b, c = trio
    acked: Dict[str, Dict[str, int]] = {}
    for i in range(50):
        assert a.set({"user_id": f"k{i}", "spp": i})[0] == 200
        acked[f"k{i}"] = {"spp": i}
    c.kill()
    for i in range(50, 150):
        target = (a, b)[i % 2]
        assert target.set({"user_id": f"k{i}", "spp": i})[0] == 200
        acked[f"k{i}"] = {"spp": i}
    c.restart().wait_ready()
    assert c.ready()["snapshot"]["peer"] == a.read_url
    expect(assert_converged(trio), acked)


def test_no_peers_rebuilds_from_stream(trio: List[GradeReplica], replicas: Make, stream: str) -> None:
    a = trio[0]
    acked = {}
    for i in range(30):
        assert a.set({"user_id": f"s{i}", "return_fee": i})[0] == 200
        acked[f"s{i}"] = {"return_fee": i}
    fresh = replicas("d").wait_ready()
    assert fresh.ready()["snapshot"]["rows_loaded"] == 0
    expect(assert_converged([a, fresh]), acked)


def write_all(replica: GradeReplica, prefix: str, numbers: range, acked: Dict[str, Dict[str, int]]) -> None:
    """Write ``spp = i`` for users prefix+i, recording each acknowledged write."""
    for i in numbers:
        assert replica.set({"user_id": f"{prefix}{i}", "spp": i})[0] == 200
        acked[f"{prefix}{i}"] = {"spp": i}


@pytest.fixture
def relayed(replicas: Make, stream_protocol: str) -> Iterator[Tuple[Relay, GradeReplica, GradeReplica]]:
    """Replica a reaches the broker through a relay; b (peer of a) directly."""
    relay, url = Relay.to_broker(stream_protocol)
    try:
        a = replicas("a", amqp_url=url).wait_ready()
        yield relay, a, replicas("b", [a]).wait_ready()
    finally:
        relay.close()


def test_broker_connection_cut_and_restored(relayed: Tuple[Relay, GradeReplica, GradeReplica]) -> None:
    relay, a, b = relayed
    acked: Dict[str, Dict[str, int]] = {}
    write_all(b, "c", range(20), acked)
    relay.cut()
    wait_until(lambda: a.ready()["broker_connected"] is False, what="a to notice the cut")
    code, out = a.set({"user_id": "lost", "spp": 1})
    assert code == 503, out
    write_all(b, "c", range(20, 60), acked)
    relay.restore()
    a.wait_ready()
    write_all(a, "after", range(1), acked)
    state = expect_and_converge([a, b], acked)
    assert "lost" not in state


def expect_and_converge(replicas: List[GradeReplica], acked: Dict[str, Dict[str, int]]) -> Dict[str, Tuple[str, ...]]:
    state = assert_converged(replicas)
    expect(state, acked)
    return state


def test_bootstrap_from_a_lagging_peer_under_load(replicas: Make, relayed: Tuple[Relay, GradeReplica, GradeReplica]) -> None:
    """The peer's snapshot is behind the stream; the newcomer must replay the rest."""
    relay, a, b = relayed
    acked: Dict[str, Dict[str, int]] = {}
    write_all(b, "l", range(20), acked)
    wait_until(lambda: a.get("l19")[0] == 200, what="a to see b's writes")
    relay.stall()  # a stops receiving deliveries: it lags its own stream
    stop = threading.Event()
    errors: List[str] = []

    def load() -> None:
        i = 20
        while not stop.is_set():
            code, _ = b.set({"user_id": f"l{i}", "spp": i})
            if code == 200:
                acked[f"l{i}"] = {"spp": i}
            else:
                errors.append(str(code))
            i += 1

    thread = threading.Thread(target=load)
    thread.start()
    wait_until(lambda: len(acked) > 60, what="writes while a lags")
    assert a.get(f"l{len(acked) - 1}")[0] == 404  # the lag is real
    c = replicas("c", [a])  # bootstraps from lagging a while b keeps writing
    wait_until(lambda: c.ready()["snapshot"]["offset"] >= 0, what="c to load a's snapshot")
    relay.restore()
    c.wait_ready()
    wait_until(lambda: len(acked) > 120, what="more writes after c started")
    stop.set()
    thread.join()
    assert not errors
    expect_and_converge([a, b, c], acked)


class HalfBackupPeer(BaseHTTPRequestHandler):
    """A peer that starts a valid backup, sends half of it, then ``then()``."""

    payload = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.end_headers()
        self.wfile.write(self.payload[: len(self.payload) // 2])
        self.wfile.flush()
        self.then()

    def then(self) -> None:
        raise NotImplementedError

    def log_message(self, *args: object) -> None:
        pass


class DyingPeer(HalfBackupPeer):
    """... and dies."""

    def then(self) -> None:
        self.connection.shutdown(2)


class StallingPeer(HalfBackupPeer):
    """... and sends nothing more while keeping the connection open."""

    release = threading.Event()

    def then(self) -> None:
        self.release.wait(120)


def serve(handler: type) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def dying_peer() -> Iterator[str]:
    yield from serve(DyingPeer)


@pytest.fixture
def stalling_peer() -> Iterator[str]:
    StallingPeer.release.clear()
    try:
        yield from serve(StallingPeer)
    finally:
        StallingPeer.release.set()


def bootstrap_past(bad_peer: str, handler: type, a: GradeReplica, tmp_path: Path, stream: str,
                   **env: str) -> Dict[str, Dict[str, int]]:
    """Write on ``a``, let the bad peer serve half of a's backup, then start a
    newcomer with peers [bad, a]: it must load from ``a`` and converge."""
    acked = {}
    for i in range(300):
        assert a.set({"user_id": f"h{i}", "shipping_fee": i})[0] == 200
        acked[f"h{i}"] = {"shipping_fee": i}
    handler.payload = http("GET", a.read_url + "/backup")[2]  # type: ignore[attr-defined]
    newcomer = GradeReplica(tmp_path, stream, "n", [bad_peer, a.read_url], extra_env=env).start()
    try:
        newcomer.wait_ready(timeout=30)
        assert newcomer.ready()["snapshot"]["peer"] == a.read_url
        assert f"Snapshot from {bad_peer}/backup failed" in newcomer.log()
        expect_and_converge([a, newcomer], acked)
        return acked
    finally:
        newcomer.stop()


def test_peer_dies_mid_backup(trio: List[GradeReplica], dying_peer: str, tmp_path: Path, stream: str) -> None:
    a = trio[0]
    acked = bootstrap_past(dying_peer, DyingPeer, a, tmp_path, stream)
    only_dying = GradeReplica(tmp_path, stream, "m", [dying_peer]).start()
    try:
        only_dying.wait_ready()
        assert "replaying the stream from its start" in only_dying.log()
        expect_and_converge([a, only_dying], acked)
    finally:
        only_dying.stop()


def test_peer_stalls_mid_backup(trio: List[GradeReplica], stalling_peer: str, tmp_path: Path, stream: str) -> None:
    # With the default 30 s idle timeout the newcomer would not be ready in 30 s.
    bootstrap_past(stalling_peer, StallingPeer, trio[0], tmp_path, stream, GRADESVC_PEER_IDLE_TIMEOUT="1")


def test_retention_gap_is_reported(replicas: Make, stream: str) -> None:
    """A stream whose first segments were dropped: a replica asking for offset 0 must notice."""
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    channel = connection.channel()
    channel.queue_declare(stream, durable=True, arguments={
        "x-queue-type": "stream", "x-max-length-bytes": 20_000,
        "x-stream-max-segment-size-bytes": 5_000,
    })
    channel.confirm_delivery()
    body = json.dumps({"replica": "old", "id": "1", "at": 0, "user_id": "g", "patch": {"spp": 1}}).encode()
    for _ in range(2000):
        channel.basic_publish("", stream, body, pika.BasicProperties(type="write", delivery_mode=2))
    connection.close()
    replica = replicas("g")
    wait_until(lambda: replica.alive() and http("GET", replica.read_url + "/ready")[0] == 503
               and replica.ready()["phase"] == "retention_gap", what="retention gap on /ready")
    report = replica.ready()
    assert report["ready"] is False
    assert report["retention_gap"]["wanted_offset"] == 0
    assert report["retention_gap"]["first_available_offset"] > 0
    assert replica.metric("gradesvc_retention_gap") == 1
    assert "Retention gap" in replica.log()
    assert replica.get("g")[0] == 503
