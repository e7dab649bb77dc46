"""A private ``redis-server`` on a free loopback port; optionally with a password, an ACL user and TLS only."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from harness.net import free_port, wait_until


def _reply(s: socket.socket) -> bytes:
    """One whole reply (a bulk string read to its end; other kinds are one line)."""
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    if data.startswith(b"$") and not data.startswith(b"$-1"):
        head, _, rest = data.partition(b"\r\n")
        while len(rest) < int(head[1:]) + 2:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return rest[:int(head[1:])]
    return data


class RespClient:
    """One connection to a Redis, answering any reply kind (arrays too): for tests that run scripts."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    def call(self, *words: object) -> Any:
        """Send one command; its reply (an error reply raises ``RedisError``)."""
        parts = [str(w).encode() for w in words]
        self.sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        return self._read()

    def _read(self) -> Any:
        line = self.file.readline().rstrip(b"\r\n")
        kind, rest = line[:1], line[1:]
        if kind == b"*":
            return [self._read() for _ in range(int(rest))]
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self.file.read(size + 2)[:-2].decode()
        if kind == b":":
            return int(rest)
        if kind == b"-":
            raise RedisError(rest.decode())
        return rest.decode()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class RedisError(Exception):
    """An error reply."""


class RedisServer:
    """A private ``redis-server`` on a free loopback port, which a test may kill and restart.

    ``password`` sets ``requirepass``; ``users`` adds ACL users (name, password) allowed everything;
    ``tls`` (CA, certificate, key files) makes its only port a TLS one (``--port 0 --tls-port``).
    """

    def __init__(self, workdir: Path, password: Optional[str] = None, users: Sequence[Tuple[str, str]] = (),
                 tls: Optional[Tuple[Path, Path, Path]] = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.password = password
        self.users = list(users)
        self.tls = tls
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        login = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{login}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = ["redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            ca, cert, key = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-ca-cert-file", str(ca),
                     "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-auth-clients", "optional"]
        if self.password:
            args += ["--requirepass", self.password]
        for name, password in self.users:
            args += ["--user", name, "on", f">{password}", "~*", "&*", "+@all"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(lambda: self.command("PING").startswith((b"+PONG", b"-NOAUTH")), 10, "redis-server")
        return self

    def _connect(self) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        if self.tls is None:
            return raw
        return ssl.create_default_context(cafile=str(self.tls[0])).wrap_socket(raw, server_hostname="127.0.0.1")

    def command(self, *words: str, login: bool = False) -> bytes:
        """One command's raw answer (after ``AUTH`` with the server's password when ``login``)."""
        with self._connect() as s:
            commands: List[Tuple[str, ...]] = [("AUTH", self.password)] if login and self.password else []
            commands.append(words)
            for command in commands:
                s.sendall(f"*{len(command)}\r\n".encode()
                          + b"".join(f"${len(w.encode())}\r\n{w}\r\n".encode() for w in command))
                answer = _reply(s)
            return answer

    def client(self) -> RespClient:
        """A connection kept open (no password)."""
        return RespClient(self._connect())

    def info(self, field: str) -> str:
        """One field of ``INFO`` (logged in)."""
        for line in self.command("INFO", login=True).decode().splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1]
        raise KeyError(field)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        self.kill()
