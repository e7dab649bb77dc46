"""The options of ``twistd lbsvc``, declared once, and the typed settings they give.

:data:`OPTIONS` is the one table: ``--help``, the environment variables and
:class:`GatewaySettings` are all made from it (see :mod:`svckit.options`).
"""

from __future__ import annotations

from typing import Any

import attrs

from lbsvc.backends.servers import ServersConfig
from lbsvc.limits.redisbuckets import FALLBACKS
from lbsvc.limits.redislink import parse_redis_url
from lbsvc.users.api import MAX_CAPACITY, MAX_RATE, MIN_RATE, parse_capacity, parse_rate
from lbsvc.users.postgres import tls_context
from svckit.options import Option, access_log_destination, access_log_format, endpoint_description, not_empty, positive, whole
from svckit.responses import HTTPError

MAX_BODY = 64 * 1024 * 1024
"""The largest request body proxied by default."""
MAX_WORKERS = 256


def _ceiling(parse: Any, kind: Any) -> Any:
    def checked(value: str) -> Any:
        try:
            return parse(kind(value))
        except (HTTPError, ValueError) as e:
            raise ValueError(f"is wrong: {e}") from None

    return checked


def _buckets(value: str) -> str:
    if value != "memory":
        try:
            address = parse_redis_url(value)
            if address.tls is not None:
                address.tls.check()  # a CA file that does not load stops the gateway here, not every connect
        except ValueError as e:
            raise ValueError(f"must be memory, redis://... or rediss://...: {e}") from None
    return value


def _database(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if value.startswith(("postgresql://", "postgres://")):
        tls_context(value)  # what the URL asks of TLS can be honoured, and its files load
    return value


def _fallback(value: str) -> str:
    if value not in FALLBACKS:
        raise ValueError(f"must be one of {', '.join(FALLBACKS)}")
    return value


def _lease_length(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not (seconds == 0 or 0.5 <= seconds <= 60):
        raise ValueError("must be 0 (every decision in Redis) or from 0.5 to 60 seconds")
    return seconds


OPTIONS = (
    Option("endpoint", "LBSVC_ENDPOINT", "tcp:8080", "Gateway endpoint", endpoint_description),
    Option("servers", "LBSVC_SERVERS", "servers.yaml", "Backends file", not_empty),
    Option("database", "LBSVC_DATABASE", "lbsvc.sqlite3",
           "Users: a SQLite file, or postgresql://user:password@host:port/db[?sslmode=verify-full&sslrootcert=FILE]",
           _database, secret=True),
    Option("admin-endpoint", "LBSVC_ADMIN_ENDPOINT", "tcp:8079:interface=127.0.0.1",
           "Endpoint of the gateway's own /health, /ready, /metrics, /status", endpoint_description),
    Option("access-log", "LBSVC_ACCESS_LOG", "-", "Access log: - (this log), a file, or off",
           access_log_destination),
    Option("access-log-format", "LBSVC_ACCESS_LOG_FORMAT", "combined", "Access log format: combined or json",
           access_log_format),
    Option("max-body", "LBSVC_MAX_BODY", str(MAX_BODY), "Largest request body proxied, bytes", whole(0, 2**62)),
    Option("max-capacity", "LBSVC_MAX_CAPACITY", str(MAX_CAPACITY), "Highest capacity a user may set",
           _ceiling(parse_capacity, int)),
    Option("max-rate", "LBSVC_MAX_RATE", str(MAX_RATE), f"Highest rate_per_sec a user may set ({MIN_RATE} ...)",
           _ceiling(parse_rate, float)),
    Option("buckets", "LBSVC_BUCKETS", "memory", "Token buckets: memory (this process) or"
           " redis[s]://[[user]:password@]host:port/db[?ssl_ca_certs=FILE] (shared)", _buckets, secret=True),
    Option("bucket-store-fallback", "LBSVC_BUCKET_STORE_FALLBACK", "local",
           "While Redis is unreachable: local (each process its share of every budget) or deny (503)", _fallback),
    Option("redis-timeout", "LBSVC_REDIS_TIMEOUT", "0.05", "Seconds a Redis call may take", positive),
    Option("lease-length", "LBSVC_LEASE_LENGTH", "2", "Seconds a block of a user's Redis tokens is leased to"
           " this process for (0: no leases, Redis decides every request)", _lease_length),
    Option("workers", "LBSVC_WORKERS", "1", "Gateway processes sharing the port (more than 1 needs Redis)",
           whole(1, MAX_WORKERS)),
)
"""Every option of ``twistd lbsvc``: name, environment variable, default, help, parser."""


@attrs.frozen
class GatewaySettings:
    """Everything a gateway needs to start: :data:`OPTIONS` parsed, and ``servers.yaml`` loaded."""

    endpoint: str
    admin_endpoint: str
    servers_path: str
    servers: ServersConfig
    database: str = attrs.field(repr=False)
    access_log: str
    access_log_format: str
    max_body: int
    max_capacity: int
    max_rate: float
    buckets: str = attrs.field(repr=False)
    """``memory``, or a ``redis://`` or ``rediss://`` URL (which may hold a password)."""
    bucket_store_fallback: str
    redis_timeout: float
    lease_length: float
    """Seconds a block of Redis tokens is leased for; 0: Redis decides every request."""
    workers: int


def default_settings(servers: ServersConfig, servers_path: str = "servers.yaml", **changes: Any) -> GatewaySettings:
    """Every option at its default, with ``servers`` as loaded and ``changes`` by attribute (tests, benchmarks)."""
    values = {o.attribute: o.parse(o.default) for o in OPTIONS if o.name != "servers" and o.default is not None}
    values.update(changes)
    return GatewaySettings(servers_path=servers_path, servers=servers, **values)
