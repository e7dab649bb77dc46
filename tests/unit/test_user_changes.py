"""How a gateway applies the user change log: reloads, deletions, and holes in the sequence."""

from __future__ import annotations

from typing import List

from twisted.internet import defer
from twisted.internet.task import Clock

from lbsvc.testing import memory_database
from lbsvc.users.changelog import GAP_PATIENCE, ChangeCursor
from lbsvc.users.index import KeyIndex, User, hash_key
from lbsvc.users.store import UserStore
from tests.unit.fired import fired


def test_reload_updates_in_place_adds_and_deletes() -> None:
    users = KeyIndex()
    users.remember(User("alice", hash_key("k-1"), 5, 1.0))
    alice = users.authenticate("k-1")
    # alice rotated (k-2 new, k-1 in its grace period) and changed limits; bob was created.
    assert users.reload({"alice", "bob"},
                  [("alice", hash_key("k-2"), 50, 2.5), ("bob", hash_key("b-1"), 5, 1.0)],
                  [(hash_key("k-2"), "alice", None), (hash_key("k-1"), "alice", 10**12),
                   (hash_key("b-1"), "bob", None)]) == []
    assert users.authenticate("k-2") is alice and alice is not None and alice.capacity == 50
    assert users.authenticate("k-1") is alice  # still within its grace
    assert users.authenticate("b-1") is not None and len(users) == 2
    # alice's old key expired elsewhere: the reload drops the keys the database no longer has.
    assert users.reload({"alice"}, [("alice", hash_key("k-2"), 50, 2.5)], [(hash_key("k-2"), "alice", None)]) == []
    assert users.authenticate("k-1") is None and users.authenticate("k-2") is alice
    assert users.reload({"bob"}, [], []) == ["bob"]
    assert users.authenticate("b-1") is None and len(users) == 1


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



def test_two_gateways_on_one_database_see_each_others_changes() -> None:
    """The real statements, on one in-memory database shared by two stores."""
    clock = Clock()
    database = memory_database()
    here, there = UserStore(database, clock), UserStore(database, clock)
    fired(defer.ensureDeferred(here.open()))
    fired(defer.ensureDeferred(there.open()))
    deleted: List[str] = []
    there.on_deleted = deleted.append
    alice, key = fired(defer.ensureDeferred(here.create("alice")))
    assert there.authenticate(key) is None
    assert fired(defer.ensureDeferred(there.sync())) == 1
    seen = there.authenticate(key)
    assert seen is not None and seen.name == "alice" and (there.applied, here.applied) == (1, 0)  # here did not sync
    fired(defer.ensureDeferred(here.change(alice, 9, 3.0)))
    new_key = fired(defer.ensureDeferred(here.rotate(alice, grace=0)))
    fired(defer.ensureDeferred(there.sync()))
    assert there.authenticate(key) is None and there.authenticate(new_key) is seen and seen.capacity == 9
    fired(defer.ensureDeferred(here.delete(alice)))
    fired(defer.ensureDeferred(there.sync()))
    assert there.authenticate(new_key) is None and deleted == ["alice"] and len(there) == 0
    assert there.applied == 4


def test_a_gateway_whose_clock_is_hours_ahead_does_not_delete_changes_before_others_read_them() -> None:
    clock = Clock()
    database = memory_database()
    here = UserStore(database, clock, wall=lambda: 1_800_000_000.0)
    ahead = UserStore(database, clock, wall=lambda: 1_800_000_000.0 + 3 * 3600)  # prunes an hour's changes
    fired(defer.ensureDeferred(here.open()))
    fired(defer.ensureDeferred(ahead.open()))
    _, key = fired(defer.ensureDeferred(here.create("alice")))
    fired(defer.ensureDeferred(ahead.sync()))  # its first sync prunes what looks older than an hour to it
    assert ahead.authenticate(key) is not None and ahead.applied == 1
