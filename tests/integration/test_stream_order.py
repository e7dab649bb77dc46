"""The stream is the order (contract 2.4): real processes, the real broker, real clocks.

No scenario here may lose an acknowledged write or serve stale data while ready.
"""

from __future__ import annotations

import email.utils
import json
import signal
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import pika
import pytest

from harness.broker import BROKER_URL, tiny_stream
from harness.net import http, wait_until
from harness.replica import GradeReplica, set_with_offset
from tests.integration.relay import Relay
from tests.integration.test_replication import assert_converged, expect_and_converge

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stream_protocol")]

Make = Callable[..., GradeReplica]
FAKETIME = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))


def skewed(seconds: int) -> Dict[str, str]:
    """Environment that shifts a process's wall clock by ``seconds`` (libfaketime)."""
    if not FAKETIME:
        pytest.fail("libfaketime is needed (apt-get install faketime; .ci/run installs it)")
    return {"LD_PRELOAD": str(FAKETIME[0]), "FAKETIME": f"{seconds:+d}", "DONT_FAKE_MONOTONIC": "1"}


def clock_of(replica: GradeReplica) -> float:
    """The replica's wall clock, from its Date header."""
    _, headers, _ = http("GET", replica.read_url + "/health")
    return email.utils.parsedate_to_datetime(headers["date"]).timestamp()


def test_clocks_skewed_both_ways_do_not_reorder_acknowledged_writes(replicas: Make) -> None:
    ahead = replicas("ahead", extra_env=skewed(+45)).wait_ready()
    behind = replicas("behind", [ahead], extra_env=skewed(-45)).wait_ready()
    assert clock_of(ahead) - clock_of(behind) > 60  # the skew is real
    acked: Dict[str, Dict[str, int]] = {}
    for i in range(40):
        first, second = (ahead, behind) if i % 2 else (behind, ahead)
        one = set_with_offset(first, {"user_id": f"s{i}", "spp": 1, "return_fee": i})
        two = set_with_offset(second, {"user_id": f"s{i}", "spp": 2})
        assert two > one  # acknowledged later, so later in the stream
        acked[f"s{i}"] = {"spp": 2, "return_fee": i}
    expect_and_converge([ahead, behind], acked)


def test_read_your_write_on_another_replica_with_min_offset(replicas: Make) -> None:
    a = replicas("a").wait_ready()
    b = replicas("b", [a]).wait_ready()
    for i in range(50):
        offset = set_with_offset(a, {"user_id": "ryw", "spp": i})
        query = urllib.parse.urlencode({"user_id": "ryw", "min_offset": offset})
        code, _, body = http("GET", f"{b.read_url}/get?{query}")
        assert code == 200 and json.loads(body)["Result"]["spp"] == i, (i, body)


def publish_backlog(stream: str, count: int, tag: str) -> None:
    """``count`` writes straight onto the stream; the last one is confirmed (so all are)."""
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    channel = connection.channel()
    props = pika.BasicProperties(type="write", app_id="loader", delivery_mode=2, content_type="application/json")
    for i in range(count):
        if i == count - 1:
            channel.confirm_delivery()
        body = json.dumps({"replica": "loader", "id": f"{tag}{i}", "at": 0, "user_id": f"{tag}{i % 500}",
                           "patch": {"spp": i}})
        channel.basic_publish("", stream, body.encode(), props)
    connection.close()


@pytest.fixture
def relayed(replicas: Make, stream_protocol: str) -> Iterator[Tuple[Relay, GradeReplica, GradeReplica]]:
    relay, url = Relay.to_broker(stream_protocol)
    try:
        a = replicas("a").wait_ready()
        yield relay, a, replicas("b", [a], amqp_url=url).wait_ready()
    finally:
        relay.close()


