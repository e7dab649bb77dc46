"""svckit.sendnow: bytes go out at once on a plain TCP connection, in order, and whatever cannot is queued."""

from __future__ import annotations

import socket
from typing import Iterator, Tuple

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport

from svckit.sendnow import send_now


@pytest.fixture
def connection() -> Iterator[Tuple[tcp.Server, socket.socket, MemoryReactor]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    reactor = MemoryReactor()
    transport = tcp.Server(ours, Protocol(), ("192.0.2.1", 1234), None, 1, reactor)  # type: ignore[arg-type]
    yield transport, theirs, reactor
    ours.close()
    theirs.close()


def received(peer: socket.socket) -> bytes:
    try:
        return peer.recv(1 << 20)
    except BlockingIOError:
        return b""


def test_bytes_leave_at_once_without_the_reactor(connection: Tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    transport, peer, reactor = connection
    send_now(transport, b"HTTP/1.1 200 OK\r\n\r\n")
    assert received(peer) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert transport not in reactor.getWriters()  # no epoll_ctl, no turn of the reactor


def test_bytes_queued_before_go_first(connection: Tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    transport, peer, reactor = connection
    transport.write(b"first ")
    send_now(transport, b"second")
    assert received(peer) == b""  # nothing jumps the queue
    assert transport in reactor.getWriters()
    transport.doWrite()
    assert received(peer) == b"first second"


def test_what_the_socket_does_not_take_is_queued(connection: Tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    transport, peer, reactor = connection
    data = b"x" * (8 << 20)  # more than a socket buffer holds
    send_now(transport, data)
    assert transport in reactor.getWriters()
    got = received(peer)
    assert 0 < len(got) < len(data)
    while len(got) < len(data):
        transport.doWrite()
        got += received(peer)
    assert got == data


def test_a_connection_being_closed_is_left_to_the_transport(
        connection: Tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    transport, peer, _ = connection
    transport.loseConnection()
    send_now(transport, b"late")
    assert received(peer) == b""
    assert b"late" in b"".join(transport._tempDataBuffer)  # written (or dropped) by Twisted's rules, as before


def test_a_peer_gone_raises_nothing(connection: Tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    transport, peer, _ = connection
    peer.close()
    send_now(transport, b"into the void")  # EPIPE/ECONNRESET: the transport's write path reports it later
    assert transport.connected


def test_other_transports_are_written_to_as_before() -> None:
    transport = StringTransport()
    send_now(transport, b"abc")
    assert transport.value() == b"abc"
