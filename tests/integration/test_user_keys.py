"""Keys with a lifecycle, and limits with ceilings, on the real gateway (contract 3.2)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Iterator, Tuple

import pytest

from harness.backends import Backend, write_servers
from harness.daemon import assert_no_logged_errors
from harness.databases import stored_key_hashes
from harness.gateway import Gateway
from harness.net import wait_until
from lbsvc.users.index import hash_key

pytestmark = pytest.mark.integration


@pytest.fixture
def lb(tmp_path: Path, user_database: str) -> Iterator[Tuple[Gateway, Backend]]:
    backend = Backend("one")
    write_servers(tmp_path / "servers.yaml", [backend])
    gateway = Gateway(tmp_path, user_database)
    gateway.env.update({"LBSVC_MAX_CAPACITY": "100", "LBSVC_MAX_RATE": "10"})
    gateway.start().wait_ready()
    yield gateway, backend
    gateway.stop()
    backend.stop()
    assert_no_logged_errors([gateway])


def test_rotate_with_a_grace_period_then_delete(lb: Tuple[Gateway, Backend], tmp_path: Path) -> None:
    gateway, _ = lb
    old = gateway.create("rotator")
    code, _, body = gateway.call("POST", "/user/keys/rotate", {"grace_seconds": 1.5}, key=old)
    assert code == 200, body
    new = json.loads(body)["api_key"]
    assert new != old and json.loads(body)["previous_keys_valid_for"] == 1.5
    assert gateway.call("GET", "/user/tokens/profile", key=old)[0] == 200  # within the grace period
    assert gateway.call("GET", "/user/tokens/profile", key=new)[0] == 200
    wait_until(lambda: gateway.call("GET", "/user/tokens/profile", key=old)[0] == 401, 5, "the old key to expire")
    rows = stored_key_hashes(gateway.database)
    assert hash_key(new) in rows and not any(new in r for r in rows)  # hashed at rest
    code, _, body = gateway.call("POST", "/user/keys/rotate", key=new)  # no body: no grace
    newest = json.loads(body)["api_key"]
    assert gateway.call("GET", "/user/tokens/profile", key=new)[0] == 401
    for bad in ({"grace_seconds": -1}, {"grace_seconds": 86_401}, {"grace_seconds": "1"}, {"other": 1}):
        assert gateway.call("POST", "/user/keys/rotate", bad, key=newest)[0] == 400, bad
    gateway.stop()
    gateway.start().wait_ready()  # keys and their expiry survive a restart
    assert gateway.call("GET", "/user/tokens/profile", key=newest)[0] == 200
    assert gateway.call("GET", "/user/tokens/profile", key=old)[0] == 401
    assert gateway.call("POST", "/user/delete", key=newest)[0] == 200
    assert gateway.call("GET", "/user/tokens/profile", key=newest)[0] == 401
    assert gateway.call("GET", "/x", key=newest)[0] == 401
    code, _, body = gateway.call("POST", "/user/create", {"name": "rotator"})
    assert code == 201  # the name is free again


def test_limits_stay_under_the_configured_ceilings(lb: Tuple[Gateway, Backend]) -> None:
    gateway, _ = lb
    key = gateway.create("capped")
    assert gateway.call("POST", "/user/tokens/change", {"capacity": 100, "rate_per_sec": 10}, key=key)[0] == 200
    for too_much in ({"capacity": 101}, {"rate_per_sec": 10.5}):
        code, _, body = gateway.call("POST", "/user/tokens/change", too_much, key=key)
        assert code == 400 and "Error" in json.loads(body)


def test_users_of_the_previous_schema_keep_their_keys(tmp_path: Path) -> None:
    database = tmp_path / "users.sqlite3"
    old = sqlite3.connect(str(database))
    old.execute("CREATE TABLE users (name VARCHAR(64) PRIMARY KEY, key_hash CHAR(64) NOT NULL UNIQUE,"
                " capacity INTEGER NOT NULL, rate_per_sec DOUBLE PRECISION NOT NULL)")
    old.execute("INSERT INTO users VALUES ('veteran', ?, 7, 2.0)", (hash_key("old-key"),))
    old.commit()
    old.close()
    backend = Backend("one")
    write_servers(tmp_path / "servers.yaml", [backend])
    gateway = Gateway(tmp_path).start().wait_ready()  # type: ignore[attr-defined]
    try:
        code, _, body = gateway.call("GET", "/user/tokens/profile", key="old-key")
        assert code == 200 and json.loads(body)["capacity"] == 7
        assert "migrated to version 1" in gateway.log()
        assert sqlite3.connect(str(database)).execute("PRAGMA user_version").fetchone() == (3,)
    finally:
        gateway.stop()
        backend.stop()
