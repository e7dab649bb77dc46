"""``twistd lbsvc``: options, the gateway site, the admin site, reload on SIGHUP."""

from __future__ import annotations

import signal
from typing import Any, Dict, Optional

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python import usage
from twisted.web import client, resource
from twisted.web.iweb import IRequest

from lbsvc import config as servers_config
from lbsvc.backends import BackendPool, HealthChecker
from lbsvc.buckets import Buckets
from lbsvc.proxy import ProxyResource
from lbsvc.upstream import upstream_agent
from lbsvc.userapi import ChangeLimits, CreateUser, Profile
from lbsvc.users import UserStore
from svckit.jsonweb import JSONResource, JSONResponse, LimitedRequest, NotFound
from svckit.metrics import MetricsResource, Registry
from svckit.options import EnvOptions, endpoint_description
from svckit.sites import ACCESS_LOG_OFF, make_site

log = Logger()


class Options(EnvOptions):
    """Command line of ``twistd lbsvc``; each option has an environment variable."""

    synopsis = "[options]"
    optParameters = [
        ["endpoint", None, "tcp:8080", "Gateway endpoint [LBSVC_ENDPOINT]."],
        ["servers", None, "servers.yaml", "Backends file [LBSVC_SERVERS]."],
        ["database", None, "lbsvc.sqlite3", "SQLite file of users [LBSVC_DATABASE]."],
        ["admin-endpoint", None, "tcp:8079:interface=127.0.0.1",
         "Endpoint of the gateway's own /health, /ready, /metrics [LBSVC_ADMIN_ENDPOINT]."],
        ["access-log", None, "-", "Access log: - (this log), a file, or off [LBSVC_ACCESS_LOG]."],
    ]
    envVars = {
        "endpoint": "LBSVC_ENDPOINT",
        "servers": "LBSVC_SERVERS",
        "database": "LBSVC_DATABASE",
        "admin-endpoint": "LBSVC_ADMIN_ENDPOINT",
        "access-log": "LBSVC_ACCESS_LOG",
    }

    def postOptions(self) -> None:
        """Normalise endpoints; load and validate ``servers.yaml`` now."""
        self["endpoint"] = endpoint_description(self["endpoint"])
        self["admin-endpoint"] = endpoint_description(self["admin-endpoint"])
        try:
            self["servers-config"] = servers_config.load(self["servers"])
        except servers_config.ConfigError as e:
            raise usage.UsageError(str(e))


class GatewayRequest(LimitedRequest):
    """Proxied uploads may be large; the user API checks its own smaller limit."""

    maxBody = 64 * 1024 * 1024


class GatewayRoot(resource.Resource):
    """``/user/...`` is the user API; every other path is proxied."""

    isLeaf = True

    def __init__(self, user_api: Dict[bytes, resource.Resource], proxy: resource.Resource) -> None:
        super().__init__()
        self.user_api = user_api
        self.proxy = proxy

    def render(self, request: IRequest) -> Any:
        """Dispatch on the path."""
        if request.path.startswith(b"/user/"):
            return self.user_api.get(request.path, NotFound()).render(request)
        return self.proxy.render(request)


class Ready(JSONResource):
    """``/ready`` of the admin site: users loaded, and backends by health."""

    def __init__(self, pool: BackendPool, loaded: Dict[str, bool]) -> None:
        super().__init__()
        self.pool = pool
        self.loaded = loaded

    def render_GET(self, request: IRequest) -> JSONResponse:
        """200 once the user table is loaded."""
        body = {
            "ready": self.loaded["users"],
            "backends": {b.name: b.healthy for b in self.pool.backends},
        }
        return JSONResponse(body, 200 if self.loaded["users"] else 503)


class Health(JSONResource):
    """``/health``: 200 while the process runs."""

    def render_GET(self, request: IRequest) -> JSONResponse:
        """Always OK."""
        return JSONResponse({"status": "ok"})


