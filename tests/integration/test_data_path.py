"""The gateway's data path against real processes: streamed bodies, timeouts, whose fault.

A body far larger than anything the gateway should hold is streamed through
it while its peak memory is watched; a backend that accepts and never answers
is a 504 that takes it out of rotation; a client that disconnects mid-body or
mid-answer leaves nothing in the log.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from harness.backends import Backend, servers_file
from harness.daemon import assert_no_logged_errors
from harness.gateway import Gateway
from harness.net import free_port, metric, receive_until, wait_until

MiB = 1024 * 1024


class Sink:
    """A backend that reads any body in pieces and answers its size and SHA-256."""

    def __init__(self) -> None:
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.bodies: List[Tuple[int, str]] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            self._exchanges(conn)
        except OSError:
            pass  # the gateway dropped the connection (its client left)

    def _exchanges(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = f.readline()
                    if not line:
                        return
                    head += line
                length, chunked = 0, b"transfer-encoding: chunked" in head.lower()
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                digest = hashlib.sha256()
                if chunked:
                    length = 0
                    while True:
                        n = int(f.readline().split(b";")[0], 16)
                        if n == 0:
                            while f.readline() not in (b"\r\n", b""):
                                pass
                            break
                        piece = f.read(n)
                        f.read(2)
                        digest.update(piece)
                        length += n
                else:
                    left = length
                    while left:
                        piece = f.read(min(left, 1 << 16))
                        if not piece:
                            return
                        digest.update(piece)
                        left -= len(piece)
                self.bodies.append((length, digest.hexdigest()))
                answer = json.dumps({"size": length, "sha256": digest.hexdigest()}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(answer), answer))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.listener.close()


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def servers(path: Path, urls: List[Tuple[str, str]], response: float = 30, tries: int = 2) -> None:
    servers_file(path, dict(urls), {"path": "/", "interval": 60, "timeout": 1},
                 timeouts={"connect": 2, "response": response, "body": 5}, retries={"tries": tries})


@pytest.fixture
def sink_gateway(tmp_path: Path) -> Iterator[Tuple[Gateway, Sink]]:
    sink = Sink()
    servers(tmp_path / "servers.yaml", [("sink", sink.url)])
    gateway = Gateway(tmp_path)
    gateway.env["LBSVC_MAX_BODY"] = str(512 * MiB)
    gateway.start().wait_ready()
    yield gateway, sink
    gateway.stop()
    sink.stop()
    assert_no_logged_errors([gateway])


def send_body(port: int, key: str, size: int, chunked: bool = False) -> bytes:
    """PUT ``size`` bytes (a repeating pattern) and return the whole answer."""
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
    piece = bytes(range(256)) * 256  # 64 KiB
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"PUT /upload HTTP/1.1\r\nHost: x\r\nAuthorization: " + key.encode() + b"\r\n" + framing + b"\r\n\r\n")
        left = size
        while left:
            part = piece[:left]
            s.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            left -= len(part)
        if chunked:
            s.sendall(b"0\r\n\r\n")
        s.settimeout(60)
        return receive_until(s, b"}")


def expected_digest(size: int) -> str:
    piece = bytes(range(256)) * 256
    digest, left = hashlib.sha256(), size
    while left:
        digest.update(piece[:left])
        left -= len(piece[:left])
    return digest.hexdigest()


@pytest.mark.parametrize("chunked", [False, True])
def test_a_large_body_is_streamed_in_bounded_memory(sink_gateway: Tuple[Gateway, Sink], chunked: bool) -> None:
    gateway, sink = sink_gateway
    key = gateway.create("uploader")
    assert gateway.process is not None
    before = peak_rss_kib(gateway.process.pid)
    size = 300 * MiB
    answer = send_body(gateway.port, key, size, chunked)
    assert answer.startswith(b"HTTP/1.1 200")
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body == {"size": size, "sha256": expected_digest(size)}
    grown = peak_rss_kib(gateway.process.pid) - before
    # Far below the body's size: nothing buffers it (PyPy's GC frees the pieces
    # later than CPython's reference counting, so the bound leaves it room).
    assert grown < 64 * 1024, f"the gateway's peak memory grew by {grown} KiB for a {size // MiB} MiB body"


@pytest.mark.parametrize("tries, gateway_timeouts", [(1, 1), (2, 0)])
def test_a_backend_that_never_answers_is_taken_out_and_a_get_retried(
        tmp_path: Path, tries: int, gateway_timeouts: int) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    good = Backend("good")
    servers(tmp_path / "servers.yaml", [("silent", f"http://127.0.0.1:{silent.getsockname()[1]}"),
                                        ("good", good.url)], response=1, tries=tries)
    gateway = Gateway(tmp_path).start().wait_ready()
    try:
        key = gateway.create("patient")
        answers = [gateway.call("GET", "/x", key=key) for _ in range(4)]
        codes = [a[0] for a in answers]
        # One attempt: the client gets the 504; two (the default): the GET went on to "good".
        assert codes.count(504) == gateway_timeouts and codes.count(200) == 4 - gateway_timeouts, codes
        assert all(a[2] == b"Server good answer" for a in answers if a[0] == 200)
        assert "Backend silent did not answer within 1.0s" in gateway.log()
    finally:
        gateway.stop()
        good.stop()
        silent.close()
    assert_no_logged_errors([gateway])


def test_clients_leaving_mid_body_and_mid_answer_leave_no_trace(sink_gateway: Tuple[Gateway, Sink]) -> None:
    gateway, sink = sink_gateway
    key = gateway.create("flaky")
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", gateway.port)) as s:
            s.sendall(b"PUT /u HTTP/1.1\r\nHost: x\r\nAuthorization: " + key.encode()
                      + b"\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 300_000)
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", gateway.port)) as s:
            s.sendall(b"GET /u HTTP/1.1\r\nHost: x\r\nAuthorization: " + key.encode() + b"\r\n\r\n")
    # The gateway is still serving, and none of that was held against the backend.
    wait_until(lambda: send_body(gateway.port, key, 10).startswith(b"HTTP/1.1 200"), 10, "the gateway serving")
    assert metric(f"http://127.0.0.1:{gateway.admin_port}/metrics", "lbsvc_backend_up", backend="sink") == 1
