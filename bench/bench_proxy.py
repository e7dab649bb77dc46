"""Proxied requests/s: lbsvc vs stock ReverseProxyResource vs the backend itself.

All three are twistd processes on loopback on this runtime; lbsvc checks an
API key and spends a token per request (the user's bucket is made large
enough never to run dry), the stock proxy does neither.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Daemon, free_port, http, machine, record, runtime, twistd_tac, wait_until, wrk  # noqa: E402

SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
HERE = Path(__file__).resolve().parent


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    backend_port, stock_port, lb_port, admin_port = (free_port() for _ in range(4))
    backend = twistd_tac(HERE / "bare_backend.tac", workdir, "backend", {"BENCH_PORT": str(backend_port)}).start()
    stock = twistd_tac(HERE / "stock_proxy.tac", workdir, "stock",
                       {"BENCH_PORT": str(stock_port), "BENCH_BACKEND_PORT": str(backend_port)}).start()
    (workdir / "servers.yaml").write_text(
        f'servers:\n  - {{name: bench, url: "http://127.0.0.1:{backend_port}"}}\n'
        "health_check: {path: /, interval: 5.0}\n")
    lb = Daemon("lbsvc", [], {
        "LBSVC_ENDPOINT": f"tcp:{lb_port}:interface=127.0.0.1",
        "LBSVC_ADMIN_ENDPOINT": f"tcp:{admin_port}:interface=127.0.0.1",
        "LBSVC_SERVERS": str(workdir / "servers.yaml"),
        "LBSVC_DATABASE": str(workdir / "users.sqlite3"),
    }, workdir, "lbsvc").start()
    try:
        for port in (backend_port, stock_port, admin_port):
            wait_until(lambda p=port: http("GET", f"http://127.0.0.1:{p}/")[0] in (200, 404), 30, f"port {port}")
        key = json.loads(http("POST", f"http://127.0.0.1:{lb_port}/user/create", b'{"name": "bench"}')[2])["api_key"]
        http("POST", f"http://127.0.0.1:{lb_port}/user/tokens/change",
             b'{"capacity": 1000000000, "rate_per_sec": 1000000000}', {"Authorization": key})
        ours = wrk(f"http://127.0.0.1:{lb_port}/", SECONDS, header=f"Authorization: {key}")
        base = wrk(f"http://127.0.0.1:{stock_port}/", SECONDS)
        direct = wrk(f"http://127.0.0.1:{backend_port}/", SECONDS)
        record([
            ["proxied req/s (lbsvc vs stock ReverseProxyResource)", f"{ours:,.0f}", f"{base:,.0f}", f"{ours / base:.2f}x", runtime(), machine()],
            ["proxied req/s (lbsvc vs backend direct)", f"{ours:,.0f}", f"{direct:,.0f}", f"{ours / direct:.2f}x", runtime(), machine()],
        ])
    finally:
        for daemon in (lb, stock, backend):
            daemon.stop()


if __name__ == "__main__":
    main()
