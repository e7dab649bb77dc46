"""``twistd lbsvc``: the options; the gateway is built by :mod:`lbsvc.build` and listens by :mod:`lbsvc.ports`."""

from __future__ import annotations

from typing import Any, Optional

from twisted.application import service
from twisted.python import usage

from lbsvc.backends import servers as servers_config
from lbsvc.build import build_gateway
from lbsvc.ports import open_ports
from lbsvc.settings import OPTIONS, GatewaySettings
from lbsvc.users import open_database
from lbsvc.users.database import StorageUnavailable
from svckit.options import EnvOptions
from svckit.reactor import quieten


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
    """Open the user database, build the gateway (:func:`lbsvc.build.build_gateway`), open its ports."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
        quieten(reactor)  # twistd's epoll reactor, without a log context per I/O event (svckit.reactor)
    database = open_database(options.settings.database)
    try:
        database.check()
    except StorageUnavailable as e:
        raise SystemExit(f"lbsvc: {e}") from None
    gateway = build_gateway(options.settings, reactor, database)
    open_ports(gateway, options.argv())
    return gateway.service
