"""Backends that misbehave, with a real gateway: retries, ejection that sticks, the panic threshold.

The misbehaving backend is a raw socket server: it answers ``/health`` as told
and every other request as told (reset the connection before any byte, or
never answer), which no well-behaved HTTP server library would do.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from harness.backends import Backend, servers_file
from harness.daemon import assert_no_logged_errors
from harness.gateway import Gateway
from harness.net import free_port, metric, receive_until, wait_until

pytestmark = pytest.mark.integration


class RawBackend:
    """``/health`` answers ``health``; other requests get ``mode``: ``reset``, ``silent`` or ``ok``."""

    def __init__(self, mode: str, health: int = 200) -> None:
        self.mode, self.health = mode, health
        self.requests: List[bytes] = []
        self.port = free_port()
        backend = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                connection: socket.socket = self.request
                data = receive_until(connection, b"\r\n\r\n")
                if b"\r\n\r\n" not in data:
                    return
                line = data.split(b"\r\n", 1)[0]
                if line.split(b" ")[1] == b"/health":
                    connection.sendall(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                                       % backend.health)
                    return
                backend.requests.append(line)
                if backend.mode == "reset":  # RST, not FIN: before any byte of an answer
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif backend.mode == "silent":
                    backend.stopped.wait()
                else:
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"
                                       b"raw answer")

        self.stopped = threading.Event()
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def healthy() -> Iterator[Backend]:
    backend = Backend("two")
    yield backend
    backend.stop()


def start_gateway(tmp_path: Path, servers: dict, **settings: object) -> Gateway:
    servers_file(tmp_path / "servers.yaml", servers,
                 {"path": "/health", "interval": 0.2, "timeout": 0.5, "fall": 1, "rise": 1}, **settings)
    return Gateway(tmp_path).start().wait_ready()  # type: ignore[attr-defined, no-any-return]


def unlimited_key(gateway: Gateway) -> str:
    key = gateway.create("client")
    gateway.call("POST", "/user/tokens/change", {"capacity": 1000, "rate_per_sec": 1000}, key=key)
    return key


def retried(gateway: Gateway) -> float:
    return metric(f"http://127.0.0.1:{gateway.admin_port}/metrics", "lbsvc_upstream_retries_total",
                  verdict="retried")


@pytest.mark.parametrize("method, retried_to", [("GET", 200), ("POST", 502)])
def test_a_backend_that_resets_is_retried_on_a_healthy_one_unless_the_method_is_not_idempotent(
        tmp_path: Path, healthy: Backend, method: str, retried_to: int) -> None:
    bad = RawBackend("reset")
    gateway = start_gateway(tmp_path, {"bad": bad.url, "two": healthy.url})
    try:
        key = unlimited_key(gateway)
        payload = {"n": 1} if method == "POST" else None
        code, _, body = gateway.call(method, "/x", payload, key=key)  # round robin starts at "bad"
        assert bad.requests == [f"{method} /x HTTP/1.1".encode()]
        assert code == retried_to
        sent_to_two = [seen for seen in healthy.seen if seen["_path"] == "/x"]
        if method == "GET":
            assert body == b"Server two answer" and len(sent_to_two) == 1 and retried(gateway) == 1
        else:
            assert sent_to_two == [] and retried(gateway) == 0  # a POST is never sent twice
        answers = [gateway.call("GET", f"/g{i}", key=key) for i in range(10)]
        assert all(code == 200 and body == b"Server two answer" for code, _, body in answers)
    finally:
        gateway.stop()
        bad.stop()
    assert_no_logged_errors([gateway])


def test_a_backend_that_answers_health_but_nothing_else_stays_out(tmp_path: Path, healthy: Backend) -> None:
    silent = RawBackend("silent")
    gateway = start_gateway(tmp_path, {"silent": silent.url, "two": healthy.url}, timeouts={"response": 1.0})
    try:
        key = unlimited_key(gateway)
        started = time.monotonic()
        answers = []
        while time.monotonic() - started < 6:  # 30 health checks pass meanwhile
            answers.append(gateway.call("GET", "/", key=key))
        assert all(code == 200 for code, _, _ in answers)  # the one that met it was retried on "two"
        assert len(silent.requests) == 1, silent.requests  # ejected for 10 s, whatever /health says
        assert retried(gateway) == 1
        admin = f"http://127.0.0.1:{gateway.admin_port}/metrics"
        assert metric(admin, "lbsvc_backend_ejected", backend="silent") == 1
    finally:
        gateway.stop()
        silent.stop()
    assert_no_logged_errors([gateway])


def test_below_the_panic_threshold_a_backend_marked_down_still_serves(tmp_path: Path) -> None:
    lone = RawBackend("ok")
    gateway = start_gateway(tmp_path, {"lone": lone.url})
    try:
        key = unlimited_key(gateway)
        lone.health = 503  # a health-check blip: the only backend is marked down
        admin = f"http://127.0.0.1:{gateway.admin_port}/metrics"
        wait_until(lambda: metric(admin, "lbsvc_backend_up", backend="lone") == 0, 10, "the backend marked down")
        code, _, body = gateway.call("GET", "/", key=key)
        assert (code, body) == (200, b"raw answer")  # not 503 No available servers
        assert metric(admin, "lbsvc_backends_panic") == 1
        assert gateway.log().count("under the panic threshold") == 1
    finally:
        gateway.stop()
        lone.stop()
    assert_no_logged_errors([gateway])
