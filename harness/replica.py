"""A gradesvc replica as a process on free loopback ports."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from harness.broker import BROKER_URL
from harness.daemon import Daemon
from harness.net import basic, free_port, http, metric, wait_until


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


def set_with_offset(replica: GradeReplica, body: Any) -> int:
    """``POST /set`` that must succeed; the write's ``X-Stream-Offset``."""
    code, headers, out = http("POST", replica.write_url + "/set", json.dumps(body).encode(),
                              {"Content-Type": "application/json", **basic("admin", "admin")})
    assert code == 200, out
    return int(headers["x-stream-offset"])
