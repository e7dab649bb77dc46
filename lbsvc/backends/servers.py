"""``servers.yaml``: which backends, how to balance them, how to check them.

::

    algorithm: round_robin          # or least_connections
    health_check: {path: /ready, interval: 2.0, timeout: 1.0, fall: 2, rise: 1}
    timeouts: {connect: 5.0, response: 30.0, body: 30.0}
    pool_size: 64                   # idle connections kept per backend
    servers:
      - {name: replica-a, url: "http://127.0.0.1:8070"}
      - {name: tls-b, url: "https://b.internal:8443", ca_file: certs/ca.pem}  # see lbsvc.backends.tls

A relative ``ca_file`` is read from the directory of ``servers.yaml``.
Everything is validated when loaded; :class:`ConfigError` says what is wrong.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Set, Tuple
from urllib.parse import urlsplit

import attrs
import yaml

from lbsvc.backends.balancer import BALANCERS
from svckit.clienttls import read_ca_file


class ConfigError(ValueError):
    """``servers.yaml`` is missing, unreadable or invalid."""


@attrs.frozen
class HealthCheck:
    """Active health check settings."""

    path: str = "/health"
    interval: float = 2.0
    timeout: float = 1.0
    fall: int = 2
    rise: int = 1


@attrs.frozen
class Server:
    """One backend."""

    name: str
    url: str
    ca_file: Optional[str] = None
    """An ``https`` backend's CA certificates (PEM); None: the system's CAs."""


@attrs.frozen
class Timeouts:
    """Seconds the gateway waits on a backend; each one passed is a 504 and a passive failure."""

    connect: float = 5.0
    """To open a connection."""
    response: float = 30.0
    """From sending the request to the response's status and headers."""
    body: float = 30.0
    """Between two pieces of the response body (a body that stalls)."""


@attrs.frozen
class Ejection:
    """How long a passive failure keeps a backend out, whatever its health checks say."""

    base: float = 10.0
    """Seconds out after a first failure; the n-th ejection in a row lasts n times this."""
    max: float = 300.0
    """The longest ejection; a failure more than this after the last ejection ended starts again at base."""


@attrs.frozen
class Retries:
    """Sending an idempotent request again, to the next backend, after a failure before any answer byte."""

    tries: int = 2
    """Attempts that send the request, the first included (1: never retry)."""
    timeout: float = 10.0
    """No new attempt starts this many seconds after the first."""
    budget: float = 0.2
    """Requests on a retry at most this share of requests in flight (at least 3), so retries cannot snowball."""


@attrs.frozen
class ServersConfig:
    """The whole file."""

    algorithm: str
    health_check: HealthCheck
    servers: Tuple[Server, ...]
    timeouts: Timeouts = Timeouts()
    pool_size: int = 64
    """Idle (persistent) connections kept per backend."""
    ejection: Ejection = Ejection()
    panic_threshold: float = 0.5
    """Below this share of healthy backends, balance over all of them (0: never)."""
    retries: Retries = Retries()


