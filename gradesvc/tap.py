"""``twistd gradesvc``: options and the service tree of one replica."""

from __future__ import annotations

import socket
import time
from typing import Any, List, Optional

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage
from twisted.web import server

from gradesvc.auth import BasicAuthResource, admin_portal
from gradesvc.backup import BackupResource
from gradesvc.bootstrap import Bootstrap
from gradesvc.broker import BrokerService
from gradesvc.hlc import HybridLogicalClock
from gradesvc.readapi import read_root
from gradesvc.replication import StreamConsumer
from gradesvc.status import ReplicaStatus
from gradesvc.storage import GradeStore
from gradesvc.writeapi import SetResource, write_root
from svckit.jsonweb import LimitedRequest
from svckit.metrics import Registry
from svckit.options import EnvOptions, endpoint_description, positive_float
from svckit.sites import make_site

log = Logger()


def parse_peers(value: str) -> List[str]:
    """Comma-separated base URLs of other replicas' read ports."""
    peers = [p.strip().rstrip("/") for p in value.split(",") if p.strip()]
    for peer in peers:
        if not peer.startswith(("http://", "https://")):
            raise usage.UsageError(f"peer {peer!r} is not an http:// or https:// URL")
    return peers


class Options(EnvOptions):
    """Command line of ``twistd gradesvc``; each option has an environment variable."""

    synopsis = "[options]"
    longdesc = (
        "A replica of the grade store. Every option can also be set through the"
        " environment variable named in brackets; the command line wins."
    )
    optParameters = [
        ["get-endpoint", None, "tcp:8070", "Read port endpoint [GRADESVC_GET_ENDPOINT]."],
        ["set-endpoint", None, "tcp:8071", "Write port endpoint [GRADESVC_SET_ENDPOINT]."],
        ["amqp-url", None, "amqp://guest:guest@127.0.0.1:5672/%2F", "Broker URL [GRADESVC_AMQP_URL]."],
        ["stream", None, "user_grades", "Stream queue name [GRADESVC_STREAM]."],
        ["replica-id", None, None, "Unique replica id; default the host name [GRADESVC_REPLICA_ID]."],
        ["peers", None, "", "Comma-separated base URLs of peers' read ports [GRADESVC_PEERS]."],
        ["admin-user", None, None, "User name for the write port [GRADESVC_ADMIN_USER]."],
        ["admin-password", None, None, "Password for the write port [GRADESVC_ADMIN_PASSWORD]."],
        ["access-log", None, "-", "Access log: - (this log), a file, or off [GRADESVC_ACCESS_LOG]."],
        ["peer-idle-timeout", None, "30", "Seconds a peer's /backup may send nothing before the next"
         " peer is tried [GRADESVC_PEER_IDLE_TIMEOUT]."],
    ]
    envVars = {
        "get-endpoint": "GRADESVC_GET_ENDPOINT",
        "set-endpoint": "GRADESVC_SET_ENDPOINT",
        "amqp-url": "GRADESVC_AMQP_URL",
        "stream": "GRADESVC_STREAM",
        "replica-id": "GRADESVC_REPLICA_ID",
        "peers": "GRADESVC_PEERS",
        "admin-user": "GRADESVC_ADMIN_USER",
        "admin-password": "GRADESVC_ADMIN_PASSWORD",
        "access-log": "GRADESVC_ACCESS_LOG",
        "peer-idle-timeout": "GRADESVC_PEER_IDLE_TIMEOUT",
    }

    def postOptions(self) -> None:
        """Normalise endpoints and peers; insist on credentials."""
        self["get-endpoint"] = endpoint_description(self["get-endpoint"])
        self["set-endpoint"] = endpoint_description(self["set-endpoint"])
        self["replica-id"] = self["replica-id"] or socket.gethostname()
        self["peer-list"] = parse_peers(self["peers"] or "")
        self["peer-idle-timeout"] = positive_float("--peer-idle-timeout", str(self["peer-idle-timeout"]))
        if not self["admin-user"] or not self["admin-password"]:
            raise usage.UsageError(
                "the write port needs credentials: set --admin-user and"
                " --admin-password (or GRADESVC_ADMIN_USER and GRADESVC_ADMIN_PASSWORD)"
            )
        if not self["amqp-url"].startswith(("amqp://", "amqps://")):
            raise usage.UsageError("--amqp-url must be an amqp:// URL")
        if not self["stream"]:
            raise usage.UsageError("--stream must not be empty")


