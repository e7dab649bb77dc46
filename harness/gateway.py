"""An lbsvc gateway as a process on free loopback ports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

from harness.daemon import Daemon
from harness.net import free_port, http, wait_until


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
