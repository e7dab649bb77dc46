"""A private PostgreSQL cluster (``initdb``) on a free loopback port, with TLS on and cleartext refused."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from harness.net import free_port, wait_until


def _binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise FileNotFoundError(f"{name} (PostgreSQL's server binaries) is not installed")
    return found


class PostgresServer:
    """A throwaway cluster: ``hostssl`` with a password for TCP clients, ``hostnossl`` refused.

    PostgreSQL will not run as root, so when the tests do, the cluster belongs to the ``postgres`` user
    (``runuser``) in a directory of its own; ``tls`` is the server's (certificate, key) files.
    """

    def __init__(self, tls: Tuple[Path, Path], password: str) -> None:
        self.port = free_port()
        self.password = password
        self.directory = Path(tempfile.mkdtemp(prefix="lbsvc-pg-"))
        self.data = self.directory / "data"
        self.tls = tls
        self.process: Optional[subprocess.Popen] = None
        self._as: List[str] = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def start(self) -> PostgresServer:
        if self._as:
            shutil.chown(self.directory, "postgres")
        (self.directory / "pw").write_text(self.password + "\n")
        cert, key = self.directory / "server.pem", self.directory / "server.key"
        shutil.copy(self.tls[0], cert)
        shutil.copy(self.tls[1], key)
        key.chmod(0o600)
        for path in (self.directory / "pw", cert, key):
            if self._as:
                shutil.chown(path, "postgres")
        subprocess.run([*self._as, _binary("initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                        "--auth-host=scram-sha-256", f"--pwfile={self.directory / 'pw'}"],
                       check=True, capture_output=True)
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 scram-sha-256\n"
            "hostnossl all all 0.0.0.0/0 reject\n")
        self.process = subprocess.Popen(
            [*self._as, _binary("postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.directory),
             "-c", "listen_addresses=127.0.0.1", "-c", "ssl=on", "-c", f"ssl_cert_file={cert}",
             "-c", f"ssl_key_file={key}", "-c", "fsync=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.sql("SELECT 1") == "1", 30, "the private PostgreSQL")
        return self

    def sql(self, statement: str) -> str:
        """Run ``statement`` through the local socket as ``postgres``; its output, unaligned."""
        result = subprocess.run([*self._as, "psql", "-h", str(self.directory), "-p", str(self.port), "-U", "postgres",
                                 "-d", "postgres", "-AXqtc", statement], capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(result.stderr.strip())
        return result.stdout.strip()

    def url(self, password: Optional[str] = None, host: str = "127.0.0.1", **query: str) -> str:
        arguments = "&".join(f"{k}={v}" for k, v in query.items())
        return (f"postgresql://postgres:{password or self.password}@{host}:{self.port}/postgres"
                + (f"?{arguments}" if arguments else ""))

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)
