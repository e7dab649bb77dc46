"""The gateway in memory: StubTreq in front, in-memory backend resources behind."""

from __future__ import annotations

import json
from typing import Any, Dict, List

from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import defer, error, task
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.client import ResponseDone
from twisted.web.iweb import IAgent
from zope.interface import implementer

from lbsvc import config
from lbsvc.backends import BackendPool
from lbsvc.buckets import Buckets
from lbsvc.gateway import gateway_router
from lbsvc.proxy import Proxy, _BodyRelay
from lbsvc.userapi import UserAPI
from lbsvc.users import User, UserStore, hash_key
from svckit.metrics import new_registry
from tests.unit.fired import fired


class Echo(resource.Resource):
    """A backend that tells which one it is and what it saw."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.seen: List[Dict[str, Any]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append({
            "method": request.method, "uri": request.uri, "body": request.content.read(),
            "headers": {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()},
        })
        request.setHeader(b"x-backend", self.name.encode())
        return f"Server {self.name} answer".encode()


@implementer(IAgent)
class Backends:
    """Routes by host:port to a resource, or refuses the connection."""

    def __init__(self, routes: Dict[bytes, Any]) -> None:
        self.routes = routes

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
        for prefix, target in self.routes.items():
            if uri.startswith(prefix):
                if target is None:
                    return defer.fail(error.ConnectionRefusedError())
                if target == "hang":
                    return defer.Deferred()
                return target.request(method, uri, headers, bodyProducer)
        raise AssertionError(uri)


def gateway(dead: bool = False, hang: bool = False) -> tuple:
    a, b = Echo("a"), Echo("b")
    servers = config.parse({"servers": [
        {"name": "a", "url": "http://10.0.0.1:1"}, {"name": "b", "url": "http://10.0.0.2:1"}],
        "timeouts": {"response": 5}})
    routes = {
        b"http://10.0.0.1:1": None if dead else ("hang" if hang else RequestTraversalAgent(a)),
        b"http://10.0.0.2:1": "hang" if hang else RequestTraversalAgent(b),
    }
    clock = Clock()
    users = UserStore(pool=None, clock=clock)  # type: ignore[arg-type]
    users._remember(User("alice", hash_key("k-1"), 2, 1.0))
    buckets = Buckets(clock)
    pool = BackendPool(servers)
    coop = task.Cooperator(scheduler=lambda work: clock.callLater(0, work))
    registry = new_registry()
    proxy = Proxy(buckets, pool, Backends(routes), clock, registry, coop)
    stub = StubTreq(gateway_router(users, UserAPI(users, buckets), proxy, 1024, registry))
    stub.backend_agents = [v for v in routes.values() if isinstance(v, RequestTraversalAgent)]
    return stub, (a, b), pool, clock




def test_proxies_round_robin_strips_key_adds_forwarded() -> None:
    treq, (a, b), _, clock = gateway()
    headers = {"Authorization": "Bearer k-1", "Connection": "keep-alive, x-drop", "X-Drop": "1"}
    d = treq.post("http://gw.example/x?y=1", data=b"payload", headers=headers)
    for _ in range(5):
        clock.advance(0)
        for agent in treq.backend_agents:
            agent.flush()
        treq.flush()
    r1 = fired(d)
    assert fired(r1.content()) == b"Server a answer"
    assert r1.headers.getRawHeaders("x-backend") == ["a"]
    seen = a.seen[0]
    assert (seen["method"], seen["uri"], seen["body"]) == (b"POST", b"/x?y=1", b"payload")
    assert b"authorization" not in seen["headers"] and b"x-drop" not in seen["headers"]
    assert seen["headers"][b"x-forwarded-host"] == [b"gw.example"]
    assert seen["headers"][b"x-forwarded-proto"] == [b"http"]
    assert seen["headers"][b"x-forwarded-for"]
    assert seen["headers"][b"via"] == [b"1.1 lbsvc"]
    assert r1.headers.getRawHeaders("via") == ["1.1 lbsvc"]
    r2 = fired(treq.get("http://gw.example/", headers={"Authorization": "k-1"}))
    assert fired(r2.content()) == b"Server b answer"


def test_rate_limit_headers() -> None:
    treq, _, _, clock = gateway()
    for _ in range(2):
        assert fired(treq.get("http://gw/", headers={"Authorization": "k-1"})).code == 200
    r = fired(treq.get("http://gw/", headers={"Authorization": "k-1"}))
    assert r.code == 429
    assert r.headers.getRawHeaders("retry-after") == ["1"]
    assert r.headers.getRawHeaders("ratelimit-limit") == ["2"]
    assert r.headers.getRawHeaders("ratelimit-remaining") == ["0"]
    assert r.headers.getRawHeaders("ratelimit-reset") == ["2"]
    answer = fired(treq.get("http://gw/user/tokens/profile", headers={"Authorization": "k-1"}))
    profile = json.loads(fired(answer.content()))
    assert profile["current_capacity"] == 0  # looking costs nothing


def test_missing_or_unknown_key() -> None:
    treq, (a, b), _, _ = gateway()
    assert fired(treq.get("http://gw/")).code == 401
    assert fired(treq.get("http://gw/", headers={"Authorization": "nope"})).code == 401
    assert a.seen == [] and b.seen == []


def test_refused_connection_moves_on_and_marks_down() -> None:
    treq, (a, b), pool, _ = gateway(dead=True)
    r = fired(treq.get("http://gw/", headers={"Authorization": "k-1"}))
    assert (r.code, fired(r.content())) == (200, b"Server b answer")
    assert not pool.backends[0].healthy


def test_no_healthy_backend_is_503() -> None:
    treq, _, pool, _ = gateway()
    for backend in pool.backends:
        backend.healthy = False
    r = fired(treq.get("http://gw/", headers={"Authorization": "k-1"}))
    assert (r.code, fired(r.content())) == (503, b"No available servers")


def test_upstream_timeout_is_504_and_takes_the_backend_out() -> None:
    treq, _, pool, clock = gateway(hang=True)
    d = treq.get("http://gw/", headers={"Authorization": "k-1"})
    clock.advance(5.1)
    treq.flush()
    r = fired(d)
    assert (r.code, fired(r.content())) == (504, b"Gateway timeout")
    assert [b.healthy for b in pool.backends] == [False, True]  # the one that timed out


class FakeClient:
    """The client side of a relay: what was written, and whether it left."""

    _disconnected = False

    def __init__(self) -> None:
        self.written: List[bytes] = []

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written.append(data)


class FakeUpstream:
    stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


def test_a_stalled_response_body_is_cut_off_and_the_backend_taken_out() -> None:
    clock = Clock()
    stalled: List[str] = []
    client = FakeClient()
    relay = _BodyRelay(client, clock, 2.0, lambda: stalled.append("out"))  # type: ignore[arg-type]
    upstream = FakeUpstream()
    relay.makeConnection(upstream)  # type: ignore[arg-type]
    relay.dataReceived(b"part")
    clock.advance(1.5)
    relay.dataReceived(b"more")  # resets the idle timer
    clock.advance(1.5)
    assert stalled == [] and client.written == [b"part", b"more"]
    clock.advance(0.6)
    assert stalled == ["out"] and upstream.stopped
    relay.connectionLost(Failure(ResponseDone()))
    failures: List[Failure] = []
    relay.done.addErrback(failures.append)
    assert failures and failures[0].check(defer.CancelledError)