class GatewayService(service.MultiService):
    """Opens the user table, starts buckets and health checks, reloads on SIGHUP."""

    def __init__(self, reactor: Any, users: UserStore, buckets: Buckets, pool: BackendPool,
                 checker: HealthChecker, servers_path: str) -> None:
        super().__init__()
        self.reactor = reactor
        self.users, self.buckets, self.pool, self.checker = users, buckets, pool, checker
        self.servers_path = servers_path
        self.loaded = {"users": False}
        self._previous_hup: Any = None

    def startService(self) -> None:
        """Start everything; listen only once users are loaded."""
        self.buckets.start()
        self.checker.start()
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)
        d = defer.ensureDeferred(self.users.open())

        def opened(_: Any) -> None:
            self.loaded["users"] = True
            service.MultiService.startService(self)

        def failed(f: Any) -> None:
            log.failure("Cannot open the user database; stopping", f)
            self.reactor.stop()

        d.addCallbacks(opened, failed)

    def stopService(self) -> Any:
        """Stop loops and close the database."""
        self.buckets.stop()
        self.checker.stop()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        d = service.MultiService.stopService(self) if self.running else defer.succeed(None)
        d.addBoth(lambda _: self.users.close())
        return d

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Re-read ``servers.yaml``; keep the old configuration when it is invalid."""
        try:
            new = servers_config.load(self.servers_path)
        except servers_config.ConfigError as e:
            log.error("Reload refused, keeping the current backends: {error}", error=e)
            return
        self.pool.apply(new)
        self.checker.restart_if_changed()
        log.info("Reloaded {path}: {names}", path=self.servers_path,
                 names=", ".join(b.name for b in self.pool.backends))


def probe(agent: Any, clock: Any) -> Any:
    """A health probe: GET ``url`` within ``timeout``, fire with the status code."""
    def run(url: str, timeout: float) -> "defer.Deferred[int]":
        d = agent.request(b"GET", url.encode("utf-8"))
        d.addTimeout(timeout, clock)

        def code(response: Any) -> Any:
            return client.readBody(response).addBoth(lambda _: response.code)

        return d.addCallback(code)
    return run


def makeService(config: Any, reactor: Optional[Any] = None) -> service.MultiService:
    """Build the gateway."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    registry = Registry()
    users = UserStore.sqlite(config["database"])
    buckets = Buckets(reactor)
    pool = BackendPool(config["servers-config"])
    agent = upstream_agent(reactor)
    checker = HealthChecker(pool, probe(upstream_agent(reactor, persistent=False), reactor), reactor)
    top = GatewayService(reactor, users, buckets, pool, checker, config["servers"])

    registry.gauge("lbsvc_users", "Users known.", read=lambda: len(users))
    registry.gauge("lbsvc_buckets_refilling", "Token buckets that are not full.", read=lambda: buckets.refilling)
    registry.gauge("lbsvc_backend_up", "1 when a backend is in rotation.", ("backend",),
                   read=lambda: {(b.name,): int(b.healthy) for b in pool.backends})
    registry.gauge("lbsvc_backend_in_flight", "Requests in flight per backend.", ("backend",),
                   read=lambda: {(b.name,): b.in_flight for b in pool.backends})

    proxy = ProxyResource(users, buckets, pool, agent, reactor, registry)
    user_api = {
        b"/user/create": CreateUser(users),
        b"/user/tokens/profile": Profile(users, buckets),
        b"/user/tokens/change": ChangeLimits(users, buckets),
    }
    site = make_site(GatewayRoot(user_api, proxy), GatewayRequest, config["access-log"])
    StreamServerEndpointService(endpoints.serverFromString(reactor, config["endpoint"]), site).setServiceParent(top)

    admin = resource.Resource()
    admin.putChild(b"health", Health())
    admin.putChild(b"ready", Ready(pool, top.loaded))
    admin.putChild(b"metrics", MetricsResource(registry))
    StreamServerEndpointService(
        endpoints.serverFromString(reactor, config["admin-endpoint"]),
        make_site(admin, LimitedRequest, ACCESS_LOG_OFF),
    ).setServiceParent(top)
    return top
