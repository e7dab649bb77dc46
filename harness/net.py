"""Loopback plumbing: free ports, polling with a deadline, plain HTTP calls, a metric read off ``/metrics``.

Every wait here polls a condition with a deadline; nothing sleeps in the hope
that something has happened.
"""

from __future__ import annotations

import base64
import socket
import ssl
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Optional, Set, Tuple

from prometheus_client.parser import text_string_to_metric_families

_HANDED_OUT: Set[int] = set()
"""Ports this process was given already: the kernel may offer a just-closed port again at once (two options of
one daemon were once given the same port)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, and not handed out before by this process."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except (OSError, urllib.error.URLError) as e:
            last_error = e
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")


def http(
    method: str,
    url: str,
    body: Optional[bytes] = None,
    headers: Optional[Dict[str, str]] = None,
    timeout: float = 10.0,
    context: Optional[ssl.SSLContext] = None,
) -> Tuple[int, Dict[str, str], bytes]:
    """One HTTP request; returns status, lower-cased headers and body (errors too).

    ``context`` verifies an ``https`` server (the tests' own CA).
    """
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def receive_until(sock: socket.socket, marker: bytes) -> bytes:
    """What ``sock`` receives until ``marker`` is in it, or until the peer closes."""
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def basic(user: str, password: str) -> Dict[str, str]:
    """An Authorization header for HTTP Basic."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of a daemon's ``/metrics``, parsed as Prometheus text (0 when absent)."""
    text = http("GET", url)[2].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0
