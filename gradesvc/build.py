"""One replica's parts, wired from its configuration: the one wiring there is.

:func:`build_replica` makes every part of a replica and the services that
run them: the broker connection, the consumer, bootstrap and checkpoints,
the two web ports.  ``twistd gradesvc`` (:mod:`gradesvc.tap`) locks the data
directory and builds with it; the unit tests build their in-memory replicas
with it too, giving a clock, a wall clock and a broker in memory
(:mod:`gradesvc.testing`), and use its routers without its ports.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import attrs
from prometheus_client import CollectorRegistry
from twisted.application import service
from twisted.internet import task

from gradesvc.api.auth import admin_portal, basic_auth_guard
from gradesvc.api.backup import Backup
from gradesvc.api.read import ReadAPI, read_router
from gradesvc.api.write import WriteAPI, write_router
from gradesvc.config import ReplicaConfig
from gradesvc.state.bootstrap import Bootstrap, BootstrapService
from gradesvc.state.checkpoint import Checkpoints, checkpoint_and_watch
from gradesvc.state.datadir import DataDir
from gradesvc.state.phase import ReplicaStatus
from gradesvc.state.retention import RetentionWatch
from gradesvc.state.store import GradeStore
from gradesvc.status.gauges import checkpoint_gauges, replica_gauges
from gradesvc.status.overview import Overview, PeerWatch
from gradesvc.status.stall import StallWatch
from gradesvc.stream.choice import make_broker
from gradesvc.stream.consumer import StreamConsumer
from gradesvc.stream.progress import StreamProgress
from gradesvc.stream.verification import StreamVerifier
from svckit.accesslog import AccessLog
from svckit.clienttls import ClientTLS
from svckit.metrics import new_registry
from svckit.peerclient import peer_client
from svckit.site import listen
from svckit.supervisor import Supervisor
from svckit.web import Router


@attrs.define
class Replica:
    """Every part of one replica."""

    config: ReplicaConfig
    registry: CollectorRegistry
    status: ReplicaStatus
    store: GradeStore
    broker: Any
    """The broker connection (an :class:`~gradesvc.stream.link.IBroker`)."""
    progress: StreamProgress
    consumer: StreamConsumer
    checkpoints: Checkpoints
    reads: Router
    """The read port's routes (``/get``, ``/backup``, ``/status``, ...)."""
    writes: Router
    """The write port's routes (``/set`` behind Basic auth)."""
    service: service.MultiService
    """What runs it all, ports included (``makeService``'s answer)."""


def build_replica(config: ReplicaConfig, reactor: Any, data_dir: DataDir, broker: Optional[Any] = None,
                  wall: Callable[[], float] = time.time) -> Replica:
    """Wire one replica in ``data_dir``; ``broker`` stands in for the broker connection (by default a real one)."""
    stream = data_dir.stream
    status = ReplicaStatus(replica_id=config.replica_id, stream={"vhost": stream.vhost, "name": stream.name})
    store = GradeStore()
    registry = new_registry()
    replica_gauges(registry, store, status)

    top = service.MultiService()
    data_dir.setServiceParent(top)
    access_log = AccessLog(config.access_log, reactor, config.access_log_format)
    access_log.setServiceParent(top)
    if broker is None:
        broker = make_broker(config.stream_protocol, reactor, config.amqp_url, config.stream, status,
                             config.replica_id)
        broker.setServiceParent(top)
    progress = StreamProgress(status, reactor)
    broker.on_stream_recreated.append(progress.stream_deleted)
    consumer = StreamConsumer(store, config.replica_id, broker, status, progress, registry,
                              wall=wall, clock=reactor)
    verifier = StreamVerifier(broker, config.replica_id, reactor)
    consumer.verifier = verifier

    peers = peer_client(reactor, ClientTLS(config.peer_ca_file))
    guard = basic_auth_guard(admin_portal(config.admin_user, config.admin_password))
    backup = Backup(store, status, stream, consumer.applier.anchor, registry, config.replica_id, wall)
    overview = Overview(config.replica_id, status, registry, [PeerWatch(p, reactor, peers) for p in config.peers],
                        reactor)
    overview.history.setServiceParent(top)
    reads = read_router(ReadAPI(store, status, progress, config.replica_id, config.read_wait), backup, registry,
                        {b"/status": ("status", overview.page), b"/status.json": ("status_json", overview.json)},
                        backup_guard=guard if config.backup_auth == "admin" else None)
    listen(reactor, config.get_endpoint, reads, access_log).setServiceParent(top)
    writes = write_router(WriteAPI(config.replica_id, broker, status, progress, wall, config.write_timeout),
                          guard, registry)
    listen(reactor, config.set_endpoint, writes, access_log).setServiceParent(top)

    credentials = (config.admin_user, config.admin_password) if config.peer_auth == "admin" else None
    bootstrap = Bootstrap(store, status, config.peers, stream, verifier.check, clock=reactor,
                          idle_timeout=config.peer_idle_timeout, http=peers, credentials=credentials)
    consumer.rebootstrap = bootstrap.load
    checkpoints = Checkpoints(store, status, data_dir, consumer.applier.anchor, verifier.check, clock=reactor, wall=wall)
    consumer.state_refused = checkpoints.refuse_current
    BootstrapService(bootstrap, consumer.snapshot_loaded, checkpoints.load).setServiceParent(top)
    watch = RetentionWatch()
    checkpoint_gauges(registry, checkpoints, watch)
    periodic = task.LoopingCall(checkpoint_and_watch(checkpoints, consumer.start.now, watch))
    Supervisor.looping("checkpoints", periodic, config.checkpoint_interval, reactor).setServiceParent(top)
    stalls = task.LoopingCall(StallWatch(status, reactor, wall).check)
    Supervisor.looping("stall watch", stalls, 1.0, reactor).setServiceParent(top)
    return Replica(config, registry, status, store, broker, progress, consumer, checkpoints, reads, writes, top)
