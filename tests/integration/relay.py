"""A TCP relay on loopback that a test can cut, stall and restore.

It stands between a replica and the broker (or any server), so a test can make
a network fault happen exactly when it wants: ``cut()`` drops every connection
and refuses new ones until ``restore()``; ``stall()`` stops forwarding data
towards the client (deliveries, confirms) without closing anything;
``retarget()`` sends new connections to another server (a failover).
"""

from __future__ import annotations

import socket
import threading
from typing import List, Tuple

from harness.net import free_port


class Relay:
    """Forward 127.0.0.1:<port> to ``target``."""

    def __init__(self, target: Tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._connections: List[Tuple[socket.socket, socket.socket]] = []
        self._refusing = False
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, scheme: str = "amqp", path: str = "/%2F", auth: str = "guest:guest@") -> str:
        return f"{scheme}://{auth}127.0.0.1:{self.port}{path}"

    @classmethod
    def to_broker(cls, stream_protocol: str) -> Tuple[Relay, str]:
        """A relay to the shared broker's port for ``stream_protocol`` and the ``--amqp-url`` that uses it."""
        if stream_protocol == "stream":
            relay = cls(("127.0.0.1", 5552))
            return relay, relay.url() + f"?stream_port={relay.port}"
        relay = cls(("127.0.0.1", 5672))
        return relay, relay.url()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._connections.append((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, to_client: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if to_client:
                    self._forwarding.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        self._refusing = True
        with self._lock:
            connections, self._connections = self._connections, []
        for pair in connections:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def restore(self) -> None:
        """Accept connections again and forward everything."""
        self._refusing = False
        self._forwarding.set()

    def retarget(self, target: Tuple[str, int]) -> None:
        """Drop every connection; new ones go to ``target`` (a failover behind one address)."""
        self.target = target
        self.cut()
        self.restore()

    def stall(self) -> None:
        """Hold back all data towards clients (connections stay open)."""
        self._forwarding.clear()

    def close(self) -> None:
        self._closed = True
        self.restore()
        self.cut()
        self._listener.close()
