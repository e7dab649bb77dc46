"""The real lbsvc process in front of real HTTP backends on loopback (contract 3)."""

from __future__ import annotations

import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from tests.integration.harness import Daemon, free_port, http, wait_until

pytestmark = pytest.mark.integration


class Backend:
    """A backend answering ``Server NAME answer`` and recording what it saw."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: List[Dict[str, str]] = []
        self.connections: set = set()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                backend.connections.add(self.connection)

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                backend.seen.append({**{k.lower(): v for k, v in self.headers.items()},
                                     "_path": self.path, "_body": body.decode()})
                out = f"Server {backend.name} answer".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.port = free_port()
        self.server: Optional[ThreadingHTTPServer] = None
        self.handler = Handler
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Like a killed process: stop listening and drop every open connection."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        for connection in list(self.connections):
            try:
                connection.shutdown(2)
            except OSError:
                pass
        self.connections.clear()


def write_servers(path: Path, backends: List[Backend], interval: float = 0.2) -> None:
    servers = "\n".join(f'  - {{name: {b.name}, url: "{b.url}"}}' for b in backends)
    path.write_text(
        f"algorithm: round_robin\nhealth_check: {{path: /health, interval: {interval}, timeout: 0.5, fall: 1, rise: 1}}\n"
        f"upstream_timeout: 5\nservers:\n{servers}\n"
    )


class Gateway(Daemon):
    def __init__(self, workdir: Path) -> None:
        self.port, self.admin_port = free_port(), free_port()
        env = {
            "LBSVC_ENDPOINT": f"tcp:{self.port}:interface=127.0.0.1",
            "LBSVC_ADMIN_ENDPOINT": f"tcp:{self.admin_port}:interface=127.0.0.1",
            "LBSVC_SERVERS": str(workdir / "servers.yaml"),
            "LBSVC_DATABASE": str(workdir / "users.sqlite3"),
        }
        super().__init__("lbsvc", [], env, workdir, "lbsvc")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> Gateway:
        def ready() -> bool:
            assert self.alive(), self.log()[-3000:]
            return http("GET", f"http://127.0.0.1:{self.admin_port}/ready")[0] == 200

        wait_until(ready, 30, "lbsvc /ready")
        return self

    def call(self, method: str, path: str, body: Optional[dict] = None, key: Optional[str] = None,
             raw: Optional[bytes] = None) -> tuple:
        headers = {"Authorization": key} if key else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        return http(method, self.url + path, data, headers)

    def create(self, name: str) -> str:
        code, _, body = self.call("POST", "/user/create", {"name": name})
        assert code == 201, body
        return str(json.loads(body)["api_key"])


@pytest.fixture
def backends() -> Iterator[List[Backend]]:
    started = [Backend("one"), Backend("two")]
    yield started
    for b in started:
        b.stop()


@pytest.fixture
def gateway(tmp_path: Path, backends: List[Backend]) -> Iterator[Gateway]:
    write_servers(tmp_path / "servers.yaml", backends)
    gw = Gateway(tmp_path).start().wait_ready()  # type: ignore[attr-defined]
    yield gw
    gw.stop()


def test_user_flow_round_robin_and_429(gateway: Gateway, backends: List[Backend]) -> None:
    code, _, body = gateway.call("POST", "/user/create", {"name": "user1"})
    created = json.loads(body)
    assert code == 201 and set(created) == {"name", "capacity", "rate_per_sec", "api_key"}
    assert (created["capacity"], created["rate_per_sec"]) == (5, 1)
    key = created["api_key"]
    code, _, body = gateway.call("GET", "/user/tokens/profile", key=key)
    assert json.loads(body) == {"name": "user1", "capacity": 5, "rate_per_sec": 1, "current_capacity": 5}
    answers = [gateway.call("GET", "/", key=key)[2].decode() for _ in range(5)]
    assert sorted(set(answers)) == ["Server one answer", "Server two answer"]
    assert all(answers[i] != answers[i + 1] for i in range(4))
    code, headers, _ = gateway.call("GET", "/", key=key)
    assert code == 429
    assert headers["retry-after"] == "1" and headers["ratelimit-limit"] == "5"
    assert headers["ratelimit-remaining"] == "0" and "ratelimit-reset" in headers
    limited_at = time.monotonic()
    wait_until(lambda: gateway.call("GET", "/", key=key)[0] == 200, 5, "a token after a second")
    assert time.monotonic() - limited_at > 0.5


def test_concurrent_requests_admit_exactly_capacity(gateway: Gateway) -> None:
    key = gateway.create("burst")
    gateway.call("POST", "/user/tokens/change", {"rate_per_sec": 0.001}, key=key)
    codes: List[int] = []
    lock = threading.Lock()

    def one() -> None:
        code = gateway.call("GET", "/x", key=key)[0]
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] * 5 + [429] * 15


def test_change_and_profile(gateway: Gateway) -> None:
    key = gateway.create("changer")
    gateway.call("GET", "/", key=key)
    code, _, body = gateway.call("POST", "/user/tokens/change", {"capacity": 10, "rate_per_sec": 2}, key=key)
    assert code == 200
    changed = json.loads(body)
    assert (changed["capacity"], changed["rate_per_sec"]) == (10, 2) and changed["current_capacity"] >= 4
    code, _, body = gateway.call("POST", "/user/tokens/change", {"capacity": 1}, key=key)
    assert json.loads(body)["current_capacity"] == 1  # capped at once
    assert json.loads(gateway.call("GET", "/user/tokens/profile", key=f"Bearer {key}")[2])["capacity"] == 1


def test_bad_input(gateway: Gateway) -> None:
    key = gateway.create("valid")
    cases = [
        ("POST", "/user/create", None, b"{bad", None, 400),
        ("POST", "/user/create", {"name": ""}, None, None, 400),
        ("POST", "/user/create", {"name": "x" * 65}, None, None, 400),
        ("POST", "/user/create", {"name": "bad name"}, None, None, 400),
        ("POST", "/user/create", {"name": 5}, None, None, 400),
        ("POST", "/user/create", {}, None, None, 400),
        ("POST", "/user/create", {"name": "valid"}, None, None, 409),
        ("GET", "/user/create", None, None, None, 405),
        ("GET", "/user/tokens/profile", None, None, None, 401),
        ("GET", "/user/tokens/profile", None, None, "not-a-key", 401),
        ("POST", "/user/tokens/change", {"capacity": 2}, None, None, 401),
        ("POST", "/user/tokens/change", {"capacity": 0}, None, key, 400),
        ("POST", "/user/tokens/change", {"capacity": 1.5}, None, key, 400),
        ("POST", "/user/tokens/change", {"capacity": True}, None, key, 400),
        ("POST", "/user/tokens/change", {"rate_per_sec": 0}, None, key, 400),
        ("POST", "/user/tokens/change", {"rate_per_sec": "1"}, None, key, 400),
        ("POST", "/user/tokens/change", {}, None, key, 400),
        ("POST", "/user/tokens/change", {"burst": 1}, None, key, 400),
        ("GET", "/user/nothing", None, None, key, 404),
        ("GET", "/anything", None, None, None, 401),
    ]
    for method, path, body, raw, auth, expected in cases:
        code, _, out = gateway.call(method, path, body, key=auth, raw=raw)
        assert code == expected, (method, path, body, out)
        assert "Error" in json.loads(out)
    profile = json.loads(gateway.call("GET", "/user/tokens/profile", key=key)[2])
    assert (profile["capacity"], profile["rate_per_sec"]) == (5, 1)


def test_failover_and_all_down(gateway: Gateway, backends: List[Backend]) -> None:
    key = gateway.create("failover")
    gateway.call("POST", "/user/tokens/change", {"capacity": 100, "rate_per_sec": 100}, key=key)
    backends[0].stop()
    answers = [gateway.call("GET", "/", key=key) for _ in range(6)]
    assert all(code == 200 and body == b"Server two answer" for code, _, body in answers)
    backends[1].stop()
    code, _, body = gateway.call("GET", "/", key=key)
    assert (code, body) == (503, b"No available servers")
    backends[0].start()
    wait_until(lambda: gateway.call("GET", "/", key=key)[2] == b"Server one answer", 10, "backend one back")


def test_forwarded_headers_and_no_key_upstream(gateway: Gateway, backends: List[Backend]) -> None:
    key = gateway.create("headers")
    code, _, _ = gateway.call("PUT", "/some/path?q=1", raw=b"hello", key=key)
    assert code == 200
    seen = [s for b in backends for s in b.seen if s["_path"] == "/some/path?q=1"][0]
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http" and seen["x-forwarded-host"].startswith("127.0.0.1")
    assert "authorization" not in seen and seen["_body"] == "hello"


def test_restart_keeps_users_and_limits(tmp_path: Path, gateway: Gateway) -> None:
    key = gateway.create("durable")
    gateway.call("POST", "/user/tokens/change", {"capacity": 7, "rate_per_sec": 3}, key=key)
    gateway.stop()
    gateway.start()
    gateway.wait_ready()
    code, _, body = gateway.call("GET", "/user/tokens/profile", key=key)
    assert code == 200 and json.loads(body)["capacity"] == 7 and json.loads(body)["rate_per_sec"] == 3
    assert gateway.call("GET", "/", key=key)[0] == 200


def test_sighup_adds_a_backend(tmp_path: Path, gateway: Gateway, backends: List[Backend]) -> None:
    key = gateway.create("reload")
    gateway.call("POST", "/user/tokens/change", {"capacity": 100, "rate_per_sec": 100}, key=key)
    third = Backend("three")
    try:
        write_servers(tmp_path / "servers.yaml", backends + [third])
        gateway.signal(signal.SIGHUP)
        wait_until(lambda: gateway.call("GET", "/", key=key)[2] == b"Server three answer", 10, "traffic on the new backend")
        (tmp_path / "servers.yaml").write_text("algorithm: nonsense\n")
        gateway.signal(signal.SIGHUP)
        wait_until(lambda: "Reload refused" in gateway.log(), 10, "refused reload")
        assert gateway.call("GET", "/", key=key)[0] == 200
    finally:
        third.stop()
