"""``twistd gradesvc``: the options, and the wiring of one replica's services."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, Optional, Tuple

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger
from twisted.python import usage

from gradesvc.auth import admin_portal, basic_auth_guard
from gradesvc.backup import Backup
from gradesvc.bootstrap import Bootstrap, BootstrapService
from gradesvc.broker import BrokerService, node_urls, stream_id_of
from gradesvc.checkpoint import Checkpoints, checkpoint_and_watch
from gradesvc.config import ReplicaConfig
from gradesvc.datadir import DEFAULT_ROOT, DataDir, DataDirInUse, default_data_dir
from gradesvc.gauges import checkpoint_gauges, replica_gauges
from gradesvc.overview import Overview, PeerWatch
from gradesvc.progress import StreamProgress
from gradesvc.readapi import ReadAPI, read_router
from gradesvc.replication import StreamConsumer
from gradesvc.retention import RetentionWatch
from gradesvc.stall import StallWatch
from gradesvc.status import ReplicaStatus
from gradesvc.storage import GradeStore
from gradesvc.verification import StreamVerifier
from gradesvc.writeapi import WriteAPI, write_router
from svckit.accesslog import AccessLog
from svckit.metrics import new_registry
from svckit.options import EnvOptions, access_log_destination, access_log_format, endpoint_description, positive_float
from svckit.site import listen
from svckit.supervisor import Supervisor

log = Logger()


def parse_peers(value: str) -> Tuple[str, ...]:
    """Comma-separated base URLs of other replicas' read ports."""
    peers = tuple(p.strip().rstrip("/") for p in value.split(",") if p.strip())
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
        ["access-log-format", None, "combined", "Access log format: combined or json [GRADESVC_ACCESS_LOG_FORMAT]."],
        ["peer-idle-timeout", None, "30", ("Seconds a peer's /backup may send nothing before the next"
         " peer is tried [GRADESVC_PEER_IDLE_TIMEOUT].")],
        ["write-timeout", None, "5", ("Seconds POST /set waits for its confirmed message to be applied"
         " here before answering 503 [GRADESVC_WRITE_TIMEOUT].")],
        ["read-wait", None, "2", ("Seconds GET /get?min_offset=N waits for offset N"
         " [GRADESVC_READ_WAIT].")],
        ["data-dir", None, None, ("Directory of this replica's checkpoint, held by one process;"
         " default gradesvc-data/<stream>/<replica-id> [GRADESVC_DATA_DIR].")],
        ["checkpoint-interval", None, "30", "Seconds between checkpoints [GRADESVC_CHECKPOINT_INTERVAL]."],
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
        "access-log-format": "GRADESVC_ACCESS_LOG_FORMAT",
        "peer-idle-timeout": "GRADESVC_PEER_IDLE_TIMEOUT",
        "write-timeout": "GRADESVC_WRITE_TIMEOUT",
        "read-wait": "GRADESVC_READ_WAIT",
        "data-dir": "GRADESVC_DATA_DIR",
        "checkpoint-interval": "GRADESVC_CHECKPOINT_INTERVAL",
    }
    config: ReplicaConfig

    def postOptions(self) -> None:
        """Validate everything into a :class:`ReplicaConfig`."""
        if not self["admin-user"] or not self["admin-password"]:
            raise usage.UsageError(
                "the write port needs credentials: set --admin-user and"
                " --admin-password (or GRADESVC_ADMIN_USER and GRADESVC_ADMIN_PASSWORD)"
            )
        urls = node_urls(self["amqp-url"])
        if not urls or not all(url.startswith(("amqp://", "amqps://")) for url in urls):
            raise usage.UsageError("--amqp-url must be an amqp:// URL, or a comma-separated list of them")
        if not self["stream"]:
            raise usage.UsageError("--stream must not be empty")
        if self["data-dir"] == "":
            raise usage.UsageError("--data-dir must not be empty")
        replica_id = self["replica-id"] or socket.gethostname()
        self.config = ReplicaConfig(
            get_endpoint=endpoint_description(self["get-endpoint"]),
            set_endpoint=endpoint_description(self["set-endpoint"]),
            amqp_url=self["amqp-url"],
            stream=self["stream"],
            replica_id=replica_id,
            peers=parse_peers(self["peers"] or ""),
            admin_user=self["admin-user"],
            admin_password=self["admin-password"],
            access_log=access_log_destination(self["access-log"]),
            access_log_format=access_log_format(self["access-log-format"]),
            peer_idle_timeout=positive_float("--peer-idle-timeout", str(self["peer-idle-timeout"])),
            write_timeout=positive_float("--write-timeout", str(self["write-timeout"])),
            read_wait=positive_float("--read-wait", str(self["read-wait"])),
            data_dir=self["data-dir"] or default_data_dir(self["stream"], replica_id),
            data_dir_given=bool(self["data-dir"]),
            checkpoint_interval=positive_float("--checkpoint-interval", str(self["checkpoint-interval"])),
        )


