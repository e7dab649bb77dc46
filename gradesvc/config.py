"""The typed configuration of one replica, as ``twistd gradesvc`` options give it."""

from __future__ import annotations

from typing import Tuple

import attrs


@attrs.frozen
class ReplicaConfig:
    """Everything a replica needs to start (see the option table in docs/operating.md)."""

    get_endpoint: str
    set_endpoint: str
    amqp_url: str
    stream: str
    replica_id: str
    peers: Tuple[str, ...]
    admin_user: str
    admin_password: str = attrs.field(repr=False)
    access_log: str = "-"
    access_log_format: str = "combined"
    peer_idle_timeout: float = 30.0
    write_timeout: float = 5.0
    data_dir: str = "gradesvc-data"
    data_dir_given: bool = True
    """False when ``data_dir`` is the default (then the previous release's default is looked at too)."""
    checkpoint_interval: float = 30.0
    read_wait: float = 2.0
