"""GradeStore merge rules: partial writes, the later stream offset wins per field, idempotence."""

from __future__ import annotations

import itertools
import platform
import random
from typing import List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradesvc.state.store import FIELDS, Grade, GradeStore

Write = Tuple[str, dict, int]


def snapshot(store: GradeStore) -> dict:
    return {u: store.get(u) for u in store}


def test_absent_field_keeps_value_and_zero_is_a_value() -> None:
    store = GradeStore()
    store.apply_patch("1", {"postpaid_limit": 254, "spp": 2321}, 10)
    store.apply_patch("1", {"spp": 0}, 11)
    assert store.values("1") == (254, 0, 0, 0)


def test_unknown_user_is_none_and_empty_patch_creates_user() -> None:
    store = GradeStore()
    assert store.values("nobody") is None
    store.apply_patch("2", {}, 5)
    assert store.values("2") == (0, 0, 0, 0)


def test_newer_version_wins_per_field_in_any_order() -> None:
    store = GradeStore()
    store.apply_patch("u", {"spp": 2}, 20)
    store.apply_patch("u", {"spp": 1, "return_fee": 7}, 10)
    assert store.values("u") == (0, 2, 0, 7)


def test_idempotent_and_old_messages_change_nothing() -> None:
    store = GradeStore()
    assert store.apply_patch("u", {"spp": 1}, 10) == 1
    assert store.apply_patch("u", {"spp": 1}, 10) == 0
    assert store.apply_patch("u", {"spp": 9}, 9) == 0
    assert store.values("u") == (0, 1, 0, 0)


def test_grade_carries_versions() -> None:
    store = GradeStore()
    store.apply_patch("u", {"spp": 1}, 10)
    assert store.get("u") == Grade("u", (0, 1, 0, 0), (-1, 10, -1, -1))


writes = st.lists(
    st.tuples(
        st.sampled_from(["1", "2", "x,y"]),
        st.dictionaries(st.sampled_from(FIELDS), st.integers(-(2**63), 2**63 - 1)),
        st.integers(0, 5),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(writes, st.randoms(use_true_random=False))
def test_any_order_and_duplication_converges(ws: List[Write], rnd: random.Random) -> None:
    """Property: the final state depends only on the set of writes."""
    # Two different writes at one offset are impossible (the stream gives
    # each message its own), so keep the first write of each offset.
    unique = {t: (u, p, t) for u, p, t in reversed(ws)}
    ws = list(unique.values())
    reference = GradeStore()
    for w in ws:
        reference.apply_patch(*w)
    shuffled = ws + ws[: len(ws) // 2]
    rnd.shuffle(shuffled)
    other = GradeStore()
    for w in shuffled:
        other.apply_patch(*w)
    assert snapshot(other) == snapshot(reference)


@pytest.mark.skipif(platform.python_implementation() != "CPython", reason="tracemalloc is CPython's")
def test_memory_per_user_is_small() -> None:
    """About 120 bytes a user besides its id on CPython: the record is 64 packed bytes."""
    import tracemalloc  # CPython's only
    store = GradeStore()
    users = [str(1_000_000 + n) for n in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for user in users:
            store.apply_patch(user, {"spp": 2**40}, 2**60)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert used / len(users) <= 150
    assert list(itertools.islice(store, 1)) == ["1000000"]
