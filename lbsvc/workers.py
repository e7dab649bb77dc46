"""``--workers N``: N gateway processes sharing one listening socket.

The first process (the parent, the one ``twistd`` started) binds the gateway
port itself, then starts N - 1 workers (``python -m twisted lbsvc``, the same
options) that inherit the socket and adopt it (``adoptStreamPort``): the
kernel hands each new connection to whichever process accepts it first, and
nobody else can bind the port in between (no ``SO_REUSEPORT``, which would let
any process of the same user join).  Each worker is a whole gateway (users,
backends, health checks) whose buckets must be shared, so more than one
worker needs ``--buckets redis://...``.

The parent restarts a worker that dies (after a second), stops them when it
stops, and a worker stops when its parent is gone (it checks its parent
process id every second).  Only the parent serves the admin endpoint; its
``/metrics`` covers every process (:mod:`lbsvc.workermetrics`) and its
``/ready`` says how many run.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Dict, List, Optional, Tuple

from twisted.application import service
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from lbsvc.workermetrics import METRICS_SOCKET, SocketDirectory

log = Logger()

WORKER_FD = "LBSVC_WORKER_FD"
"""Set in a worker's environment: the inherited listening socket's descriptor."""
WORKER_FAMILY = "LBSVC_WORKER_FAMILY"
RESTART_DELAY = 1.0


def tcp_address(description: str) -> Tuple[str, int, int]:
    """``(interface, port, backlog)`` of a ``tcp:PORT[:interface=X][:backlog=N]`` endpoint.

    Workers share a plain TCP socket; other endpoint kinds raise ``ValueError``.
    """
    parts = description.split(":")
    if parts[0] not in ("tcp", "tcp6") or len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"--workers needs a tcp:PORT endpoint, not {description!r}")
    interface = "::" if parts[0] == "tcp6" else "0.0.0.0"
    backlog = 50
    for option in parts[2:]:
        key, _, value = option.partition("=")
        if key == "interface" and value:
            interface = value.replace("\\:", ":")
        elif key == "backlog" and value.isdigit():
            backlog = int(value)
        elif option and not (parts[0] == "tcp6" and "=" not in option):
            raise ValueError(f"--workers cannot share {description!r} (unknown option {option!r})")
    return interface, int(parts[1]), backlog


def bind(description: str) -> socket.socket:
    """Bind and listen on the gateway's TCP endpoint; the socket workers will inherit."""
    interface, port, backlog = tcp_address(description)
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((interface, port))
    sock.listen(backlog)
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


class AdoptedPort(service.Service):
    """Serves ``factory`` on an already listening socket (the parent's own, or inherited)."""

    def __init__(self, reactor: Any, fd: int, family: int, factory: Any) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.factory = factory
        self.port: Optional[IListeningPort] = None

    def startService(self) -> None:
        """Accept connections on the socket."""
        super().startService()
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)

    def stopService(self) -> Optional[defer.Deferred[None]]:
        """Stop accepting (the socket itself stays open for the others)."""
        super().stopService()
        if self.port is None:
            return None
        d: Optional[defer.Deferred[None]] = self.port.stopListening()
        self.port = None
        return d


class _Worker(protocol.ProcessProtocol):
    def __init__(self, pool: Workers, number: int) -> None:
        self.pool = pool
        self.number = number
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.pool.ended(self, reason)


class Workers(service.Service):
    """Starts, restarts and stops the other N - 1 worker processes."""

    def __init__(self, reactor: Any, count: int, fd: int, family: int, argv: List[str],
                 sockets: Optional[SocketDirectory] = None) -> None:
        self.reactor = reactor
        self.sockets = sockets
        """Where each worker serves its metrics to this parent."""
        self.count = count
        self.fd = fd
        self.family = family
        self.argv = argv
        self.workers: Dict[int, Any] = {}
        """Worker number → its process transport."""
        self._protocols: Dict[int, _Worker] = {}
        self._restarts: Dict[int, IDelayedCall] = {}
        self.socket: Optional[socket.socket] = None
        """The shared listening socket, kept open as long as the pool."""

    @property
    def processes(self) -> int:
        """Gateway processes running now, this parent included."""
        return 1 + len(self.workers)

    @property
    def pids(self) -> List[int]:
        """The workers' process ids."""
        return [t.pid for t in self.workers.values() if t.pid is not None]

    def startService(self) -> None:
        """Start every worker."""
        super().startService()
        for number in range(1, self.count):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        env = {**os.environ, WORKER_FD: str(self.fd), WORKER_FAMILY: str(int(self.family))}
        if self.sockets is not None:
            env[METRICS_SOCKET] = self.sockets.socket_for(number)
        worker = _Worker(self, number)
        self._protocols[number] = worker
        self.workers[number] = self.reactor.spawnProcess(
            worker, sys.executable, [sys.executable, "-m", "twisted", "--log-format=text", "lbsvc", *self.argv], env=env,
            childFDs={1: 1, 2: 2, self.fd: self.fd},
        )
        log.info("Started gateway worker {number} (pid {pid})", number=number, pid=self.workers[number].pid)

    def ended(self, worker: _Worker, reason: Failure) -> None:
        """A worker exited: start it again unless the pool is stopping."""
        self.workers.pop(worker.number, None)
        self._protocols.pop(worker.number, None)
        if not self.running:
            return
        log.error("Gateway worker {number} exited ({reason}); starting it again in {delay}s",
                  number=worker.number, reason=reason.getErrorMessage(), delay=RESTART_DELAY)
        self._restarts[worker.number] = self.reactor.callLater(RESTART_DELAY, self._spawn, worker.number)

    def stopService(self) -> defer.Deferred[Any]:
        """Stop every worker (SIGTERM, then SIGKILL after 10 s)."""
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        waits = []
        for number, transport in list(self.workers.items()):
            waits.append(self._protocols[number].ended)
            try:
                transport.signalProcess("TERM")
            except Exception:  # already gone
                continue
            self.reactor.callLater(10, self._kill, transport)
        done: defer.Deferred[Any] = defer.DeferredList(waits)
        return done.addBoth(self._stopped)

    def _stopped(self, result: Any) -> Any:
        if self.sockets is not None:
            self.sockets.remove()
        return result

    def _kill(self, transport: Any) -> None:
        if transport.pid is not None:
            transport.signalProcess("KILL")


def inherited() -> Optional[Tuple[int, int]]:
    """``(fd, family)`` when this process is a worker started by a parent."""
    fd = os.environ.get(WORKER_FD)
    if not fd:
        return None
    return int(fd), int(os.environ.get(WORKER_FAMILY, str(int(socket.AF_INET))))


class ParentWatch(service.Service):
    """Stops a worker whose parent is gone (it was adopted by another process)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.parent_pid = os.getppid()
        self.loop = task.LoopingCall(self.check)
        self.loop.clock = reactor

    def startService(self) -> None:
        """Check every second."""
        super().startService()
        self.loop.start(1.0, now=False)

    def stopService(self) -> None:
        """Stop checking."""
        super().stopService()
        if self.loop.running:
            self.loop.stop()

    def check(self) -> None:
        """One check of the parent process."""
        if os.getppid() != self.parent_pid:
            log.info("The parent gateway process is gone; stopping this worker")
            self.reactor.stop()
