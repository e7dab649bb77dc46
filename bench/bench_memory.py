"""Bytes per user of the grade store at 1,000,000 users (tracemalloc; CPython's figure counts)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, record, runtime

from gradesvc.state.store import GradeStore

USERS = 1_000_000


def main() -> None:
    if not hasattr(sys, "getsizeof") or sys.implementation.name != "cpython":
        record([["store bytes per user at 1M users", "n/a (tracemalloc is CPython's)", "300", "-", runtime(), machine()]])
        return
    ids = [str(100_000_000 + i) for i in range(USERS)]  # the keys exist anyway (requests carry them)
    import tracemalloc  # CPython only: PyPy has no _tracemalloc

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = GradeStore()
    for i, user in enumerate(ids):
        store.apply_patch(user, {"postpaid_limit": i * 1000, "spp": i * 7, "shipping_fee": 2**40 + i, "return_fee": 29}, (1 << 56) + i, "replica-a")
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    key_bytes = sum(sys.getsizeof(u) for u in ids) / USERS
    per_user = used / USERS
    record([
        ["store bytes per user at 1M users, excluding the key string (goal 300)", f"{per_user:.0f}", "300", f"{per_user / 300:.2f}x of goal", runtime(), machine()],
        ["  ... including the user_id string", f"{per_user + key_bytes:.0f}", "300", f"{(per_user + key_bytes) / 300:.2f}x of goal", runtime(), machine()],
    ])


if __name__ == "__main__":
    main()
