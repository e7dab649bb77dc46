"""How a gateway applies the user change log: reloads, deletions, and holes in the sequence."""

from __future__ import annotations

from typing import List

from twisted.internet.task import Clock

from lbsvc.users import GAP_PATIENCE, User, UserStore, hash_key


def store() -> UserStore:
    users = UserStore(None, Clock())
    users._remember(User("alice", hash_key("k-1"), 5, 1.0))
    return users


def test_reload_updates_in_place_adds_and_deletes() -> None:
    users = store()
    alice = users.authenticate("k-1")
    deleted: List[str] = []
    users.on_deleted = deleted.append
    # alice rotated (k-2 new, k-1 in its grace period) and changed limits; bob was created.
    users._reload({"alice", "bob"},
                  [("alice", hash_key("k-2"), 50, 2.5), ("bob", hash_key("b-1"), 5, 1.0)],
                  [(hash_key("k-2"), "alice", None), (hash_key("k-1"), "alice", 10**12),
                   (hash_key("b-1"), "bob", None)])
    assert users.authenticate("k-2") is alice and alice is not None and alice.capacity == 50
    assert users.authenticate("k-1") is alice  # still within its grace
    assert users.authenticate("b-1") is not None and len(users) == 2
    # alice's old key expired elsewhere: the reload drops the keys the database no longer has.
    users._reload({"alice"}, [("alice", hash_key("k-2"), 50, 2.5)], [(hash_key("k-2"), "alice", None)])
    assert users.authenticate("k-1") is None and users.authenticate("k-2") is alice
    users._reload({"bob"}, [], [])
    assert users.authenticate("b-1") is None and deleted == ["bob"] and len(users) == 1


def test_a_hole_in_the_sequence_is_waited_for_then_skipped() -> None:
    users = store()
    clock: Clock = users.clock  # type: ignore[assignment]
    users._cursor = 10
    users._ahead = {12, 13}  # 11 not seen yet: a transaction still committing, or rolled back
    users._advance()
    assert users._cursor == 10
    users._ahead.add(11)  # it committed: everything up to 13 is seen
    users._advance()
    assert users._cursor == 13 and users._ahead == set()
    users._ahead = {15}
    users._advance()
    clock.advance(GAP_PATIENCE - 1)
    users._skip_old_gap()
    assert users._cursor == 13
    clock.advance(1)
    users._skip_old_gap()  # 14 never came: taken as rolled back
    assert users._cursor == 15 and users._ahead == set()
