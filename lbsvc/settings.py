"""The typed configuration of a gateway, as ``twistd lbsvc`` options give it."""

from __future__ import annotations

import attrs

from lbsvc.config import ServersConfig


@attrs.frozen
class GatewaySettings:
    """Everything a gateway needs to start (see the option table in docs/operating.md)."""

    endpoint: str
    admin_endpoint: str
    servers_path: str
    servers: ServersConfig
    database: str
    access_log: str = "-"
    access_log_format: str = "combined"
    max_body: int = 64 * 1024 * 1024
    max_capacity: int = 1_000_000_000
    max_rate: float = 1_000_000.0
    buckets: str = "memory"
    """``memory``, or a ``redis://host:port/db`` URL."""
    bucket_store_fallback: str = "local"
    redis_timeout: float = 0.05
    workers: int = 1
