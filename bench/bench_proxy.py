"""Proxied requests/s: lbsvc vs stock ReverseProxyResource vs the backend itself.

All three are twistd processes on loopback on this runtime; lbsvc checks an
API key and spends a token per request (the user's bucket is made large
enough never to run dry), the stock proxy does neither.  Both proxies write an
access log line per request into their log, as they do by default; one more
run shows lbsvc with LBSVC_ACCESS_LOG=off.  Each is warmed up first
(``BENCH_WARMUP`` seconds; 20 on PyPy, for its JIT).  Nothing is pinned: the
backend here is a Twisted process that shares the two cores, so these are
rough; the side-by-side benchmark of the open lbsvc data-path issue (nginx
backend, aiohttp, CPU per request) is not built yet.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, http, lbsvc_with_user, machine, record, runtime, twistd_tac, wait_until, wrk

SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
WARMUP = int(os.environ.get("BENCH_WARMUP", "20" if sys.implementation.name == "pypy" else "3"))
HERE = Path(__file__).resolve().parent


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    backend_port, stock_port = free_port(), free_port()
    backend = twistd_tac(HERE / "bare_backend.tac", workdir, "backend", {"BENCH_PORT": str(backend_port)}).start()
    stock = twistd_tac(HERE / "stock_proxy.tac", workdir, "stock",
                       {"BENCH_PORT": str(stock_port), "BENCH_BACKEND_PORT": str(backend_port)}).start()
    lb, lb_port, key = lbsvc_with_user(workdir, backend_port, 10**9, 10**6)
    (workdir / "quiet").mkdir()
    quiet, quiet_port, quiet_key = lbsvc_with_user(workdir / "quiet", backend_port, 10**9, 10**6,
                                                   {"LBSVC_ACCESS_LOG": "off"})
    try:
        wait_until(lambda: http("GET", f"http://127.0.0.1:{stock_port}/")[0] == 200, 30, "the stock proxy")

        def measure(url: str, header: str | None = None) -> float:
            wrk(url, WARMUP, header=header)
            return wrk(url, SECONDS, header=header)

        ours = measure(f"http://127.0.0.1:{lb_port}/", f"Authorization: {key}")
        base = measure(f"http://127.0.0.1:{stock_port}/")
        direct = measure(f"http://127.0.0.1:{backend_port}/")
        unlogged = measure(f"http://127.0.0.1:{quiet_port}/", f"Authorization: {quiet_key}")
        record([
            ["proxied req/s (lbsvc vs stock ReverseProxyResource)", f"{ours:,.0f}", f"{base:,.0f}", f"{ours / base:.2f}x", runtime(), machine()],
            ["proxied req/s (lbsvc, access log off, vs stock ReverseProxyResource, logging)", f"{unlogged:,.0f}",
             f"{base:,.0f}", f"{unlogged / base:.2f}x", runtime(), machine()],
            ["proxied req/s (lbsvc vs backend direct)", f"{ours:,.0f}", f"{direct:,.0f}", f"{ours / direct:.2f}x", runtime(), machine()],
        ])
    finally:
        for daemon in (lb, quiet, stock, backend):
            daemon.stop()


if __name__ == "__main__":
    main()