def makeService(options: Options, reactor: Optional[Any] = None) -> service.MultiService:
    """Wire one replica: broker connection, consumer, bootstrap, two web ports."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    config = options.config
    wall = time.time
    stream = stream_id_of(config.amqp_url, config.stream)
    data_dir = DataDir(Path(config.data_dir), stream, config.replica_id,
                       [] if config.data_dir_given else [Path(DEFAULT_ROOT)])
    try:
        data_dir.lock()
    except DataDirInUse as e:
        raise SystemExit(f"gradesvc: {e}") from None
    status = ReplicaStatus(stream={"vhost": stream.vhost, "name": stream.name})
    store = GradeStore()
    registry = new_registry()
    replica_gauges(registry, store, status)

    top = service.MultiService()
    data_dir.setServiceParent(top)
    access_log = AccessLog(config.access_log, reactor, config.access_log_format)
    access_log.setServiceParent(top)
    broker = BrokerService(reactor, config.amqp_url, config.stream, status)
    broker.setServiceParent(top)
    progress = StreamProgress(status, reactor)
    consumer = StreamConsumer(store, config.replica_id, broker, status, progress, registry,
                              wall=wall, clock=reactor)
    verifier = StreamVerifier(broker, config.replica_id, reactor)
    consumer.verifier = verifier

    backup = Backup(store, status, stream, consumer.anchor, registry, config.replica_id, wall)
    overview = Overview(config.replica_id, status, registry, [PeerWatch(p, reactor) for p in config.peers], reactor)
    overview.history.setServiceParent(top)
    reads = read_router(ReadAPI(store, status, progress, config.replica_id, config.read_wait), backup, registry,
                        {b"/status": ("status", overview.page), b"/status.json": ("status_json", overview.json)})
    listen(reactor, config.get_endpoint, reads, access_log).setServiceParent(top)
    writes = WriteAPI(config.replica_id, broker, status, progress, wall, config.write_timeout)
    guard = basic_auth_guard(admin_portal(config.admin_user, config.admin_password))
    listen(reactor, config.set_endpoint, write_router(writes, guard, registry), access_log).setServiceParent(top)

    bootstrap = Bootstrap(store, status, config.peers, stream, verifier.check, clock=reactor,
                          idle_timeout=config.peer_idle_timeout)
    consumer.rebootstrap = bootstrap.load
    checkpoints = Checkpoints(store, status, data_dir, consumer.anchor, verifier.check, clock=reactor, wall=wall)
    consumer.state_refused = checkpoints.refuse_current
    BootstrapService(bootstrap, consumer.snapshot_loaded, checkpoints.load).setServiceParent(top)
    watch = RetentionWatch()
    checkpoint_gauges(registry, checkpoints, watch)
    periodic = task.LoopingCall(checkpoint_and_watch(checkpoints, consumer.stream_start, watch))
    Supervisor.looping("checkpoints", periodic, config.checkpoint_interval, reactor).setServiceParent(top)
    stalls = task.LoopingCall(StallWatch(status, reactor, wall).check)
    Supervisor.looping("stall watch", stalls, 1.0, reactor).setServiceParent(top)
    log.info("gradesvc replica {replica} starting", replica=config.replica_id)
    return top
