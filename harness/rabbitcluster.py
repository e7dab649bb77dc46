"""A private RabbitMQ cluster (or single node) from ``scripts/rabbitmq-cluster``, on its own free ports.

Its nodes run as the ``rabbitmq`` user (Debian's script switches to it), so
their directory is not under pytest's temporary one but a world-readable one
of its own.  With ``tls_dir`` (``ca.pem``, ``server.pem``, ``server.key``)
every node also listens with TLS: AMQPS on its AMQP port + 200, the stream
protocol on + 300; ``clients="required"`` makes them refuse a client without
a certificate.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from harness.net import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "rabbitmq-cluster")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def rabbitmq_installed() -> bool:
    return subprocess.run(["bash", "-c", "command -v rabbitmq-server || test -x /usr/sbin/rabbitmq-server"],
                          capture_output=True).returncode == 0


class RabbitCluster:
    """``nodes`` RabbitMQ nodes on free ports (AMQP, stream +100, AMQPS +200, stream TLS +300, dist +20000)."""

    def __init__(self, nodes: int = 3, tls_dir: Optional[Path] = None, clients: str = "") -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="gradesvc-cluster-"))
        self.directory.chmod(0o755)
        offsets = (0, 100, 200, 300, 20000) if tls_dir is not None else (0, 100, 20000)
        port = free_port()
        while port > 45000 or not all(_free(port + i + o) for i in range(nodes) for o in offsets):
            port = free_port()
        self.base_port = port
        self.nodes = nodes
        self.env = {**os.environ, "CLUSTER_PORT": str(port), "CLUSTER_DIR": str(self.directory / "cluster"),
                    "CLUSTER_NODES": str(nodes)}
        if tls_dir is not None:
            self.env.update(CLUSTER_TLS_DIR=str(tls_dir), CLUSTER_TLS_CLIENTS=clients)

    def run(self, *args: str) -> str:
        out = subprocess.run([SCRIPT, *args], env=self.env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.strip()

    def start(self) -> str:
        """Start (or start again) every node; the ``--amqp-url`` list."""
        return self.run("start").splitlines()[-1]

    def stop(self) -> None:
        """Stop every node and remove their data."""
        try:
            self.run("stop")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def port_of(self, node: int) -> int:
        return self.base_port + node - 1

    def node_of_port(self, port: int) -> int:
        return port - self.base_port + 1

    def name_of(self, node: int) -> str:
        return f"gscluster{node}-{self.base_port}@localhost"

    def kill(self, node: int) -> None:
        os.kill(int(self.run("pid", str(node))), signal.SIGKILL)

    def ctl(self, node: int, *args: str) -> str:
        """``rabbitmqctl`` on ``node``: its output."""
        out = subprocess.run(["rabbitmqctl", "-q", "-n", self.name_of(node), *args], capture_output=True,
                             text=True, timeout=60)
        return out.stdout

    def leader(self, stream: str) -> int:
        out = self.ctl(1, "list_queues", "name", "leader", "--no-table-headers")
        for line in out.splitlines():
            name, _, leader = line.partition("\t")
            if name.strip() == stream:
                return int(leader.strip().split("-", 1)[0].replace("gscluster", ""))
        raise AssertionError(f"no leader for {stream}: {out}")
