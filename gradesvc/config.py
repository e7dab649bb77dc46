"""The options of ``twistd gradesvc``, declared once, and the typed configuration they give.

:data:`OPTIONS` is the one table: ``--help``, the environment variables and
:class:`ReplicaConfig` are all made from it (see :mod:`svckit.options`);
defaults that a module also uses (the read wait, the write timeout, the peer
idle timeout) are that module's constants.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import attrs

from gradesvc.api.read import READ_WAIT
from gradesvc.api.write import WRITE_TIMEOUT
from gradesvc.state.bootstrap import IDLE_TIMEOUT
from gradesvc.stream.broker import node_tls, node_urls, stream_port_of
from gradesvc.stream.choice import PROTOCOLS
from svckit.clienttls import ClientTLS
from svckit.options import Option, access_log_destination, access_log_format, endpoint_description, not_empty, positive

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def amqp_urls(value: str) -> str:
    """An ``amqp://`` or ``amqps://`` URL, or a comma-separated list of them (the nodes of a cluster); every
    TLS file named loads now, so a bad one stops the replica at start rather than every connection."""
    urls = node_urls(value)
    if not urls or not all(url.startswith(("amqp://", "amqps://")) for url in urls):
        raise ValueError("must be an amqp:// or amqps:// URL, or a comma-separated list of them")
    for url in urls:
        node = url.split("@")[-1]
        try:
            stream_port_of(url)
        except ValueError:
            raise ValueError(f"{node}: stream_port must be a port number") from None
        try:
            tls = node_tls(url)
            if tls is not None:
                tls[0].check()
        except ValueError as e:
            raise ValueError(f"{node}: {e}") from None
    if len({url.startswith("amqps://") for url in urls}) > 1:
        raise ValueError("mixes amqp:// and amqps:// nodes: a failover would change whether the link is encrypted")
    return value


def stream_protocol(value: str) -> str:
    """``auto``, ``stream`` or ``amqp``."""
    value = value.strip().lower()
    if value not in PROTOCOLS:
        raise ValueError(f"must be one of {', '.join(PROTOCOLS)}")
    return value


def peer_urls(value: str) -> Tuple[str, ...]:
    """Comma-separated base URLs of other replicas' read ports."""
    peers = tuple(p.strip().rstrip("/") for p in value.split(",") if p.strip())
    for peer in peers:
        if not peer.startswith(("http://", "https://")):
            raise ValueError(f"names peer {peer!r}, which is not an http:// or https:// URL")
    return peers


BACKUP_AUTH = ("off", "admin")


def backup_auth(value: str) -> str:
    """``off`` or ``admin``."""
    value = value.strip().lower()
    if value not in BACKUP_AUTH:
        raise ValueError(f"must be one of {', '.join(BACKUP_AUTH)}")
    return value


def ca_file(value: str) -> str:
    """A PEM file of CA certificates that loads now."""
    ClientTLS(value).check()
    return value


def seconds(default: float) -> str:
    """A default number of seconds as it would be typed."""
    return f"{default:g}"


