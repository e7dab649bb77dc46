"""Real lbsvc processes and real HTTP backends on loopback, for the integration tests."""

from __future__ import annotations

import json
import socket
import sqlite3
import ssl
import subprocess
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from tests.integration.harness import Daemon, free_port, http, wait_until


class Backend:
    """A backend answering ``Server NAME answer`` and recording what it saw."""

    def __init__(self, name: str, tls: Optional[ssl.SSLContext] = None) -> None:
        self.name = name
        self.tls = tls
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
                                     "_path": self.path, "_body": body.decode(),
                                     "_connection": str(id(self.connection))})
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
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        if self.tls is not None:  # the handshake happens as a connection is accepted
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
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


def servers_file(path: Path, servers: Dict[str, str], health_check: Dict[str, Any], **settings: Any) -> None:
    """Write a ``servers.yaml`` of these backends (name → URL) and settings."""
    document = {**settings, "health_check": health_check,
                "servers": [{"name": name, "url": url} for name, url in servers.items()]}
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def write_servers(path: Path, backends: List[Backend], interval: float = 0.2) -> None:
    """The tests' usual ``servers.yaml``: quick health checks (one failure takes a backend out)."""
    servers_file(path, {b.name: b.url for b in backends},
                 {"path": "/health", "interval": interval, "timeout": 0.5, "fall": 1, "rise": 1},
                 algorithm="round_robin", upstream_timeout=5)


POSTGRES = "postgresql://postgres@127.0.0.1:5432"
"""The development machines' PostgreSQL (trust auth); each test makes its own database."""


def _postgres(database: str = "postgres") -> Any:
    import pg8000.native

    return pg8000.native.Connection("postgres", host="127.0.0.1", port=5432, database=database, timeout=10)


def create_database() -> str:
    """A new, empty PostgreSQL database; its URL."""
    name = f"lbsvc_test_{uuid.uuid4().hex[:12]}"
    connection = _postgres()
    try:
        connection.run(f"CREATE DATABASE {name}")
    finally:
        connection.close()
    return f"{POSTGRES}/{name}"


def drop_database(url: str) -> None:
    """Drop a database made by :func:`create_database` (its connections are cut)."""
    connection = _postgres()
    try:
        connection.run(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")
    finally:
        connection.close()


def stored_key_hashes(database: str) -> List[str]:
    """Every key hash in the users' database (SQLite path or PostgreSQL URL)."""
    if database.startswith("postgresql://"):
        connection = _postgres(database.rsplit("/", 1)[1])
        try:
            return [r[0] for r in connection.run("SELECT key_hash FROM api_keys")]
        finally:
            connection.close()
    with sqlite3.connect(database) as connection:
        return [r[0] for r in connection.execute("SELECT key_hash FROM api_keys").fetchall()]


class Gateway(Daemon):
    def __init__(self, workdir: Path, database: Optional[str] = None, name: str = "lbsvc") -> None:
        self.port, self.admin_port = free_port(), free_port()
        self.database = database or str(workdir / "users.sqlite3")
        env = {
            "LBSVC_ENDPOINT": f"tcp:{self.port}:interface=127.0.0.1",
            "LBSVC_ADMIN_ENDPOINT": f"tcp:{self.admin_port}:interface=127.0.0.1",
            "LBSVC_SERVERS": str(workdir / "servers.yaml"),
            "LBSVC_DATABASE": self.database,
        }
        super().__init__("lbsvc", [], env, workdir, name)

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
             raw: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None) -> tuple:
        headers = {**({"Authorization": key} if key else {}), **(headers or {})}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        return http(method, self.url + path, data, headers)

    def create(self, name: str) -> str:
        code, _, body = self.call("POST", "/user/create", {"name": name})
        assert code == 201, body
        return str(json.loads(body)["api_key"])


class RedisServer:
    """A private ``redis-server`` on a free loopback port, which a test may kill and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        def answers() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_until(answers, 10, "redis-server")
        return self

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        self.kill()
