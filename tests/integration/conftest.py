"""Fixtures for integration tests: a broker check, a fresh stream, replicas, a backend, a test CA."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable, Iterator, List

import pytest

from harness.backends import Backend
from harness.broker import BROKER_URL, delete_stream, unique_stream
from harness.daemon import assert_no_logged_errors
from harness.databases import create_database, drop_database
from harness.replica import GradeReplica
from tests.integration.certs import CertificateAuthority


@pytest.fixture(scope="session", autouse=True)
def broker_answers() -> None:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=3).close()
    except OSError:
        pytest.fail("no RabbitMQ on 127.0.0.1:5672: run scripts/ensure-broker (scripts/test does)")


@pytest.fixture(params=["sqlite", "postgresql"])
def user_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Where a gateway keeps its users: each test runs on SQLite and on its own PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "users.sqlite3")
        return
    url = create_database()
    yield url
    drop_database(url)


@pytest.fixture(params=["stream", "amqp"])
def stream_protocol(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The protocol the test's replicas speak (``--stream-protocol``): each gradesvc test runs on both."""
    monkeypatch.setenv("GRADESVC_STREAM_PROTOCOL", request.param)
    return str(request.param)


@pytest.fixture
def stream() -> Iterator[str]:
    name = unique_stream()
    yield name
    delete_stream(name, BROKER_URL)


@pytest.fixture
def replicas(tmp_path: Path, stream: str) -> Iterator[Callable[..., GradeReplica]]:
    """A factory of replicas on ``stream``; all are stopped at the end."""
    started: List[GradeReplica] = []

    def make(replica_id: str, peers: List[GradeReplica] = (), **kw: object) -> GradeReplica:  # type: ignore[assignment]
        replica = GradeReplica(tmp_path, kw.pop("stream", stream), replica_id,  # type: ignore[arg-type]
                               [p.read_url for p in peers], **kw)  # type: ignore[arg-type]
        started.append(replica)
        return replica.start()  # type: ignore[return-value]

    yield make
    for replica in started:
        replica.stop()
    assert_no_logged_errors(started)



@pytest.fixture
def backend() -> Iterator[Backend]:
    """One HTTP backend ("one"), stopped at the end."""
    started = Backend("one")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """A certificate authority made for the module's tests."""
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))
