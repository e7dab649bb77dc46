"""gradesvc's resources over real HTTP parsing in memory (treq's StubTreq)."""

from __future__ import annotations

import json
from typing import Any, List, Optional

import pytest
from treq.testing import StubTreq
from twisted.internet import defer

from gradesvc.auth import BasicAuthResource, admin_portal
from gradesvc.backup import BackupResource
from gradesvc.broker import BrokerUnavailable
from gradesvc.hlc import HybridLogicalClock
from gradesvc.messages import WriteMessage
from gradesvc.readapi import read_root
from gradesvc.status import READY, ReplicaStatus
from gradesvc.storage import GradeStore
from gradesvc.writeapi import SetResource, write_root
from svckit.metrics import Registry
from tests.unit.fired import fired


class MemoryBroker:
    """Stands in for the broker in memory: records or refuses publishes."""

    def __init__(self) -> None:
        self.published: List[WriteMessage] = []
        self.down = False

    async def publish(self, body: bytes, properties: Any) -> None:
        if self.down:
            raise BrokerUnavailable("not connected to the broker")
        assert properties.app_id == "r1" and properties.delivery_mode == 2
        assert properties.content_type == "application/json"
        self.published.append(WriteMessage.decode(body))


class Replica:
    def __init__(self, ready: bool = True) -> None:
        self.store = GradeStore()
        self.status = ReplicaStatus(phase=READY if ready else "starting", connected=True)
        self.status.ever_ready = ready
        self.broker = MemoryBroker()
        registry = Registry()
        hlc = HybridLogicalClock(lambda: 1000.0)
        setter = SetResource(self.store, hlc, "r1", self.broker, self.status, registry)  # type: ignore[arg-type]
        guarded = BasicAuthResource(admin_portal(write_root(setter), "admin", "s3cret"))
        backup = BackupResource(self.store, self.status, registry, "r1")
        self.read = StubTreq(read_root(self.store, self.status, registry, "r1", backup))
        self.write = StubTreq(guarded)

    def set(self, body: Any, auth: Optional[tuple] = ("admin", "s3cret"), **kw: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.write.post("http://w/set", data=data, auth=auth, **kw)




def call(replica_treq: StubTreq, d: "defer.Deferred[Any]") -> tuple:
    response = fired(d)
    body = fired(response.content())
    replica_treq.flush()
    return response, body


@pytest.fixture
def replica() -> Replica:
    return Replica()


def test_set_then_get_and_partial_merge(replica: Replica) -> None:
    r, body = call(replica.write, replica.set({"user_id": "1", "postpaid_limit": 254, "spp": 2321, "shipping_fee": 20, "return_fee": 29}))
    assert (r.code, json.loads(body)) == (200, {"Result": "OK"})
    call(replica.write, replica.set({"user_id": "1", "return_fee": 0}))
    r, body = call(replica.read, replica.read.get("http://r/get", params={"user_id": "1"}))
    assert r.code == 200
    assert json.loads(body) == {"Result": {"user_id": "1", "postpaid_limit": 254, "spp": 2321, "shipping_fee": 20, "return_fee": 0}}
    assert [m.write.patch for m in replica.broker.published] == [
        {"postpaid_limit": 254, "spp": 2321, "shipping_fee": 20, "return_fee": 29},
        {"return_fee": 0},
    ]


@pytest.mark.parametrize(
    "body, code",
    [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b'"text"', 400),
        ({"user_id": ""}, 400),
        ({"user_id": "1", "spp": 1.0}, 400),
        ({"user_id": "1", "spp": False}, 400),
        ({"user_id": "1", "extra": 1}, 400),
        ({"user_id": "1", "spp": 2**63}, 400),
        (b"\xff\xfe", 400),
        (json.dumps({"user_id": "1", "pad": "x" * 70000}).encode(), 413),
    ],
)
def test_bad_writes_store_nothing(replica: Replica, body: Any, code: int) -> None:
    r, data = call(replica.write, replica.set(body))
    assert r.code == code
    assert r.headers.getRawHeaders("content-type") == ["application/json"]
    assert set(json.loads(data)) == {"Error"}
    assert len(replica.store) == 0 and replica.broker.published == []


@pytest.mark.parametrize("auth", [None, ("admin", "wrong"), ("root", "s3cret"), ("", "")])
def test_credentials(replica: Replica, auth: Any) -> None:
    r, data = call(replica.write, replica.set({"user_id": "1", "spp": 1}, auth=auth))
    assert r.code == 401
    assert r.headers.getRawHeaders("www-authenticate") == ['Basic realm="gradesvc"']
    assert "Error" in json.loads(data)
    assert len(replica.store) == 0


def test_malformed_authorization_header(replica: Replica) -> None:
    for header in (b"Basic !!!notbase64", b"Bearer abc", b"Basic " + b"YWRtaW4="):
        r, data = call(replica.write, replica.write.post("http://w/set", data=b"{}", headers={b"Authorization": header}))
        assert r.code == 401, header


def test_wrong_method_and_unknown_path(replica: Replica) -> None:
    r, data = call(replica.write, replica.write.get("http://w/set", auth=("admin", "s3cret")))
    assert r.code == 405 and r.headers.getRawHeaders("allow") == ["POST"]
    r, data = call(replica.write, replica.write.post("http://w/nope", auth=("admin", "s3cret")))
    assert r.code == 404 and "Error" in json.loads(data)
    r, _ = call(replica.read, replica.read.post("http://r/get?user_id=1"))
    assert r.code == 405


def test_broker_down_is_503_and_nothing_applied(replica: Replica) -> None:
    replica.broker.down = True
    r, data = call(replica.write, replica.set({"user_id": "1", "spp": 1}))
    assert r.code == 503 and "broker" in json.loads(data)["Error"]
    assert len(replica.store) == 0


def test_get_errors(replica: Replica) -> None:
    for params, code in (({}, 400), ({"user_id": ""}, 400), ({"user_id": "ghost"}, 404)):
        r, data = call(replica.read, replica.read.get("http://r/get", params=params))
        assert r.code == code and "Error" in json.loads(data)


def test_not_ready_replica_refuses_reads_writes_and_backups() -> None:
    replica = Replica(ready=False)
    replica.store.apply_patch("1", {"spp": 1}, 1, "x")
    for treq, d in (
        (replica.read, replica.read.get("http://r/get", params={"user_id": "1"})),
        (replica.read, replica.read.get("http://r/backup")),
        (replica.write, replica.set({"user_id": "1", "spp": 2})),
    ):
        r, _ = call(treq, d)
        assert r.code == 503 and r.headers.getRawHeaders("retry-after") == ["1"]
    r, data = call(replica.read, replica.read.get("http://r/ready"))
    assert r.code == 503 and json.loads(data)["phase"] == "starting"


def test_banner_health_ready_metrics(replica: Replica) -> None:
    r, data = call(replica.read, replica.read.get("http://r/"))
    assert (r.code, data) == (200, b"Server r1 answer")
    r, data = call(replica.read, replica.read.get("http://r/health"))
    assert r.code == 200
    r, data = call(replica.read, replica.read.get("http://r/ready"))
    assert r.code == 200 and json.loads(data)["ready"] is True
    call(replica.write, replica.set({"user_id": "1", "spp": 1}))
    r, data = call(replica.read, replica.read.get("http://r/metrics"))
    assert r.code == 200
    assert 'gradesvc_writes_total{outcome="200"} 1' in data.decode()
