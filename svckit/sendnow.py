"""Writing to a TCP connection at once, as asyncio does, instead of a reactor turn later.

Twisted's ``transport.write`` appends to a buffer and asks the reactor to
watch the socket for writability; on its next turn the reactor sends the
buffer and stops watching. For a proxied request that is, twice (the request
to the backend, the answer to the client), two ``epoll_ctl`` calls, one more
event out of ``epoll_wait`` and Twisted's write path in Python, to send a few
hundred bytes the socket would have taken at once.

:func:`send_now` sends straight away when nothing is queued before the data
(so the order of bytes is kept) on a plain TCP connection, and hands
whatever the socket did not take (or anything on any other transport: TLS,
a test's ``StringTransport``) to ``transport.write`` as before. Errors are
left to Twisted too: a send that fails is retried by the transport, whose
write path closes the connection as it always did.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp

__all__ = ["send_now"]

_PLAIN = (tcp.Server, tcp.Client)


def send_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``: sent now if it can be, else queued as ``transport.write`` does."""
    if (type(transport) in _PLAIN and transport.connected and not transport.disconnecting
            and not transport.dataBuffer and not getattr(transport, "_tempDataBuffer", True)
            and not getattr(transport, "_writeDisconnected", True) and not getattr(transport, "TLS", False)):
        sock: socket.socket = transport.socket
        try:
            sent = sock.send(data)
        except OSError:  # would block, or the connection failed: the transport's own write path deals with it
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
