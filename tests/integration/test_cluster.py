"""gradesvc on a 3-node RabbitMQ cluster: a broker node dies, no acknowledged write is lost.

The cluster is the one ``scripts/rabbitmq-cluster`` starts, on its own ports
and in a temporary directory; killed nodes are started again between tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from harness.net import basic, free_port, http, wait_until
from harness.replica import GradeReplica
from tests.integration.test_replication import expect_and_converge

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stream_protocol")]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "scripts" / "rabbitmq-cluster")
Make = Callable[..., GradeReplica]


class Cluster:
    def __init__(self, base: Path) -> None:
        port = free_port()
        # Three AMQP ports from here, their stream-protocol ports 100 above, distribution ports 20000 above.
        while port > 45000 or not all(_free(p) for i in range(3) for p in (port + i, port + i + 100, port + i + 20000)):
            port = free_port()
        self.env = {**os.environ, "CLUSTER_PORT": str(port), "CLUSTER_DIR": str(base / "cluster")}
        self.base_port = port

    def run(self, *args: str) -> str:
        out = subprocess.run([SCRIPT, *args], env=self.env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.strip()

    def start(self) -> str:
        return self.run("start").splitlines()[-1]

    def port_of(self, node: int) -> int:
        return self.base_port + node - 1

    def kill(self, node: int) -> None:
        os.kill(int(self.run("pid", str(node))), signal.SIGKILL)

    def node_of_port(self, port: int) -> int:
        return port - self.base_port + 1

    def leader(self, stream: str) -> int:
        out = subprocess.run(["rabbitmqctl", "-q", "-n", f"gscluster1-{self.base_port}@localhost",
                              "list_queues", "name", "leader", "--no-table-headers"],
                             capture_output=True, text=True, timeout=60)
        for line in out.stdout.splitlines():
            name, _, leader = line.partition("\t")
            if name.strip() == stream:
                return int(leader.strip().split("-", 1)[0].replace("gscluster", ""))
        raise AssertionError(f"no leader for {stream}: {out.stdout} {out.stderr}")


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if subprocess.run(["bash", "-c", "command -v rabbitmq-server || test -x /usr/sbin/rabbitmq-server"],
                      capture_output=True).returncode != 0:
        pytest.fail("rabbitmq-server is needed for the cluster tests")
    # Not under pytest's temporary directory: the nodes run as the rabbitmq
    # user (Debian's script switches to it), which must reach their data.
    base = Path(tempfile.mkdtemp(prefix="gradesvc-cluster-"))
    base.chmod(0o755)
    c = Cluster(base)
    try:  # stopped however the start went: a node left running would hold its ports and memory
        c.start()
        yield c
    finally:
        c.run("stop")
        shutil.rmtree(base, ignore_errors=True)


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


def test_killing_the_node_a_replica_uses(cluster: Cluster, replicas: Make, stream: str) -> None:
    urls = cluster.start()
    a = replicas("a", amqp_url=urls).wait_ready(timeout=60)
    b = replicas("b", [a], amqp_url=",".join(reversed(urls.split(",")))).wait_ready(timeout=60)
    node = cluster.node_of_port(int(a.ready()["broker_node"].rsplit(":", 1)[1].split("/")[0]))
    acked, outage = writes_during(a, "n", lambda: cluster.kill(node))
    assert outage <= 15, outage
    expect_and_converge([a, b], acked)


def test_killing_the_stream_leader(cluster: Cluster, replicas: Make, stream: str) -> None:
    urls = cluster.start()  # the node killed before is back
    a = replicas("a", amqp_url=urls).wait_ready(timeout=60)
    b = replicas("b", [a], amqp_url=",".join(reversed(urls.split(",")))).wait_ready(timeout=60)
    leader = cluster.leader(stream)
    acked, outage = writes_during(a, "l", lambda: cluster.kill(leader))
    assert outage <= 15, outage
    expect_and_converge([a, b], acked)