OPTIONS = (
    Option("get-endpoint", "GRADESVC_GET_ENDPOINT", "tcp:8070", "Read port endpoint", endpoint_description),
    Option("set-endpoint", "GRADESVC_SET_ENDPOINT", "tcp:8071", "Write port endpoint", endpoint_description),
    Option("amqp-url", "GRADESVC_AMQP_URL", DEFAULT_AMQP_URL, "Broker URL (or the nodes' URLs, comma-separated)",
           amqp_urls, secret=True),
    Option("stream", "GRADESVC_STREAM", "user_grades", "Stream queue name", not_empty),
    Option("stream-protocol", "GRADESVC_STREAM_PROTOCOL", "auto", "How the stream is read and written: stream"
           " (RabbitMQ's stream protocol, port 5552 or the URL's ?stream_port=N), amqp (AMQP 0.9.1), or auto"
           " (stream when the broker's stream port answers)", stream_protocol),
    Option("replica-id", "GRADESVC_REPLICA_ID", None, "Unique replica id; default the host name", not_empty),
    Option("peers", "GRADESVC_PEERS", "", "Comma-separated base URLs of peers' read ports", peer_urls),
    Option("peer-ca-file", "GRADESVC_PEER_CA_FILE", None, "CA certificates (PEM) that https:// peers must chain"
           " to; default the system's CAs", ca_file),
    Option("backup-auth", "GRADESVC_BACKUP_AUTH", "off", "Who may GET /backup (the whole store): off (anyone who"
           " reaches the read port) or admin (the write port's credentials)", backup_auth),
    Option("peer-auth", "GRADESVC_PEER_AUTH", None, "Credentials this replica sends to peers' /backup: admin (its"
           " write port's) or off; default as --backup-auth", backup_auth),
    Option("admin-user", "GRADESVC_ADMIN_USER", None, "User name for the write port"),
    Option("admin-password", "GRADESVC_ADMIN_PASSWORD", None, "Password for the write port", secret=True),
    Option("access-log", "GRADESVC_ACCESS_LOG", "-", "Access log: - (this log), a file, or off",
           access_log_destination),
    Option("access-log-format", "GRADESVC_ACCESS_LOG_FORMAT", "combined", "Access log format: combined or json",
           access_log_format),
    Option("peer-idle-timeout", "GRADESVC_PEER_IDLE_TIMEOUT", seconds(IDLE_TIMEOUT),
           "Seconds a peer's /backup may send nothing before the next peer is tried", positive),
    Option("write-timeout", "GRADESVC_WRITE_TIMEOUT", seconds(WRITE_TIMEOUT),
           "Seconds POST /set waits for its confirmed message to be applied here before answering 503", positive),
    Option("read-wait", "GRADESVC_READ_WAIT", seconds(READ_WAIT), "Seconds GET /get?min_offset=N waits for offset N",
           positive),
    Option("data-dir", "GRADESVC_DATA_DIR", None, "Directory of this replica's checkpoint, held by one process;"
           " default gradesvc-data/<stream>/<replica-id>", not_empty),
    Option("checkpoint-interval", "GRADESVC_CHECKPOINT_INTERVAL", "30", "Seconds between checkpoints", positive),
)
"""Every option of ``twistd gradesvc``: name, environment variable, default, help, parser."""


@attrs.frozen
class ReplicaConfig:
    """Everything a replica needs to start: :data:`OPTIONS` parsed."""

    get_endpoint: str
    set_endpoint: str
    amqp_url: str = attrs.field(repr=False)
    """May hold the broker's password."""
    stream: str
    stream_protocol: str
    replica_id: str
    peers: Tuple[str, ...]
    peer_ca_file: Optional[str]
    backup_auth: str
    peer_auth: str
    admin_user: str
    admin_password: str = attrs.field(repr=False)
    access_log: str
    access_log_format: str
    peer_idle_timeout: float
    write_timeout: float
    read_wait: float
    data_dir: str
    data_dir_given: bool
    """False when ``data_dir`` is the default (then the previous release's default is looked at too)."""
    checkpoint_interval: float



def default_config(replica_id: str, admin_user: str, admin_password: str, data_dir: str,
                   **changes: Any) -> ReplicaConfig:
    """Every option at its default, with the four that have none given, and ``changes`` by attribute
    (tests, benchmarks)."""
    values: Dict[str, Any] = {o.attribute: o.parse(o.default) for o in OPTIONS if o.default is not None}
    values.update(replica_id=replica_id, admin_user=admin_user, admin_password=admin_password, data_dir=data_dir,
                  data_dir_given=True, peer_ca_file=None, peer_auth=values["backup_auth"])
    values.update(changes)
    return ReplicaConfig(**values)
