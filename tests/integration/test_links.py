"""Every link to a dependency encrypted and authenticated when asked, against real servers with TLS.

The CA and certificates are made by the test with ``openssl``
(:mod:`tests.integration.certs`); each server is a private one started by the
test on a free port (Redis with ``--tls-port`` and ``requirepass`` or an ACL
user).  Each link is shown working, verified and authenticated; a wrong CA,
a wrong password and cleartext where TLS was asked are each refused with one
line and never served as ready (or, for the buckets, decided by the fallback
as ``--bucket-store-fallback`` says).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

from harness.backends import Backend, servers_file, write_servers
from harness.daemon import TWISTD, assert_no_logged_errors
from harness.gateway import Gateway
from harness.net import basic, http, wait_until
from harness.postgres import PostgresServer
from harness.rabbitcluster import RabbitCluster, rabbitmq_installed
from harness.redis import RedisServer
from harness.replica import GradeReplica
from tests.integration.certs import CertificateAuthority

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("other-ca"))


@pytest.fixture
def servers() -> Iterator[List[RedisServer]]:
    started: List[RedisServer] = []
    yield started
    for server in started:
        server.stop()


def tls_redis(tmp_path: Path, ca: CertificateAuthority, started: List[RedisServer], **kwargs: object) -> RedisServer:
    issued = ca.issue("redis", ["IP:127.0.0.1"])
    server = RedisServer(tmp_path, tls=(ca.cert, issued.cert, issued.key), **kwargs)  # type: ignore[arg-type]
    started.append(server)
    return server.start()


def gateway_on(tmp_path: Path, backend: Backend, buckets: str, **env: str) -> Gateway:
    write_servers(tmp_path / "servers.yaml", [backend])
    gateway = Gateway(tmp_path)
    gateway.env.update({"LBSVC_BUCKETS": buckets, **env})
    return gateway


def limits_of(gateway: Gateway) -> dict:
    return dict(json.loads(http("GET", f"http://127.0.0.1:{gateway.admin_port}/ready")[2])["limits"])


def refusals(gateway: Gateway) -> List[str]:
    return [line for line in gateway.log().splitlines() if "refused this gateway" in line]


def retries_after_refusal(gateway: Gateway) -> int:
    log = gateway.log()
    return log[log.index("refused this gateway"):].count("Scheduling retry")


def test_redis_over_tls_with_an_acl_user_holds_the_buckets(tmp_path: Path, ca: CertificateAuthority,
                                                            servers: List[RedisServer], backend: Backend) -> None:
    redis = tls_redis(tmp_path, ca, servers, password="admin-pw", users=[("gateway", "gw pw/&")])
    url = f"rediss://gateway:gw%20pw%2F%26@127.0.0.1:{redis.port}/0?ssl_ca_certs={ca.cert}"
    (tmp_path / "buckets-url").write_text(url + "\n")
    gateway = gateway_on(tmp_path, backend, "", LBSVC_BUCKETS_FILE=str(tmp_path / "buckets-url"))
    gateway.env.pop("LBSVC_BUCKETS")
    gateway.start().wait_ready()
    try:
        key = gateway.create("tls-user")
        assert gateway.call("GET", "/", key=key)[0] == 200
        assert int(redis.command("DBSIZE", login=True)[1:].strip()) >= 1  # the bucket is in Redis, over TLS only
        limits = limits_of(gateway)
        assert limits["mode"] == "redis" and "refused" not in limits
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert "gw pw" not in gateway.log() and "gw%20pw" not in gateway.log() and "gw%20pw" not in ps
    finally:
        gateway.stop()
    assert_no_logged_errors([gateway])


@pytest.mark.parametrize("fault", ["wrong password", "no password", "wrong CA", "cleartext server"])
def test_a_refused_redis_is_one_line_and_the_fallback(tmp_path: Path, ca: CertificateAuthority,
                                                      other_ca: CertificateAuthority, servers: List[RedisServer],
                                                      backend: Backend, fault: str) -> None:
    if fault == "cleartext server":  # TLS asked of a server that speaks only cleartext
        redis = RedisServer(tmp_path, password="pw")
        servers.append(redis.start())
        url = f"rediss://:pw@127.0.0.1:{redis.port}/0?ssl_ca_certs={ca.cert}"
        expected = "TLS"
    else:
        redis = tls_redis(tmp_path, ca, servers, password="pw")
        trusted = other_ca.cert if fault == "wrong CA" else ca.cert
        login = {"wrong password": ":nope@", "no password": "", "wrong CA": ":pw@"}[fault]
        url = f"rediss://{login}127.0.0.1:{redis.port}/0?ssl_ca_certs={trusted}"
        expected = {"wrong password": "WRONGPASS", "no password": "NOAUTH", "wrong CA": "certificate verify failed"}[
            fault]
    gateway = gateway_on(tmp_path, backend, url).start()
    try:
        gateway.wait_ready()  # the local fallback (the default) keeps the gateway serving
        wait_until(lambda: "refused" in limits_of(gateway), 10, "/ready to name the refusal")
        assert expected in limits_of(gateway)["refused"], limits_of(gateway)
        key = gateway.create("refused-user")
        # Decided by the local share once the outage is confirmed (half a second of silence since the gateway
        # started: until then its share starts empty, as it cannot know whether other gateways reach Redis).
        wait_until(lambda: gateway.call("GET", "/", key=key)[0] == 200, 2, "the local share admitting")
        wait_until(lambda: retries_after_refusal(gateway) >= 3, 20, "three more attempts by the gateway")
        lines = refusals(gateway)
        assert len(lines) == 1 and expected in lines[0], lines  # one line, however many attempts
        assert int(redis.command("DBSIZE", login=True)[1:].strip()) == 0
        assert "pw@" not in gateway.log()
    finally:
        gateway.stop()
    assert_no_logged_errors([gateway])


def test_a_redis_ca_file_that_does_not_load_stops_the_gateway_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "not-a-ca.pem").write_text("hello\n")
    servers_file(tmp_path / "servers.yaml", {"one": "http://127.0.0.1:1"}, {"path": "/health"})
    url = f"rediss://:secret@127.0.0.1:1/0?ssl_ca_certs={tmp_path / 'not-a-ca.pem'}"
    result = subprocess.run([TWISTD, "-n", "lbsvc", "--servers", str(tmp_path / "servers.yaml"), "--buckets", url],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    # (it has stopped: run() returned; twistd of Twisted 25.5, on PyPy, exits 0 after a usage error)
    assert "holds no PEM certificate" in result.stderr + result.stdout and "secret" not in result.stderr


# --- PostgreSQL --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres(ca: CertificateAuthority) -> Iterator[PostgresServer]:
    if shutil.which("runuser") is None and os.geteuid() == 0:
        pytest.skip("runuser is needed to run a private PostgreSQL as root")
    issued = ca.issue("postgres", ["DNS:localhost"])  # reached as 127.0.0.1, a name it does not hold
    server = PostgresServer((issued.cert, issued.key), "db pw").start()
    yield server
    server.stop()


def start_refused(tmp_path: Path, database: str) -> str:
    """The one line a gateway stops with when its user database refuses it."""
    servers_file(tmp_path / "servers.yaml", {"one": "http://127.0.0.1:1"}, {"path": "/health"})
    result = subprocess.run([TWISTD, "-n", "--pidfile=", "lbsvc", "--servers", str(tmp_path / "servers.yaml"),
                             "--database", database], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    # (it has stopped: run() returned; twistd of Twisted 25.5, on PyPy, exits 0 after a usage error)
    lines = [line for line in (result.stdout + result.stderr).splitlines()
             if "cannot open the user database" in line or ": --database " in line]  # (twistd prints --help first)
    assert len(lines) == 1 and "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return lines[0]


def test_postgres_verified_over_tls_and_the_server_sees_only_tls(tmp_path: Path, ca: CertificateAuthority,
                                                                 postgres: PostgresServer, backend: Backend) -> None:
    url = postgres.url(password="db%20pw", host="localhost", sslmode="verify-full", sslrootcert=str(ca.cert))
    (tmp_path / "database-url").write_text(url + "\n")
    write_servers(tmp_path / "servers.yaml", [backend])
    gateway = Gateway(tmp_path)
    gateway.env.pop("LBSVC_DATABASE")
    gateway.env["LBSVC_DATABASE_FILE"] = str(tmp_path / "database-url")
    gateway.start().wait_ready()
    try:
        key = gateway.create("pg-tls-user")
        assert gateway.call("GET", "/", key=key)[0] == 200
        assert postgres.sql("SELECT count(*) FROM users WHERE name = 'pg-tls-user'") == "1"
        over_tcp = postgres.sql("SELECT string_agg(s.ssl::text, ',') FROM pg_stat_ssl s JOIN pg_stat_activity a"
                                " USING (pid) WHERE a.client_addr IS NOT NULL")
        assert over_tcp and set(over_tcp.split(",")) == {"true"}, over_tcp  # every gateway connection is TLS
        assert "db pw" not in gateway.log() and "db%20pw" not in gateway.log()
    finally:
        gateway.stop()
    assert_no_logged_errors([gateway])


def test_postgres_refusals_stop_the_gateway_with_one_line(tmp_path: Path, ca: CertificateAuthority,
                                                          other_ca: CertificateAuthority,
                                                          postgres: PostgresServer) -> None:
    wrong_ca = start_refused(tmp_path, postgres.url(password="db%20pw", sslmode="verify-ca",
                                                    sslrootcert=str(other_ca.cert)))
    assert "certificate verify failed" in wrong_ca
    other_name = start_refused(tmp_path, postgres.url(password="db%20pw", sslmode="verify-full",
                                                      sslrootcert=str(ca.cert)))
    assert "mismatch" in other_name or "match" in other_name, other_name
    wrong_password = start_refused(tmp_path, postgres.url(password="nope", sslmode="require"))
    assert "password authentication failed" in wrong_password and "nope" not in wrong_password
    cleartext = start_refused(tmp_path, "postgresql://postgres@127.0.0.1:5432/postgres?sslmode=require")
    assert "Server refuses SSL" in cleartext  # the shared server speaks no TLS: refused, not downgraded
    for bad, message in [("sslmode=allow", "sslmode must be one of"), ("sslmode=prefer&sslrootcert=x", "need"),
                         ("sslmode=verify-full&sslrootcert=/nonexistent.pem", "cannot read"),
                         ("application_name=x", "not supported")]:
        line = start_refused(tmp_path, f"postgresql://postgres:hunter2@127.0.0.1:1/db?{bad}")
        assert message in line and "hunter2" not in line, line


# --- RabbitMQ ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_broker(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """One private RabbitMQ node with TLS listeners (AMQPS and the stream protocol's) that requires a client
    certificate; its plain listeners stay for the cleartext test."""
    if not rabbitmq_installed():
        pytest.fail("rabbitmq-server is needed for the broker TLS tests")
    files = tmp_path_factory.mktemp("broker-tls")
    issued = ca.issue("rabbit", ["DNS:localhost", "IP:127.0.0.1"])
    for source, name in ((ca.cert, "ca.pem"), (issued.cert, "server.pem"), (issued.key, "server.key")):
        shutil.copy(source, files / name)
    node = RabbitCluster(nodes=1, tls_dir=files, clients="required")
    try:
        node.start()
        yield node
    finally:
        node.stop()


def amqps_url(broker: RabbitCluster, trust: Path, client: object = None, port_offset: int = 200) -> str:
    """The node's AMQPS URL (its stream protocol's TLS port beside it), trusting ``trust``."""
    query = f"stream_port={broker.base_port + port_offset + 100}&cacertfile={trust}"
    if client is not None:
        query += f"&certfile={client.cert}&keyfile={client.key}"  # type: ignore[attr-defined]
    return f"amqps://guest:guest@127.0.0.1:{broker.base_port + port_offset}/%2F?{query}"


@pytest.mark.parametrize("protocol", ["stream", "amqp", "auto"])
def test_replicas_replicate_through_a_broker_over_tls_with_client_certificates(
        tmp_path: Path, ca: CertificateAuthority, tls_broker: RabbitCluster, stream: str, protocol: str) -> None:
    client = ca.issue("replica", ["DNS:replica.example"], usage="clientAuth")
    url = amqps_url(tls_broker, ca.cert, client)
    (tmp_path / "broker-url").write_text(url + "\n")
    env = {"GRADESVC_AMQP_URL_FILE": str(tmp_path / "broker-url"), "GRADESVC_STREAM_PROTOCOL": protocol}
    replicas = [GradeReplica(tmp_path, stream, name, extra_env=env) for name in ("a", "b")]
    for replica in replicas:
        replica.env.pop("GRADESVC_AMQP_URL")
        replica.start()
    try:
        a, b = (replica.wait_ready() for replica in replicas)
        assert a.set({"user_id": "tls-1", "spp": 7})[0] == 200
        wait_until(lambda: b.get("tls-1")[0] == 200, 10, "b to see the write")
        assert b.get("tls-1")[1]["Result"]["spp"] == 7
        assert a.ready()["broker_node"].startswith("amqps://guest:***@127.0.0.1")
        assert a.ready()["stream_protocol"] == ("stream" if protocol == "auto" else protocol)  # auto: it answers
        amqp = tls_broker.ctl(1, "list_connections", "ssl", "peer_cert_subject", "--no-table-headers")
        for line in filter(None, amqp.splitlines()):  # the server's view of AMQP connections: TLS, our certificate
            assert line.startswith("true") and "CN=replica" in line, amqp
        for replica in replicas:
            assert "guest:guest" not in replica.log()
    finally:
        for replica in replicas:
            replica.stop()
    assert_no_logged_errors(replicas)


@pytest.mark.usefixtures("stream_protocol")
@pytest.mark.parametrize("fault", ["wrong CA", "no client certificate", "cleartext port", "certificate names"])
def test_a_broker_link_that_fails_tls_is_one_line_and_never_ready(
        tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority, tls_broker: RabbitCluster,
        stream: str, fault: str) -> None:
    client = ca.issue("replica", ["DNS:replica.example"], usage="clientAuth")
    url = {
        "wrong CA": amqps_url(tls_broker, other_ca.cert, client),
        "no client certificate": amqps_url(tls_broker, ca.cert),
        "cleartext port": amqps_url(tls_broker, ca.cert, client, port_offset=0),  # TLS asked of the plain ports
        "certificate names": amqps_url(tls_broker, ca.cert, client) + "&server_name_indication=elsewhere.example",
    }[fault]
    replica = GradeReplica(tmp_path, stream, "refused", extra_env={"GRADESVC_AMQP_URL": url}).start()
    try:
        def error() -> str:
            assert replica.alive(), replica.log()[-3000:]
            return str(replica.ready().get("broker_error") or "")

        reason = wait_until(error, 20, "/ready to name the broker's refusal")
        assert "TLS" in reason, reason
        log = replica.log()
        wait_until(lambda: replica.log().count("Scheduling retry") >= log.count("Scheduling retry") + 3, 20,
                   "three more attempts")
        assert not replica.ready()["ready"] and replica.set({"user_id": "x", "spp": 1})[0] == 503
        lines = [line for line in replica.log().splitlines() if "Broker connection set-up failed" in line]
        assert len(lines) == 1 and "TLS" in lines[0], lines  # one line, however many attempts
    finally:
        replica.stop()
    assert_no_logged_errors([replica])


# --- gradesvc peers ----------------------------------------------------------------------------------------


def https_get(url: str, ca: CertificateAuthority, credentials: Optional[Tuple[str, str]] = None) -> int:
    headers = basic(*credentials) if credentials else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, context=ca.client_context(), timeout=10) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_a_peer_over_https_with_a_private_ca_and_a_guarded_backup(tmp_path: Path, ca: CertificateAuthority,
                                                                   other_ca: CertificateAuthority,
                                                                   stream: str) -> None:
    issued = ca.issue("peer-a", ["IP:127.0.0.1"])
    a = GradeReplica(tmp_path, stream, "a", extra_env={"GRADESVC_BACKUP_AUTH": "admin"})
    a.env["GRADESVC_GET_ENDPOINT"] = (f"ssl:{a.get_port}:interface=127.0.0.1:privateKey={issued.key}"
                                      f":certKey={issued.cert}")
    a_url = f"https://127.0.0.1:{a.get_port}"
    started = [a.start()]
    try:
        wait_until(lambda: https_get(a_url + "/ready", ca) == 200, 60, "a ready over https")
        assert a.set([{"user_id": f"p{i}", "spp": i} for i in range(50)])[0] == 200
        assert https_get(a_url + "/backup", ca) == 401  # the whole store is not for anyone who reaches the port
        assert https_get(a_url + "/backup", ca, ("admin", "wrong")) == 401
        assert https_get(a_url + "/backup", ca, ("admin", "admin")) == 200
        assert https_get(a_url + "/get?user_id=p1", ca) == 200  # single reads stay open

        def replica(name: str, **env: str) -> GradeReplica:
            started.append(GradeReplica(tmp_path, stream, name, [a_url], extra_env=env).start())
            return started[-1].wait_ready()

        b = replica("b", GRADESVC_PEER_CA_FILE=str(ca.cert), GRADESVC_PEER_AUTH="admin")
        assert b.ready()["snapshot"]["peer"] == a_url and b.ready()["snapshot"]["offset"] >= 0
        assert b.get("p49")[1]["Result"]["spp"] == 49
        c = replica("c", GRADESVC_PEER_CA_FILE=str(other_ca.cert), GRADESVC_PEER_AUTH="admin")
        assert c.ready()["snapshot"]["peer"] is None  # a certificate the CA does not vouch for: not loaded
        assert "certificate verify failed" in c.log()
        d = replica("d", GRADESVC_PEER_CA_FILE=str(ca.cert))
        assert d.ready()["snapshot"]["peer"] is None and "wants credentials for /backup" in d.log()
        for late in (c, d):  # both replayed the stream instead, and converged
            assert late.get("p49")[1]["Result"]["spp"] == 49
        assert "admin:admin" not in b.log() and "YWRtaW46YWRtaW4" not in a.log()
    finally:
        for replica_ in started:
            replica_.stop()
    assert_no_logged_errors(started)