def test_not_ready_while_replaying_a_backlog_after_a_reconnect(
        relayed: Tuple[Relay, GradeReplica, GradeReplica], stream: str) -> None:
    relay, a, b = relayed
    relay.cut()
    wait_until(lambda: b.ready()["broker_connected"] is False, what="b to notice the cut")
    assert http("GET", b.read_url + "/ready")[0] == 503
    publish_backlog(stream, 60_000, "k")
    last = set_with_offset(a, {"user_id": "k499", "spp": -1})  # the newest value of k499
    relay.restore()
    seen_catching_up = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        code, _, body = http("GET", b.read_url + "/ready")
        report = json.loads(body)
        assert {"phase", "applied_offset", "lag"} <= set(report)
        if code == 200:
            assert report["applied_offset"] >= last, report  # ready means caught up
            break
        seen_catching_up |= report["phase"] == "catching_up" and 0 < report["applied_offset"] < last
        code, _, body = http("GET", b.read_url + "/get?user_id=k499")
        if code == 200:  # b became ready in between: then it must have the newest value
            assert json.loads(body)["Result"]["spp"] == -1, body
        else:
            assert code == 503, body  # never stale data while not ready
    else:
        pytest.fail("b did not catch up")
    assert seen_catching_up, "the backlog was too small to watch b catch up"
    assert b.get("k499")[1]["Result"]["spp"] == -1


def test_no_false_gap_when_replicas_join_an_idle_stream_with_tiny_segments(replicas: Make, stream: str) -> None:
    tiny_stream(stream, max_bytes=10_000_000, segment=1_000)
    a = replicas("a").wait_ready()
    for round in range(10):
        for i in range(15):  # a few segments' worth, then idle
            set_with_offset(a, {"user_id": f"r{round}-{i}", "spp": i})
        joiner = replicas(f"j{round}").wait_ready(timeout=30)  # from the start of the stream: no peers
        report = joiner.ready()
        assert report["phase"] == "ready" and "retention_gap" not in report
        assert joiner.metric("gradesvc_stream_offset_jumps_total", verdict="gap") == 0
        joiner.stop()
    assert a.metric("gradesvc_stream_offset_jumps_total", verdict="gap") == 0


def test_a_gap_while_connected_rebootstraps_from_a_peer(replicas: Make, stream: str) -> None:
    tiny_stream(stream, max_bytes=40_000, segment=4_000)
    a = replicas("a").wait_ready()
    b = replicas("b", [a]).wait_ready()
    acked: Dict[str, Dict[str, int]] = {}
    for i in range(20):
        set_with_offset(a, {"user_id": f"early{i}", "spp": i})
        acked[f"early{i}"] = {"spp": i}
    wait_until(lambda: b.get("early19")[0] == 200, what="b to have the early writes")
    b.signal(signal.SIGSTOP)  # a long pause, under the 10 s heartbeat timeout
    try:
        for i in range(400):  # ten times the retention: b's next offsets are dropped
            set_with_offset(a, {"user_id": f"late{i % 100}", "return_fee": i})
            acked[f"late{i % 100}"] = {"return_fee": i}
    finally:
        b.signal(signal.SIGCONT)
    wait_until(lambda: b.metric("gradesvc_rebootstraps_total") >= 1, 30, "b to re-bootstrap")
    b.wait_ready(timeout=30)
    assert "Gap in stream" in b.log()
    expect_and_converge([a, b], acked)


def test_acknowledged_writes_survive_concurrent_conflicts_on_three_replicas(replicas: Make) -> None:
    a = replicas("a").wait_ready()
    b = replicas("b", [a]).wait_ready()
    c = replicas("c", [a, b]).wait_ready()
    last: Dict[str, Tuple[int, int]] = {}
    order: List[Tuple[int, str, int]] = []
    for i in range(90):
        replica = (a, b, c)[i % 3]
        offset = set_with_offset(replica, {"user_id": f"x{i % 7}", "spp": i})
        order.append((offset, f"x{i % 7}", i))
    for offset, user, value in sorted(order):
        last[user] = (offset, value)
    state = assert_converged([a, b, c])
    for user, (_, value) in last.items():
        assert int(state[user][1]) == value  # the write latest in the stream won
