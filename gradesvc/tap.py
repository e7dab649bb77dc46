"""``twistd gradesvc``: the options; the replica is built by :mod:`gradesvc.build`."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Optional

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from gradesvc.build import build_replica
from gradesvc.config import OPTIONS, ReplicaConfig
from gradesvc.state.datadir import DEFAULT_ROOT, DataDir, DataDirInUse, default_data_dir
from gradesvc.stream.broker import node_urls, stream_id_of, stream_port_of
from svckit.options import EnvOptions
from svckit.reactor import quieten

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
        self.read_secrets()
        if not self["admin-user"] or not self["admin-password"]:
            raise usage.UsageError(
                "the write port needs credentials: set --admin-user and"
                " --admin-password (or GRADESVC_ADMIN_USER and GRADESVC_ADMIN_PASSWORD, or the password in a file:"
                " --admin-password-file, GRADESVC_ADMIN_PASSWORD_FILE)"
            )
        values = self.parsed()
        if values["stream_protocol"] == "stream" and any(stream_port_of(u) is None for u in node_urls(values["amqp_url"])):
            raise usage.UsageError(
                "--stream-protocol stream: an --amqp-url names an AMQP port other than 5672; name its stream"
                " port too (amqp://host:port/vhost?stream_port=N)"
            )
        values["replica_id"] = values["replica_id"] or socket.gethostname()
        values["peer_auth"] = values["peer_auth"] or values["backup_auth"]
        values["data_dir_given"] = values["data_dir"] is not None
        if values["data_dir"] is None:
            values["data_dir"] = default_data_dir(values["stream"], values["replica_id"])
        self.config = ReplicaConfig(**values)


def makeService(options: Options, reactor: Optional[Any] = None) -> service.MultiService:
    """Hold the data directory, build the replica (:func:`gradesvc.build.build_replica`)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
        quieten(reactor)  # twistd's epoll reactor, without a log context per I/O event (svckit.reactor)
    config = options.config
    data_dir = DataDir(Path(config.data_dir), stream_id_of(config.amqp_url, config.stream), config.replica_id,
                       [] if config.data_dir_given else [Path(DEFAULT_ROOT)])
    try:
        data_dir.lock()
    except DataDirInUse as e:
        raise SystemExit(f"gradesvc: {e}") from None
    replica = build_replica(config, reactor, data_dir)
    log.info("gradesvc replica {replica} starting", replica=config.replica_id)
    return replica.service
