"""gradesvc on a 3-node RabbitMQ cluster: a broker node dies, no acknowledged write is lost.

The cluster is the one ``scripts/rabbitmq-cluster`` starts, on its own ports
and in a temporary directory; killed nodes are started again between tests.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from harness.net import basic, http, wait_until
from harness.rabbitcluster import RabbitCluster, rabbitmq_installed
from harness.replica import GradeReplica
from tests.integration.test_replication import expect_and_converge

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stream_protocol")]

Make = Callable[..., GradeReplica]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    if not rabbitmq_installed():
        pytest.fail("rabbitmq-server is needed for the cluster tests")
    c = RabbitCluster()
    try:  # stopped however the start went: a node left running would hold its ports and memory
        c.start()
        yield c
    finally:
        c.stop()


def writes_during(replica: GradeReplica, prefix: str, event: Callable[[], None]) -> Tuple[Dict[str, Dict[str, int]], float]:
    """Writes flow on ``replica`` while ``event`` happens; the acknowledged ones, and the longest outage."""
    acked: Dict[str, Dict[str, int]] = {}
    stop = threading.Event()
    failing_since: List[Optional[float]] = [None]
    longest = [0.0]

    def load() -> None:
        i = 0
        while not stop.is_set():
            try:
                code = http("POST", replica.write_url + "/set",
                            json.dumps({"user_id": f"{prefix}{i % 300}", "spp": i}).encode(),
                            {"Content-Type": "application/json", **basic("admin", "admin")}, timeout=20)[0]
            except OSError:
                code = 0
            now = time.monotonic()
            if code == 200:
                acked[f"{prefix}{i % 300}"] = {"spp": i}
                if failing_since[0] is not None:
                    longest[0] = max(longest[0], now - failing_since[0])
                    failing_since[0] = None
            elif failing_since[0] is None:
                failing_since[0] = now
                time.sleep(0.05)
            i += 1

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_until(lambda: len(acked) > 50, 30, "writes flowing")
        event()
        count = len(acked)
        wait_until(lambda: len(acked) > count + 50, 60, "writes to succeed again")
    finally:
        stop.set()
        thread.join()
    return acked, longest[0]


def test_killing_the_node_a_replica_uses(cluster: RabbitCluster, replicas: Make, stream: str) -> None:
    urls = cluster.start()
    a = replicas("a", amqp_url=urls).wait_ready(timeout=60)
    b = replicas("b", [a], amqp_url=",".join(reversed(urls.split(",")))).wait_ready(timeout=60)
    node = cluster.node_of_port(int(a.ready()["broker_node"].rsplit(":", 1)[1].split("/")[0]))
    acked, outage = writes_during(a, "n", lambda: cluster.kill(node))
    assert outage <= 15, outage
    expect_and_converge([a, b], acked)


def test_killing_the_stream_leader(cluster: RabbitCluster, replicas: Make, stream: str) -> None:
    urls = cluster.start()  # the node killed before is back
    a = replicas("a", amqp_url=urls).wait_ready(timeout=60)
    b = replicas("b", [a], amqp_url=",".join(reversed(urls.split(",")))).wait_ready(timeout=60)
    leader = cluster.leader(stream)
    acked, outage = writes_during(a, "l", lambda: cluster.kill(leader))
    assert outage <= 15, outage
    expect_and_converge([a, b], acked)
