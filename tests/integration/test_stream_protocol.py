"""gradesvc on RabbitMQ's stream protocol, against the real broker: what only this protocol does.

A group mixing protocols converges; a connection cut while a batch is out (stored by the broker, its
confirm lost) leaves every acknowledged write in the stream exactly once; two processes given one
replica id keep each other's writes; bulk writes are applied whole on every replica; and the broker's
publisher tracking stays bounded however many processes have published.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest

from harness.broker import publisher_references_kept, read_stream, tiny_stream
from harness.net import basic, http
from harness.replica import GradeReplica, set_with_offset
from tests.integration.relay import Relay
from tests.integration.test_replication import assert_converged, expect_and_converge

pytestmark = pytest.mark.integration

Make = Callable[..., GradeReplica]
STREAM = {"GRADESVC_STREAM_PROTOCOL": "stream"}
AMQP = {"GRADESVC_STREAM_PROTOCOL": "amqp"}


def writes_in_stream(stream: str, at_least: int) -> Counter[str]:
    """How many times each user id was written in the stream (write and write-batch messages)."""
    seen: Counter[str] = Counter()
    for _offset, properties, body in read_stream(stream, at_least + 100, timeout=20):
        if properties.type == "write":
            seen[json.loads(body)["user_id"]] += 1
        elif properties.type == "write-batch":
            seen.update(w["user_id"] for w in json.loads(body)["writes"])
    return seen


def test_a_group_mixing_protocols_converges(replicas: Make) -> None:
    a = replicas("a", extra_env=AMQP).wait_ready()
    b = replicas("b", [a], extra_env=STREAM).wait_ready()
    c = replicas("c", [a, b], extra_env=STREAM).wait_ready()
    assert [r.ready()["stream_protocol"] for r in (a, b, c)] == ["amqp", "stream", "stream"]
    acked: Dict[str, Dict[str, int]] = {}
    for i, replica in enumerate((a, b, c) * 10):
        assert replica.set({"user_id": f"m{i}", "spp": i})[0] == 200
        acked[f"m{i}"] = {"spp": i}
    bulk = [{"user_id": f"bulk{i}", "return_fee": i} for i in range(300)]
    for replica in (a, b, c):
        offset = set_with_offset(replica, bulk)
        for other in (a, b, c):  # read-your-write anywhere, and the whole array at once
            code, _, body = http("GET", f"{other.read_url}/get?user_id=bulk299&min_offset={offset}")
            assert code == 200 and json.loads(body)["Result"]["return_fee"] == 299
    acked.update({w["user_id"]: {"return_fee": w["return_fee"]} for w in bulk})
    expect_and_converge([a, b, c], acked)


@pytest.fixture
def relayed_stream(replicas: Make) -> Iterator[tuple]:
    relay, url = Relay.to_broker("stream")
    try:
        a = replicas("a", amqp_url=url, extra_env=STREAM).wait_ready()
        yield relay, a, replicas("b", [a], extra_env=STREAM).wait_ready()
    finally:
        relay.close()


def test_a_batch_stored_but_unconfirmed_when_the_connection_drops_lands_exactly_once(
        relayed_stream: tuple, stream: str) -> None:
    relay, a, b = relayed_stream
    results: Dict[str, int] = {}

    def write(user: str) -> None:
        results[user] = http("POST", a.write_url + "/set", json.dumps({"user_id": user, "spp": 1}).encode(),
                             {"Content-Type": "application/json", **basic("admin", "admin")}, timeout=30)[0]

    relay.stall()  # the broker stores what a publishes; its confirms no longer reach a
    threads = [threading.Thread(target=write, args=(f"cut{i}",)) for i in range(40)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the batches are out and stored; a waits for confirms that cannot come
    assert not results, "a write was answered while its confirm could not arrive"
    relay.cut()  # the connection drops with the batches unconfirmed
    relay.restore()  # a reconnects and sends them again: the broker drops them and confirms
    for thread in threads:
        thread.join()
    assert set(results.values()) == {200}, results
    seen = writes_in_stream(stream, 40)
    assert {user: seen[user] for user in results} == {user: 1 for user in results}  # 0 lost, 0 duplicated
    expect_and_converge([a, b], {user: {"spp": 1} for user in results})


def test_writes_under_load_through_connection_cuts_land_exactly_once(relayed_stream: tuple, stream: str) -> None:
    relay, a, b = relayed_stream
    answered: Dict[str, int] = {}
    stop = threading.Event()

    def load(worker: int) -> None:
        i = 0
        while not stop.is_set():
            user = f"w{worker}-{i}"
            try:
                answered[user] = http("POST", a.write_url + "/set", json.dumps({"user_id": user, "spp": i}).encode(),
                                      {"Content-Type": "application/json", **basic("admin", "admin")}, timeout=30)[0]
            except OSError:
                answered[user] = 0
            i += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            time.sleep(1.0)
            relay.cut()
            time.sleep(0.3)
            relay.restore()
            a.wait_ready()
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    acked = {user for user, code in answered.items() if code == 200}
    assert len(acked) > 100
    seen = writes_in_stream(stream, len(answered))
    assert [user for user in acked if seen[user] != 1] == []  # every acknowledged write exactly once
    assert [user for user, n in seen.items() if n > 1] == []  # and nothing twice, acknowledged or not
    expect_and_converge([a, b], {user: {"spp": int(user.split("-")[1])} for user in acked})


def test_two_processes_given_one_replica_id_keep_each_others_writes(tmp_path: Path, stream: str) -> None:
    twins: List[GradeReplica] = []
    try:
        for n in range(2):  # two hosts, one --replica-id: each its own data dir and process
            workdir = tmp_path / f"host{n}"
            workdir.mkdir()
            twins.append(GradeReplica(workdir, stream, "twin", [t.read_url for t in twins], extra_env=STREAM).start())
            twins[-1].wait_ready()
        errors: List[int] = []

        def load(replica: GradeReplica, prefix: str) -> None:
            for i in range(100):
                code = replica.set({"user_id": f"{prefix}{i}", "spp": i})[0]
                if code != 200:
                    errors.append(code)

        threads = [threading.Thread(target=load, args=(t, f"h{n}-")) for n, t in enumerate(twins)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        state = assert_converged(twins)
        assert len([u for u in state if u.startswith(("h0-", "h1-"))]) == 200  # none dropped as a duplicate
    finally:
        for twin in twins:
            twin.stop()


def test_the_broker_carries_at_most_255_publisher_references_into_a_new_segment(stream: str) -> None:
    """What restarts leave at the broker: a reference each, trimmed to the 255 newest when a segment starts."""
    tiny_stream(stream, max_bytes=10**9, segment=50_000)
    references = [f"gradesvc-old-{n}" for n in range(300)]  # 300 processes, each published once
    assert publisher_references_kept(stream, 300) == references[-255:]  # the oldest 45 are forgotten
