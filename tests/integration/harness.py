"""Real daemons as processes on loopback, for the integration tests.

Every wait here polls a condition with a deadline; nothing sleeps in the hope
that something has happened.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

BROKER_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
TWISTD = str(Path(sys.executable).with_name("twistd"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except (OSError, urllib.error.URLError) as e:
            last_error = e
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")


def http(
    method: str,
    url: str,
    body: Optional[bytes] = None,
    headers: Optional[Dict[str, str]] = None,
    timeout: float = 10.0,
    context: Optional[ssl.SSLContext] = None,
) -> Tuple[int, Dict[str, str], bytes]:
    """One HTTP request; returns status, lower-cased headers and body (errors too).

    ``context`` verifies an ``https`` server (the tests' own CA).
    """
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def receive_until(sock: socket.socket, marker: bytes) -> bytes:
    """What ``sock`` receives until ``marker`` is in it, or until the peer closes."""
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def basic(user: str, password: str) -> Dict[str, str]:
    """An Authorization header for HTTP Basic."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def unique_stream() -> str:
    """A stream name no other test or run uses."""
    return f"test_grades_{uuid.uuid4().hex[:12]}"


def delete_stream(name: str, url: str = BROKER_URL) -> None:
    """Delete a test stream (every run on the machine shares the broker)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_delete(name)
    finally:
        connection.close()


def read_stream(name: str, count: int, url: str = BROKER_URL, timeout: float = 10.0) -> List[Tuple[int, Any, bytes]]:
    """Read the first ``count`` messages of a stream: (offset, properties, body)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    out: List[Tuple[int, Any, bytes]] = []
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=100)
        deadline = time.monotonic() + timeout
        for method, properties, body in channel.consume(
            name, arguments={"x-stream-offset": "first"}, inactivity_timeout=0.5
        ):
            if method is not None:
                out.append((properties.headers["x-stream-offset"], properties, body))
                channel.basic_ack(method.delivery_tag)
            if len(out) >= count or time.monotonic() > deadline:
                break
        channel.cancel()
    finally:
        connection.close()
    return out


class Daemon:
    """A ``twistd -n <plugin>`` process with its log in ``workdir``."""

    def __init__(self, plugin: str, args: List[str], env: Dict[str, str], workdir: Path, name: str) -> None:
        self.plugin, self.args, self.env, self.workdir, self.name = plugin, args, env, workdir, name
        self.process: Optional[subprocess.Popen] = None
        self.log_path = workdir / f"{name}.log"
        self.twistd = TWISTD
        """The ``twistd`` to run (the benchmarks may point one at another release)."""

    def start(self) -> Daemon:
        env = dict(os.environ)
        env.update(self.env)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [self.twistd, "-n", "--pidfile=", "--logfile=-", *([self.plugin] if self.plugin else []), *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(self.workdir),
        )
        log.close()
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean shutdown."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logged_errors(self) -> List[str]:
        """Lines of the log that report an unexpected error (tracebacks, unhandled errors).

        Expected trouble is logged as plain warnings or errors without a
        traceback; a traceback in a daemon's log is a bug, and fails the test.
        """
        if not self.log_path.exists():
            return []
        return [line for line in self.log().splitlines()
                if "Traceback (most recent call last)" in line or "Unhandled" in line]


def tiny_stream(stream: str, max_bytes: int, segment: int) -> None:
    """Declare ``stream`` with small retention and segments, to make retention happen in a test."""
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    connection.channel().queue_declare(stream, durable=True, arguments={
        "x-queue-type": "stream", "x-max-length-bytes": max_bytes,
        "x-stream-max-segment-size-bytes": segment,
    })
    connection.close()


def set_with_offset(replica: GradeReplica, body: Any) -> int:
    """``POST /set`` that must succeed; the write's ``X-Stream-Offset``."""
    code, headers, out = http("POST", replica.write_url + "/set", json.dumps(body).encode(),
                              {"Content-Type": "application/json", **basic("admin", "admin")})
    assert code == 200, out
    return int(headers["x-stream-offset"])


def assert_no_logged_errors(daemons: Iterable[Daemon]) -> None:
    """Fail the test when a daemon logged a traceback or an unhandled error."""
    found = {d.name: d.logged_errors() for d in daemons}
    found = {name: lines for name, lines in found.items() if lines}
    if found:
        pytest.fail(f"daemons logged unexpected errors: {found}")


class GradeReplica(Daemon):
    """One gradesvc replica on free loopback ports."""

    def __init__(self, workdir: Path, stream: str, replica_id: str, peers: List[str] = (),  # type: ignore[assignment]
                 amqp_url: str = BROKER_URL, extra_env: Optional[Dict[str, str]] = None) -> None:
        self.get_port, self.set_port = free_port(), free_port()
        self.replica_id = replica_id
        env = {
            "GRADESVC_GET_ENDPOINT": f"tcp:{self.get_port}:interface=127.0.0.1",
            "GRADESVC_SET_ENDPOINT": f"tcp:{self.set_port}:interface=127.0.0.1",
            "GRADESVC_AMQP_URL": amqp_url,
            "GRADESVC_STREAM": stream,
            "GRADESVC_REPLICA_ID": replica_id,
            "GRADESVC_PEERS": ",".join(peers),
            "GRADESVC_ADMIN_USER": "admin",
            "GRADESVC_ADMIN_PASSWORD": "admin",
        }
        env.update(extra_env or {})
        super().__init__("gradesvc", [], env, workdir, f"gradesvc-{replica_id}")

    @property
    def read_url(self) -> str:
        return f"http://127.0.0.1:{self.get_port}"

    @property
    def write_url(self) -> str:
        return f"http://127.0.0.1:{self.set_port}"

    def restart(self) -> GradeReplica:
        self.start()
        return self

    def ready(self) -> Dict[str, Any]:
        return json.loads(http("GET", self.read_url + "/ready")[2])

    def wait_ready(self, timeout: float = 60.0) -> GradeReplica:
        def check() -> bool:
            assert self.alive(), f"{self.name} exited:\n{self.log()[-3000:]}"
            return http("GET", self.read_url + "/ready")[0] == 200

        wait_until(check, timeout, f"{self.name} /ready")
        return self

    def set(self, body: Any, auth: Tuple[str, str] = ("admin", "admin")) -> Tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        code, _, out = http("POST", self.write_url + "/set", data,
                            {"Content-Type": "application/json", **basic(*auth)})
        return code, json.loads(out)

    def get(self, user_id: str) -> Tuple[int, Any]:
        query = urllib.parse.urlencode({"user_id": user_id})
        code, _, out = http("GET", f"{self.read_url}/get?{query}")
        return code, json.loads(out)

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.read_url + "/metrics", name, **labels)


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of a daemon's ``/metrics``, parsed as Prometheus text (0 when absent)."""
    text = http("GET", url)[2].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0
