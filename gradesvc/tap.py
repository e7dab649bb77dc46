"""``twistd gradesvc``: the options, and the wiring of one replica's services."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, Optional

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger
from twisted.python import usage

from gradesvc.auth import admin_portal, basic_auth_guard
from gradesvc.backup import Backup
from gradesvc.bootstrap import Bootstrap, BootstrapService
from gradesvc.broker import BrokerService, stream_id_of
from gradesvc.checkpoint import Checkpoints, checkpoint_and_watch
from gradesvc.config import OPTIONS, ReplicaConfig
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
from svckit.options import EnvOptions
from svckit.site import listen
from svckit.supervisor import Supervisor

log = Logger()


class Options(EnvOptions):
    """Command line of ``twistd gradesvc``: :data:`gradesvc.config.OPTIONS`, each with an environment variable."""

    synopsis = "[options]"
    longdesc = (
        "A replica of the grade store. Every option can also be set through the"
        " environment variable named in brackets; the command line wins."
    )
    table = OPTIONS
    config: ReplicaConfig

    def postOptions(self) -> None:
        """Parse every option into a :class:`ReplicaConfig`."""
        if not self["admin-user"] or not self["admin-password"]:
            raise usage.UsageError(
                "the write port needs credentials: set --admin-user and"
                " --admin-password (or GRADESVC_ADMIN_USER and GRADESVC_ADMIN_PASSWORD)"
            )
        values = self.parsed()
        values["replica_id"] = values["replica_id"] or socket.gethostname()
        values["data_dir_given"] = values["data_dir"] is not None
        if values["data_dir"] is None:
            values["data_dir"] = default_data_dir(values["stream"], values["replica_id"])
        self.config = ReplicaConfig(**values)


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