class BootstrapService(service.Service):
    """Runs :class:`Bootstrap` once at start, then releases the consumer."""

    def __init__(self, bootstrap: Bootstrap, consumer: StreamConsumer) -> None:
        self.bootstrap = bootstrap
        self.consumer = consumer
        self._running: Optional["defer.Deferred[None]"] = None

    def startService(self) -> None:
        """Load the snapshot in the background."""
        super().startService()
        self._running = defer.ensureDeferred(self._run())

    async def _run(self) -> None:
        offset = await self.bootstrap.run()
        status = self.consumer.status
        status.applied_offset = max(status.applied_offset, offset)
        self.consumer.snapshot_loaded.callback(None)

    def stopService(self) -> None:
        """Abandon a bootstrap in progress."""
        super().stopService()
        if self._running is not None:
            self._running.cancel()


def register_gauges(registry: Registry, store: GradeStore, status: ReplicaStatus) -> None:
    """Gauges read from the store and the status at scrape time."""
    registry.gauge("gradesvc_users", "Users in the store.", read=lambda: len(store))
    registry.gauge("gradesvc_ready", "1 when ready.", read=lambda: int(status.ready))
    registry.gauge("gradesvc_broker_connected", "1 while connected.", read=lambda: int(status.connected))
    registry.gauge("gradesvc_applied_offset", "Last stream offset applied.", read=lambda: status.applied_offset)
    registry.gauge(
        "gradesvc_replication_lag_seconds",
        "Age of the newest applied stream write when it was applied.",
        read=lambda: status.lag_seconds,
    )
    registry.gauge("gradesvc_bootstrap_rows_loaded", "Snapshot rows loaded at start.", read=lambda: status.snapshot_rows)
    registry.gauge(
        "gradesvc_bootstrap_seconds", "Seconds from start to ready (0 until ready).",
        read=lambda: status.bootstrap_seconds or 0.0,
    )
    registry.gauge(
        "gradesvc_retention_gap", "1 when the stream lost offsets this replica needed.",
        read=lambda: int(status.gap is not None),
    )


def listen(reactor: Any, description: str, site: server.Site) -> service.Service:
    """A service listening on an endpoint string."""
    return StreamServerEndpointService(endpoints.serverFromString(reactor, description), site)


def makeService(config: Any, reactor: Any = None) -> service.MultiService:
    """Build the replica: broker connection, two web ports, bootstrap."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    replica_id: str = config["replica-id"]
    status = ReplicaStatus()
    store = GradeStore()
    hlc = HybridLogicalClock(reactor.seconds)
    registry = Registry()
    register_gauges(registry, store, status)

    top = service.MultiService()
    broker = BrokerService(reactor, config["amqp-url"], config["stream"], status)
    consumer = StreamConsumer(store, hlc, replica_id, broker, status, registry, time.time, clock=reactor)
    broker.setServiceParent(top)

    backup = BackupResource(store, status, registry, replica_id)
    read_site = make_site(read_root(store, status, registry, replica_id, backup), LimitedRequest,
                          config["access-log"])
    listen(reactor, config["get-endpoint"], read_site).setServiceParent(top)

    setter = SetResource(store, hlc, replica_id, broker, status, registry)
    guarded = BasicAuthResource(
        admin_portal(write_root(setter), config["admin-user"], config["admin-password"])
    )
    write_site = make_site(guarded, LimitedRequest, config["access-log"])
    listen(reactor, config["set-endpoint"], write_site).setServiceParent(top)

    bootstrap = Bootstrap(store, hlc, status, config["peer-list"], clock=reactor,
                          idle_timeout=config["peer-idle-timeout"])
    BootstrapService(bootstrap, consumer).setServiceParent(top)
    log.info("gradesvc replica {replica} starting", replica=replica_id)
    return top
