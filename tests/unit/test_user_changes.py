"""How a gateway applies the user change log: reloads, deletions, and holes in the sequence."""

from __future__ import annotations

from typing import List

from twisted.internet.task import Clock

from lbsvc.users.changelog import GAP_PATIENCE, ChangeCursor
from lbsvc.users.store import User, UserStore, hash_key


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
    clock = Clock()
    changes = ChangeCursor(clock, position=10)
    changes.seen({12, 13})  # 11 not seen yet: a transaction still committing, or rolled back
    assert changes.position == 10
    changes.seen({11})  # it committed: everything up to 13 is seen
    assert changes.position == 13 and changes.ahead == set()
    changes.seen({15})
    clock.advance(GAP_PATIENCE - 1)
    changes.wait_for_holes()
    assert changes.position == 13
    clock.advance(1)
    changes.wait_for_holes()  # 14 never came: taken as rolled back
    assert changes.position == 15 and changes.ahead == set()