def _number(section: str, key: str, value: Any, minimum: float, integer: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < minimum:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{section}.{key} must be {what} >= {minimum}, not {value!r}")
    return value


def parse(document: Any, base_dir: str = ".") -> ServersConfig:
    """Validate a loaded YAML document (relative ``ca_file`` paths are under ``base_dir``)."""
    if not isinstance(document, dict):
        raise ConfigError("servers.yaml must be a mapping")
    unknown = set(document) - {"algorithm", "health_check", "servers", "timeouts", "upstream_timeout",
                            "pool_size", "ejection", "panic_threshold", "retries"}
    if unknown:
        raise ConfigError(f"unknown key(s): {', '.join(sorted(unknown))}")
    algorithm = document.get("algorithm", "round_robin")
    if algorithm not in BALANCERS:
        raise ConfigError(f"unknown algorithm {algorithm!r}; known: {', '.join(sorted(BALANCERS))}")
    hc: Dict[str, Any] = document.get("health_check") or {}
    if not isinstance(hc, dict):
        raise ConfigError("health_check must be a mapping")
    unknown = set(hc) - {"path", "interval", "timeout", "fall", "rise"}
    if unknown:
        raise ConfigError(f"unknown health_check key(s): {', '.join(sorted(unknown))}")
    default = HealthCheck()
    path = hc.get("path", default.path)
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError(f"health_check.path must start with /, not {path!r}")
    health = HealthCheck(
        path=path,
        interval=_number("health_check", "interval", hc.get("interval", default.interval), 0.05),
        timeout=_number("health_check", "timeout", hc.get("timeout", default.timeout), 0.01),
        fall=_number("health_check", "fall", hc.get("fall", default.fall), 1, integer=True),
        rise=_number("health_check", "rise", hc.get("rise", default.rise), 1, integer=True),
    )
    servers = document.get("servers")
    if not isinstance(servers, list) or not servers:
        raise ConfigError("servers must be a non-empty list")
    seen: Set[str] = set()
    parsed: List[Server] = []
    for i, entry in enumerate(servers):
        if not isinstance(entry, dict) or set(entry) - {"name", "url", "ca_file"}:
            raise ConfigError(f"servers[{i}] must be a mapping with name, url and (for https) ca_file")
        name, url = entry.get("name"), entry.get("url")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"servers[{i}].name must be a non-empty string")
        if name in seen:
            raise ConfigError(f"duplicate server name {name!r}")
        seen.add(name)
        if not isinstance(url, str):
            raise ConfigError(f"servers[{i}].url must be an http(s) URL, not {url!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"servers[{i}].url must be an http:// or https:// URL, not {url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
            raise ConfigError(f"servers[{i}].url must be http(s)://host[:port] only, not {url!r}")
        try:
            _ = parts.port
        except ValueError:
            raise ConfigError(f"servers[{i}].url has a bad port: {url!r}") from None
        parsed.append(Server(name, url.rstrip("/"), _ca_file(i, parts.scheme, entry.get("ca_file"), base_dir)))
    pool_size = document.get("pool_size", 64)
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or not 0 <= pool_size <= 10_000:
        raise ConfigError(f"pool_size must be an integer from 0 to 10000, not {pool_size!r}")
    panic = document.get("panic_threshold", 0.5)
    if isinstance(panic, bool) or not isinstance(panic, (int, float)) or not 0 <= panic <= 1:
        raise ConfigError(f"panic_threshold must be a number from 0 to 1, not {panic!r}")
    return ServersConfig(algorithm, health, tuple(parsed), _timeouts(document), pool_size,
                         _ejection(document), float(panic), _retries(document))


def _ca_file(i: int, scheme: str, value: Any, base_dir: str) -> Optional[str]:
    """A backend's ``ca_file``: only for https, a PEM file whose certificates load."""
    if value is None:
        return None
    if scheme != "https":
        raise ConfigError(f"servers[{i}].ca_file is for https:// backends only")
    if not isinstance(value, str) or not value:
        raise ConfigError(f"servers[{i}].ca_file must be a file path, not {value!r}")
    path = os.path.normpath(os.path.join(base_dir, value))
    try:
        read_ca_file(path)
    except ValueError as e:
        raise ConfigError(f"servers[{i}].ca_file: {e}") from None
    return path


def _section(document: Dict[str, Any], name: str, keys: Set[str]) -> Dict[str, Any]:
    """The mapping under ``name`` (empty when absent), refusing keys other than ``keys``."""
    section: Any = document.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{name} must be a mapping")
    unknown = set(section) - keys
    if unknown:
        raise ConfigError(f"unknown {name} key(s): {', '.join(sorted(unknown))}")
    return section


def _retries(document: Dict[str, Any]) -> Retries:
    """``retries: {tries, timeout, budget}``."""
    section = _section(document, "retries", {"tries", "timeout", "budget"})
    default = Retries()
    tries = _number("retries", "tries", section.get("tries", default.tries), 1, integer=True)
    if tries > 10:
        raise ConfigError("retries.tries must be at most 10")
    budget = float(_number("retries", "budget", section.get("budget", default.budget), 0.0))
    if budget > 1:
        raise ConfigError("retries.budget must be a share from 0 to 1")
    return Retries(tries, float(_number("retries", "timeout", section.get("timeout", default.timeout), 0.01)),
                   budget)


def _ejection(document: Dict[str, Any]) -> Ejection:
    """``ejection: {base, max}`` in seconds."""
    section = _section(document, "ejection", {"base", "max"})
    default = Ejection()
    base = float(_number("ejection", "base", section.get("base", default.base), 0.0))
    longest = float(_number("ejection", "max", section.get("max", default.max), 0.0))
    if longest < base:
        raise ConfigError("ejection.max must not be below ejection.base")
    return Ejection(base, longest)


def _timeouts(document: Dict[str, Any]) -> Timeouts:
    """``timeouts: {connect, response, body}``; ``upstream_timeout`` is still read as ``response``."""
    section = _section(document, "timeouts", {"connect", "response", "body"})
    default = Timeouts()
    response = section.get("response", document.get("upstream_timeout", default.response))
    return Timeouts(
        connect=float(_number("timeouts", "connect", section.get("connect", default.connect), 0.01)),
        response=float(_number("timeouts", "response", response, 0.01)),
        body=float(_number("timeouts", "body", section.get("body", default.body), 0.01)),
    )


def load(path: str) -> ServersConfig:
    """Read and validate ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    try:
        return parse(document, os.path.dirname(os.path.abspath(path)))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
