"""``twistd lbsvc``: the options, and the wiring of the gateway's services."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger
from twisted.python import usage

from lbsvc.admin import admin_router
from lbsvc.backends import servers as servers_config
from lbsvc.backends.healthcheck import HealthChecker, http_probe, probe_agent
from lbsvc.backends.pool import BackendPool
from lbsvc.backends.tls import BackendTLS, ProbePolicy
from lbsvc.gateway import gateway_router
from lbsvc.limits.buckets import TICK, Buckets, IBucketStore, MemoryBucketStore
from lbsvc.limits.livegateways import DatabaseHeartbeat, LiveGateways, RedisHeartbeat
from lbsvc.limits.memorylimits import PerProcessLimits
from lbsvc.limits.redisbuckets import RedisBucketStore
from lbsvc.limits.redislink import RedisLink
from lbsvc.overview import Overview
from lbsvc.proxying.connections import UpstreamConnections
from lbsvc.proxying.proxy import Proxy
from lbsvc.service import DATABASE, USER_SYNC, USERS, GatewayService, UserSync, watch_database
from lbsvc.settings import OPTIONS, GatewaySettings
from lbsvc.users.api import UserAPI
from lbsvc.users.database import StorageUnavailable, open_database
from lbsvc.users.store import SYNC_INTERVAL, UserStore
from lbsvc.workermetrics import METRICS_SOCKET, SocketDirectory, WorkerScrape, worker_metrics_service
from lbsvc.workers import AdoptedPort, ParentWatch, Workers, bind, inherited
from svckit.accesslog import OFF, AccessLog
from svckit.metrics import CallbackGauges, new_registry
from svckit.options import EnvOptions
from svckit.readiness import Readiness
from svckit.site import listen, make_site
from svckit.supervisor import Supervisor

log = Logger()

class Options(EnvOptions):
    """Command line of ``twistd lbsvc``: :data:`lbsvc.settings.OPTIONS`, each with an environment variable."""

    synopsis = "[options]"
    table = OPTIONS
    settings: GatewaySettings

    def postOptions(self) -> None:
        """Parse every option into :class:`GatewaySettings`; load ``servers.yaml`` now."""
        values = self.parsed()
        try:
            servers = servers_config.load(values["servers"])
        except servers_config.ConfigError as e:
            raise usage.UsageError(str(e)) from None
        workers = values["workers"]
        if workers > 1 and values["buckets"] == "memory":
            raise usage.UsageError(f"--workers {workers} needs --buckets redis://...: with memory buckets"
                                   f" every worker would have its own, and limits would multiply by {workers}")
        self.settings = GatewaySettings(servers_path=values.pop("servers"), servers=servers, **values)


def makeService(options: Options, reactor: Optional[Any] = None) -> service.MultiService:
    """Wire the gateway: users, buckets, backends and checks, two ports."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    settings = options.settings
    database = open_database(settings.database)
    try:
        database.check()
    except StorageUnavailable as e:
        raise SystemExit(f"lbsvc: {e}") from None

    registry = new_registry()
    readiness = Readiness(USERS)
    users = UserStore(database, reactor)
    buckets = Buckets(reactor)
    store: IBucketStore = MemoryBucketStore(buckets)
    link: Optional[RedisLink] = None
    if settings.buckets != "memory":
        link = RedisLink(reactor, settings.buckets)
        store = RedisBucketStore(settings.buckets, buckets, settings.bucket_store_fallback,
                                 settings.redis_timeout, reactor, registry, link)
    users.on_deleted = buckets.forget
    pool = BackendPool(settings.servers, reactor)
    tls = BackendTLS()
    probes = probe_agent(reactor, settings.servers.timeouts.connect, ProbePolicy(tls, pool.ca_file_of))
    checker = HealthChecker(pool, http_probe(probes, reactor), reactor)

    gauges = CallbackGauges(registry)
    gauges.add("lbsvc_users", "Users known.", lambda: len(users))
    gauges.add("lbsvc_user_changes_applied", "Position in the user change log up to which this process has"
               " applied every change (all gateways reach the same).", lambda: users.applied)
    gauges.add("lbsvc_buckets_refilling", "Token buckets that are not full.", lambda: buckets.refilling)
    gauges.add("lbsvc_backend_up", "1 when a backend is in rotation.",
               lambda: {(b.name,): int(b.healthy) for b in pool.backends}, ["backend"])
    gauges.add("lbsvc_backend_ejected", "1 while a passive failure keeps a backend out.",
               lambda: {(b.name,): int(b.ejected_until > reactor.seconds()) for b in pool.backends}, ["backend"])
    gauges.add("lbsvc_backends_panic", "1 while under the panic threshold: all backends in rotation.",
               lambda: int(pool.panicking))
    gauges.add("lbsvc_backend_in_flight", "Requests in flight per backend.",
               lambda: {(b.name,): b.in_flight for b in pool.backends}, ["backend"])
    gauges.add("lbsvc_ready", "1 when ready.", lambda: int(readiness.ready))
    live: LiveGateways
    limits: Callable[[], Dict[str, Any]]
    if isinstance(store, RedisBucketStore) and link is not None:
        redis_store = store
        live = LiveGateways(RedisHeartbeat(link), reactor, on_count=redis_store.share.set_live)
        gauges.add("lbsvc_bucket_store_up", "1 while Redis decides the buckets, 0 while the fallback does.",
                   lambda: int(redis_store.up))
        gauges.add("lbsvc_bucket_store_mode", "1 for who decides the buckets now: redis, local_share or deny.",
                   lambda: {(m,): int(redis_store.mode == m) for m in ("redis", "local_share", "deny")}, ["mode"])
        limits = lambda: {"buckets": "redis", "mode": redis_store.mode, "gateways": live.count}  # noqa: E731
        multiplied = lambda: 0  # noqa: E731
        redis_up: Callable[[], Optional[bool]] = lambda: redis_store.up  # noqa: E731
    else:
        per_process = PerProcessLimits()
        live = LiveGateways(DatabaseHeartbeat(database, reactor), reactor,
                                        on_count=per_process.counted)
        limits = per_process.report
        multiplied = lambda: int(per_process.multiplied)  # noqa: E731
        redis_up = lambda: None  # noqa: E731
    gauges.add("lbsvc_limits_per_process", "1 while other live gateways keep their own memory buckets for"
               " the same users (the cluster may admit lbsvc_gateways_live times a limit).", multiplied)
    gauges.add("lbsvc_gateways_live", "Live gateway processes: on the Redis heartbeat with Redis buckets (the N"
               " of the local fallback's shares), on the user database's with memory buckets.",
               lambda: live.count)

    top = service.MultiService()
    if link is not None:
        link.setServiceParent(top)
    live.setServiceParent(top)
    access_log = AccessLog(settings.access_log, reactor, settings.access_log_format)
    access_log.setServiceParent(top)
    def failed(name: str) -> None:
        readiness.fail(name, "failed; restarting")

    Supervisor.looping("token refill", buckets.loop, TICK, reactor,
                       on_failure=failed, on_running=readiness.ok).setServiceParent(top)
    checks = Supervisor("health checks", checker.start, reactor, stop=checker.stop,
                        on_failure=failed, on_running=readiness.ok)
    checks.setServiceParent(top)
    watch = task.LoopingCall(watch_database, users, readiness)
    Supervisor.looping(DATABASE + " watch", watch, 1.0, reactor,
                       on_failure=failed, on_running=readiness.ok).setServiceParent(top)
    sync = task.LoopingCall(UserSync(users, readiness, reactor))
    Supervisor.looping(USER_SYNC, sync, SYNC_INTERVAL, reactor,
                       on_failure=failed, on_running=readiness.ok).setServiceParent(top)

    gateway = GatewayService(reactor, users, pool, checker, checks, settings.servers_path, readiness)
    gateway.setServiceParent(top)
    upstream = UpstreamConnections(reactor, settings.servers.timeouts.connect, settings.servers.pool_size, tls=tls)
    proxy = Proxy(store, pool, upstream, reactor, registry)
    api = UserAPI(users, store, settings.max_capacity, settings.max_rate)
    router = gateway_router(users, api, proxy, settings.max_body, registry)
    adopted = inherited()
    if adopted is not None:  # a worker of a --workers parent: its socket, metrics for the parent only
        AdoptedPort(reactor, adopted[0], adopted[1], make_site(router, access_log)).setServiceParent(gateway)
        ParentWatch(reactor).setServiceParent(top)
        socket_path = os.environ.get(METRICS_SOCKET)
        if socket_path:
            worker_metrics_service(reactor, socket_path, registry).setServiceParent(top)
        return top
    scrape: Optional[WorkerScrape] = None
    running: Callable[[], Dict[str, int]] = lambda: {"configured": 1, "running": 1}  # noqa: E731
    if settings.workers > 1:
        try:
            shared = bind(settings.endpoint)
        except (OSError, ValueError) as e:
            raise SystemExit(f"lbsvc: cannot listen on {settings.endpoint} for {settings.workers} workers: {e}") from None
        AdoptedPort(reactor, shared.fileno(), shared.family, make_site(router, access_log)).setServiceParent(gateway)
        sockets = SocketDirectory()
        workers = Workers(reactor, settings.workers, shared.fileno(), shared.family, options.argv(), sockets)
        workers.socket = shared  # kept open as long as the pool
        workers.setServiceParent(top)
        scrape = WorkerScrape(reactor, registry, sockets, list(range(1, settings.workers)))
        pool_of_workers = workers
        running = lambda: {"configured": settings.workers, "running": pool_of_workers.processes}  # noqa: E731
    else:
        listen(reactor, settings.endpoint, router, access_log).setServiceParent(gateway)
    overview = Overview(pool, users, readiness, registry, reactor, limits, redis_up, running,
                        scrape.families if scrape is not None else None)
    overview.history.setServiceParent(top)
    admin = admin_router(pool, readiness, registry, limits, running, scrape,
                         {b"/status": ("status", overview.page), b"/status.json": ("status_json", overview.json)})
    listen(reactor, settings.admin_endpoint, admin, AccessLog(OFF, reactor)).setServiceParent(top)
    return top
