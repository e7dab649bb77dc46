"""TLS both ways with a real gateway: ``https://`` backends verified, and an ``ssl:`` gateway endpoint.

The CA and every certificate are made by the test (:mod:`tests.integration.certs`);
the backends are Python's HTTP server behind ``ssl``, the clients ``urllib``
with the test CA as their only trust.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import yaml

from harness.backends import Backend
from harness.daemon import assert_no_logged_errors
from harness.gateway import Gateway
from harness.net import http, metric, wait_until
from tests.integration.certs import CertificateAuthority

pytestmark = pytest.mark.integration


@pytest.fixture
def backends() -> Iterator[List[Backend]]:
    started: List[Backend] = []
    yield started
    for backend in started:
        backend.stop()


def tls_backend(ca: CertificateAuthority, name: str, alt_names: List[str], started: List[Backend]) -> Backend:
    backend = Backend(name, tls=CertificateAuthority.server_context(ca.issue(name, alt_names)))
    started.append(backend)
    return backend


def write_servers(path: Path, servers: List[Dict[str, Any]]) -> None:
    path.write_text(yaml.safe_dump({
        "health_check": {"path": "/health", "interval": 0.2, "timeout": 0.5, "fall": 1, "rise": 1},
        "servers": servers,
    }, sort_keys=False))


def test_an_https_backend_is_verified_against_its_ca_file_and_its_connections_pooled(
        tmp_path: Path, ca: CertificateAuthority, backends: List[Backend]) -> None:
    backend = tls_backend(ca, "secure", ["IP:127.0.0.1"], backends)
    # A relative ca_file is read from the directory of servers.yaml.
    (tmp_path / "ca.pem").write_bytes(ca.cert.read_bytes())
    write_servers(tmp_path / "servers.yaml", [{"name": "secure", "url": backend.url, "ca_file": "ca.pem"}])
    gateway = Gateway(tmp_path).start().wait_ready()  # type: ignore[attr-defined]
    try:
        key = gateway.create("tls-user")
        for _ in range(4):
            code, headers, body = gateway.call("GET", "/over-tls", key=key)
            assert (code, body) == (200, b"Server secure answer"), body
        proxied = [seen for seen in backend.seen if seen["_path"] == "/over-tls"]
        assert len({seen["_connection"] for seen in proxied}) == 1  # pooled: one TLS connection (one handshake)
        assert len(proxied) == 4 and proxied[-1]["x-forwarded-proto"] == "http"
        admin = f"http://127.0.0.1:{gateway.admin_port}/metrics"
        assert metric(admin, "lbsvc_backend_up", backend="secure") == 1  # the health checks pass over TLS
    finally:
        gateway.stop()
    assert_no_logged_errors([gateway])


def test_a_certificate_for_another_name_is_refused_with_502_and_logged(
        tmp_path: Path, ca: CertificateAuthority, backends: List[Backend]) -> None:
    wrong = tls_backend(ca, "wrong", ["DNS:wrong.example"], backends)  # reached as 127.0.0.1
    right = tls_backend(ca, "right", ["IP:127.0.0.1"], backends)
    write_servers(tmp_path / "servers.yaml", [{"name": "wrong", "url": wrong.url, "ca_file": str(ca.cert)},
                                              {"name": "right", "url": right.url, "ca_file": str(ca.cert)}])
    gateway = Gateway(tmp_path).start().wait_ready()  # type: ignore[attr-defined]
    try:
        admin = f"http://127.0.0.1:{gateway.admin_port}/metrics"
        wait_until(lambda: metric(admin, "lbsvc_backend_up", backend="wrong") == 0, 10, "the health check to fail")
        key = gateway.create("tls-user")
        code, _, body = gateway.call("GET", "/", key=key)
        assert (code, body) == (200, b"Server right answer")
        assert wrong.seen == []  # no request ever reached the impostor
    finally:
        gateway.stop()
    # Only one backend, and it is the impostor: it is still tried (panic threshold), and refused.
    write_servers(tmp_path / "servers.yaml", [{"name": "wrong", "url": wrong.url, "ca_file": str(ca.cert)}])
    alone = Gateway(tmp_path, name="alone").start()
    try:
        wait_until(lambda: http("GET", f"http://127.0.0.1:{alone.admin_port}/health")[0] == 200, 30, "lbsvc up")
        key = alone.create("second-user")  # the same users' database as the first gateway
        code, _, body = alone.call("GET", "/", key=key)
        assert code == 502 and body.startswith(b"Bad gateway\n"), body
        assert wrong.seen == []
        assert "Backend wrong answered badly: TLS failed" in alone.log() and "IPAddressMismatch" in alone.log()
    finally:
        alone.stop()
    assert_no_logged_errors([gateway, alone])


def test_the_gateway_serves_tls_on_an_ssl_endpoint(
        tmp_path: Path, ca: CertificateAuthority, backends: List[Backend]) -> None:
    plain = Backend("plain")
    backends.append(plain)
    write_servers(tmp_path / "servers.yaml", [{"name": "plain", "url": plain.url}])
    issued = ca.issue("gateway", ["DNS:localhost", "IP:127.0.0.1"])
    gateway = Gateway(tmp_path)
    gateway.env["LBSVC_ENDPOINT"] = (f"ssl:{gateway.port}:interface=127.0.0.1"
                                     f":privateKey={issued.key}:certKey={issued.cert}")
    gateway.start().wait_ready()
    try:
        context = ca.client_context()
        url = f"https://localhost:{gateway.port}"
        code, _, body = http("POST", url + "/user/create", json.dumps({"name": "tls-user"}).encode(), context=context)
        assert code == 201, body
        key = json.loads(body)["api_key"]
        code, headers, body = http("GET", url + "/", headers={"Authorization": key}, context=context)
        assert (code, body) == (200, b"Server plain answer")
        assert plain.seen[-1]["x-forwarded-proto"] == "https" and headers["x-request-id"] == plain.seen[-1]["x-request-id"]
        with pytest.raises(Exception) as refused:  # a client that does not trust the test CA
            http("GET", url + "/", headers={"Authorization": key}, context=ssl.create_default_context())
        assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    finally:
        gateway.stop()
    assert_no_logged_errors([gateway])
