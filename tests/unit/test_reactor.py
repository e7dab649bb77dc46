"""svckit.reactor: the epoll reactor without a log context per I/O event handles the same events."""

from __future__ import annotations

import socket
from typing import Any, List

from twisted.internet import protocol
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.testing import MemoryReactorClock

from svckit.reactor import QuietEPollReactor, quieten
from tests.conftest import LoggedErrors


def test_only_a_plain_epoll_reactor_is_quietened_in_place() -> None:
    reactor = EPollReactor()
    try:
        quieten(reactor)
        assert type(reactor) is QuietEPollReactor and reactor.doIteration == reactor.doPoll
    finally:
        reactor._poller.close()
    memory = MemoryReactorClock()
    quieten(memory)
    assert type(memory) is MemoryReactorClock


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Client(protocol.Protocol):
    def __init__(self, reactor: Any, rounds: int) -> None:
        self.reactor, self.rounds = reactor, rounds
        self.got: List[bytes] = []

    def connectionMade(self) -> None:
        self.transport.write(b"0")

    def dataReceived(self, data: bytes) -> None:
        self.got.append(data)
        if len(self.got) == self.rounds:
            self.transport.loseConnection()
            self.reactor.stop()
        else:
            self.transport.write(str(len(self.got)).encode())


def test_a_tcp_exchange_runs_on_it() -> None:
    reactor = EPollReactor()
    quieten(reactor)
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    client = Client(reactor, 50)
    protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port.getHost().port)
    reactor.callLater(10, reactor.stop)  # a guard: the exchange takes milliseconds
    reactor.run(installSignalHandlers=False)
    assert b"".join(client.got) == b"".join(str(n).encode() for n in range(50))


class Broken:
    """A reader whose disconnection raises: the error escapes ``_doReadOrWrite``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "broken"

    def doRead(self) -> Any:
        return CONNECTION_DONE

    def connectionLost(self, reason: Any) -> None:
        raise ZeroDivisionError("connectionLost broke")


def test_an_error_escaping_an_event_is_logged_and_polling_goes_on(logged_errors: LoggedErrors) -> None:
    reactor = EPollReactor()
    quieten(reactor)
    left, right = socket.socketpair()
    try:
        broken = Broken(left.fileno())
        reactor.addReader(broken)
        right.send(b"x")
        reactor.doPoll(1.0)
        assert len(logged_errors.flush(ZeroDivisionError)) == 1
        reactor.removeReader(broken)
        reactor.doPoll(0)  # nothing left to handle, nothing raised
    finally:
        left.close()
        right.close()
        reactor._poller.close()
