"""One gateway process's parts, wired from its settings: the one wiring there is.

:func:`build_gateway` makes every part of a gateway and the services that
run them, but opens no port: ``twistd lbsvc`` (:mod:`lbsvc.tap`) builds with
it and then listens (:mod:`lbsvc.ports`); the unit tests build their
in-memory gateways with it, giving a clock, an in-memory database and how
backends are dialled (:mod:`lbsvc.testing`); so do the benchmarks.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import attrs
from prometheus_client import CollectorRegistry
from twisted.application import service
from twisted.internet import task
from twisted.internet.interfaces import IStreamClientEndpoint

from lbsvc.backends.backend import Backend
from lbsvc.backends.healthcheck import HealthChecker, http_probe, probe_agent
from lbsvc.backends.pool import BackendPool
from lbsvc.backends.tls import BackendTLS, ProbePolicy
from lbsvc.gateway import gateway_router
from lbsvc.gauges import gateway_gauges, limits_gauges, redis_gauges
from lbsvc.limits.buckets import TICK, Buckets
from lbsvc.limits.choice import Limits, choose_limits
from lbsvc.limits.leases import SWEEP, GiveBack, LeasedBucketStore
from lbsvc.limits.redisbuckets import RedisBucketStore
from lbsvc.proxying.connections import UpstreamConnections
from lbsvc.proxying.proxy import Proxy
from lbsvc.proxying.upstreams import Upstreams
from lbsvc.service import DATABASE, USER_SYNC, USERS, GatewayService, UserSync, watch_database
from lbsvc.settings import GatewaySettings
from lbsvc.users.api import UserAPI
from lbsvc.users.database import IUserDatabase
from lbsvc.users.store import SYNC_INTERVAL, UserStore
from svckit.accesslog import AccessLog
from svckit.metrics import new_registry
from svckit.readiness import Readiness
from svckit.site import GuardedSite, make_site
from svckit.supervisor import Supervisor
from svckit.web import Router


@attrs.define
class Gateway:
    """Every part of one gateway process."""

    settings: GatewaySettings
    reactor: Any
    registry: CollectorRegistry
    readiness: Readiness
    users: UserStore
    buckets: Buckets
    limits: Limits
    backends: BackendPool
    checker: HealthChecker
    upstream: UpstreamConnections
    proxy: Proxy
    router: Router
    """The gateway port's routes: the user API and the proxy."""
    access_log: AccessLog
    service: service.MultiService
    """What runs it all (``makeService``'s answer); the ports join :attr:`ports`."""
    ports: GatewayService
    """Starts its ports once the users are loaded."""

    def site(self) -> GuardedSite:
        """The HTTP site of the gateway port."""
        return make_site(self.router, self.access_log)


def build_gateway(settings: GatewaySettings, reactor: Any, database: IUserDatabase,
                  endpoint_for: Optional[Callable[[Backend], IStreamClientEndpoint]] = None) -> Gateway:
    """Wire a gateway on ``database``; ``endpoint_for`` dials backends (by default over TCP or TLS)."""
    registry = new_registry()
    readiness = Readiness(USERS)
    users = UserStore(database, reactor)
    buckets = Buckets(reactor)
    limits = choose_limits(settings.buckets, settings.bucket_store_fallback, settings.redis_timeout, buckets,
                           database, registry, reactor, settings.lease_length)
    users.on_deleted = buckets.forget
    pool = BackendPool(settings.servers, reactor)
    tls = BackendTLS()
    probes = probe_agent(reactor, settings.servers.timeouts.connect, ProbePolicy(tls, pool.ca_file_of))
    checker = HealthChecker(pool, http_probe(probes, reactor), reactor)

    gauges = gateway_gauges(registry, users, buckets, pool, readiness, reactor)
    limits_gauges(gauges, limits.live, limits.multiplied)
    if isinstance(limits.store, RedisBucketStore):
        redis_gauges(gauges, limits.store)

    top = service.MultiService()
    if isinstance(limits.store, LeasedBucketStore) and limits.link is not None:
        GiveBack(limits.store, limits.link).setServiceParent(top)  # runs the link: blocks back before it closes
    elif limits.link is not None:
        limits.link.setServiceParent(top)
    limits.live.setServiceParent(top)
    access_log = AccessLog(settings.access_log, reactor, settings.access_log_format)
    access_log.setServiceParent(top)

    def failed(name: str) -> None:
        readiness.fail(name, "failed; restarting")

    def supervised(name: str, loop: task.LoopingCall, interval: float) -> None:
        Supervisor.looping(name, loop, interval, reactor, on_failure=failed,
                           on_running=readiness.ok).setServiceParent(top)

    supervised("token refill", buckets.loop, TICK)
    if isinstance(limits.store, LeasedBucketStore):
        supervised("lease sweep", limits.store.sweeper, SWEEP)
    checks = Supervisor("health checks", checker.start, reactor, stop=checker.stop,
                        on_failure=failed, on_running=readiness.ok)
    checks.setServiceParent(top)
    supervised(DATABASE + " watch", task.LoopingCall(watch_database, users, readiness), 1.0)
    supervised(USER_SYNC, task.LoopingCall(UserSync(users, readiness, reactor)), SYNC_INTERVAL)

    ports = GatewayService(reactor, users, pool, checker, checks, settings.servers_path, readiness)
    ports.setServiceParent(top)
    upstream = UpstreamConnections(reactor, settings.servers.timeouts.connect, settings.servers.pool_size,
                                   endpoint_for=endpoint_for, tls=tls)
    proxy = Proxy(limits.store, Upstreams(pool, upstream, reactor, registry))
    api = UserAPI(users, limits.store, settings.max_capacity, settings.max_rate)
    router = gateway_router(users, api, proxy, settings.max_body, registry)
    return Gateway(settings, reactor, registry, readiness, users, buckets, limits, pool, checker, upstream,
                   proxy, router, access_log, top, ports)
