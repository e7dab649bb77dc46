"""What the status pages cost while nobody looks: one sample a second.

Builds each daemon's service tree with its real options (the builder
``makeService`` uses, on a reactor that is never run, nothing listening), finds its status history
(:class:`svckit.history.History`) and times its sampler, the only work the
pages add per second when no page is open.  The gateway's registry is given
the label children a busy gateway has (every status class, three backends,
their latency buckets) first.  Prints microseconds per sample and the share
of one core that is at one sample a second.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from common import machine, record, runtime
from twisted.internet.testing import MemoryReactorClock

from svckit.history import History

ROUNDS = 2000


def history_of(top: Any) -> History:
    return next(s for s in top if isinstance(s, History))


def timed(sample: Callable[[], Any]) -> float:
    for _ in range(200):  # warm (PyPy's JIT too)
        sample()
    start = time.perf_counter()
    for _ in range(ROUNDS):
        sample()
    return (time.perf_counter() - start) / ROUNDS * 1e6


def gateway(workdir: Path) -> float:
    from lbsvc import tap
    from lbsvc.build import build_gateway
    from lbsvc.ports import open_ports
    from lbsvc.users import open_database

    (workdir / "servers.yaml").write_text("servers:\n" + "".join(
        f"  - {{name: b{n}, url: 'http://127.0.0.1:{9000 + n}'}}\n" for n in range(3)))
    options = tap.Options()
    options.parseOptions(["--servers", str(workdir / "servers.yaml"), "--database", str(workdir / "users.sqlite3")])
    # What makeService does (ports made, never started), keeping the parts that count at hand.
    parts = build_gateway(options.settings, MemoryReactorClock(), open_database(options.settings.database))
    open_ports(parts, options.argv())
    history = history_of(parts.service)
    # The label children a busy gateway has, made through the parts that count them.
    proxied = parts.router.route_for(b"/anything")
    for code in (200, 201, 204, 301, 304, 400, 401, 404, 429, 499, 502, 503, 504):
        parts.router.count(proxied, code)
    upstreams = parts.proxy.upstreams
    for n in range(3):
        for outcome in ("200", "404", "502", "timeout"):
            upstreams.outcomes.labels(f"b{n}", outcome).inc()
        upstreams.latency(f"b{n}").observe(0.01)
    return timed(history.sample)


def replica(workdir: Path) -> float:
    from gradesvc import tap

    options = tap.Options()
    options.parseOptions(["--data-dir", str(workdir / "data"), "--peers", "http://127.0.0.1:9100",
                          "--admin-user", "bench", "--admin-password", "bench"])
    top = tap.makeService(options, MemoryReactorClock())
    return timed(history_of(top).sample)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name, measure in (("lbsvc", gateway), ("gradesvc", replica)):
            workdir = Path(directory) / name
            workdir.mkdir()
            micros = measure(workdir)
            print(f"{name}: {micros:.0f} us a sample = {micros / 1e4:.3f}% of a core at one a second")
            rows.append([f"{name} status sample (once a second)", f"{micros:.0f} us", f"{micros / 1e4:.3f}% of a core",
                         runtime(), machine()])
    record(rows)


if __name__ == "__main__":
    sys.exit(main())
