"""HTTP backends on loopback that record what they saw, and the ``servers.yaml`` naming them."""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from harness.net import free_port


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
