"""The upstream HTTP/1.1 client: pooled, persistent connections to backends.

``twisted.web.client.Agent`` is general (proxies, TLS, redirects, a
``Headers`` object and a ``Response`` per request, an endpoint per request);
a gateway needs none of that and pays for all of it on every request.  This
module is the small client the gateway uses instead:

* :class:`UpstreamPool` keeps up to ``pool_size`` idle connections per
  backend and hands them out most recently used first; a new connection sets
  ``TCP_NODELAY`` once, when it is made.
* :class:`UpstreamConnection` writes a request head built by the caller as one
  ``bytes``, streams a body from an ``IBodyProducer`` (``Content-Length`` or
  chunked) with back-pressure, and parses the response: status line, headers
  (a list of raw ``(name, value)`` pairs), then a body framed by
  ``Content-Length``, chunked encoding or the end of the connection.
  Interim ``1xx`` responses are skipped; ``HEAD``, ``204`` and ``304`` have no
  body.  The head and the body pieces go to an :class:`IResponseSink` as they
  are parsed; nothing is buffered beyond one partial line.

Errors say whose fault they are: :class:`ConnectFailed` (nothing was sent, the
next backend may be tried), :class:`StaleConnection` (a reused idle connection
closed before answering), :class:`BadResponse` (malformed, or cut off).
Pipelining is not used: one request at a time per connection.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Dict, List, Optional, Tuple

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, endpoints
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import Interface

from lbsvc.balancer import Backend
from lbsvc.tls import BackendTLS

log = Logger()

MAX_HEAD = 64 * 1024
"""The largest response head accepted (status line and headers)."""
MAX_LINE = 4096
"""The longest chunk-size or trailer line accepted."""

Header = Tuple[bytes, bytes]
Key = Tuple[bytes, bytes, int, Optional[str]]
"""Where a pooled connection goes: scheme, host, port and (https) CA file."""
_CLOSED = Failure(ConnectionDone())


class UpstreamError(Exception):
    """A request to a backend failed."""


class ConnectFailed(UpstreamError):
    """No connection could be made; nothing was sent."""


class StaleConnection(UpstreamError):
    """A reused connection closed before any of the response arrived."""


class BadResponse(UpstreamError):
    """The backend's response was malformed or cut off."""


class IResponseSink(Interface):
    """Where a response goes as it is parsed."""

    def head(code: int, phrase: bytes, headers: List[Header], length: Optional[int], body: bool) -> None:
        """Status and headers; ``length`` is the declared ``Content-Length`` (None
        without one); ``body`` whether a body follows (not after ``HEAD``, 204, 304)."""

    def data(chunk: bytes) -> None:
        """A piece of the body."""


class _ChunkedWriter:
    """Writes a body of unknown length with chunked transfer coding."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def write(self, data: bytes) -> None:
        if data:
            self.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()


# Parser states.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(8)


class UpstreamConnection(Protocol):
    """One persistent HTTP/1.1 connection to a backend."""

    def __init__(self, pool: Optional[UpstreamPool], key: Key) -> None:
        self.pool = pool
        self.key = key
        self.used = 0
        """Requests sent on this connection so far."""
        self.connected = False
        self._state = _IDLE
        self._buffer = b""
        self._remaining = 0
        self._sink: Any = None
        self._done: Optional[defer.Deferred[None]] = None
        self._head_only = False
        self._persistent = True
        self._received_any = False
        self._body: Optional[IBodyProducer] = None
        self._body_done = True
        self._aborted = False

    # --- connection -----------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        transport: Any = self.transport
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)

    def connectionLost(self, reason: Failure = _CLOSED) -> None:
        self.connected = False
        if self.pool is not None:
            self.pool.forget(self)
        if self._body is not None and not self._body_done:
            self._body.stopProducing()
            self._body_done = True
        done, self._done = self._done, None
        if done is None:
            return
        if self._state == _UNTIL_CLOSE:
            self._state = _IDLE
            done.callback(None)
        elif reason.check(SSL.Error, VerificationError):
            done.errback(BadResponse(f"TLS failed: {reason.getErrorMessage()}"))
        elif not self._received_any and self.used > 1:
            done.errback(StaleConnection(f"reused connection closed: {reason.getErrorMessage()}"))
        else:
            done.errback(BadResponse(f"connection lost mid-response: {reason.getErrorMessage()}"))

    def abort(self) -> None:
        """Drop the connection now (the client left, or a timeout); once."""
        if self.connected and not self._aborted and self.transport is not None:
            self._aborted = True
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # --- one exchange ---------------------------------------------------

    def request(self, head: bytes, body: Optional[IBodyProducer], sink: IResponseSink,
                head_only: bool = False) -> defer.Deferred[None]:
        """Send ``head`` (request line and headers, without the framing header
        or the blank line) and ``body``; fires when the response is complete.

        The connection goes back to its pool by itself when the exchange left
        it reusable.
        """
        assert self._done is None, "one request at a time"
        self.used += 1
        self._sink = sink
        self._head_only = head_only
        self._persistent = True
        self._received_any = False
        self._state = _HEAD
        d: defer.Deferred[None] = defer.Deferred(lambda _: self.cancel())
        self._done = d
        transport: Any = self.transport
        if body is None:
            transport.write(head + b"\r\n")
            return d
        self._body = body
        self._body_done = False
        if body.length is UNKNOWN_LENGTH:
            transport.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
            consumer: Any = _ChunkedWriter(transport)
        else:
            transport.write(head + b"Content-Length: %d\r\n\r\n" % body.length)
            consumer = transport
        body.startProducing(consumer).addCallbacks(self._body_sent, self._body_failed,
                                                   callbackArgs=(body.length is UNKNOWN_LENGTH,))
        return d

    def _body_sent(self, _: object, chunked: bool) -> None:
        self._body_done = True
        if chunked and self.connected:
            self.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]

    def _body_failed(self, reason: Failure) -> None:
        # The client's body broke off: this request cannot be completed.
        self._body_done = True
        self._persistent = False
        self.abort()

    @property
    def busy(self) -> bool:
        """Whether a request is in progress on this connection."""
        return self._done is not None

    @property
    def body_done(self) -> bool:
        """Whether the current request's body (if any) was all sent."""
        return self._body_done

    # --- parsing --------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._received_any = True
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        while data:
            state = self._state
            if state == _LENGTH:
                n = self._remaining
                if len(data) < n:
                    self._remaining = n - len(data)
                    self._sink.data(data)
                    return
                self._sink.data(data[:n])
                data = data[n:]
                if self._done is None:  # the sink gave up
                    return
                self._finish()
            elif state == _HEAD:
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if b"\n\n" in data:
                        return self._malformed("response head framed with bare LF")
                    if len(data) > MAX_HEAD:
                        return self._malformed("response head too large")
                    self._buffer = data
                    return
                if end > MAX_HEAD:
                    return self._malformed("response head too large")
                head, data = data[:end], data[end + 4:]
                if head.count(b"\n") != head.count(b"\r\n"):
                    return self._malformed("response head with a bare LF")
                if not self._parse_head(head):
                    return
            elif state == _UNTIL_CLOSE:
                self._sink.data(data)
                return
            elif state == _CHUNK_DATA:
                n = self._remaining
                if len(data) <= n:
                    self._remaining = n - len(data)
                    self._sink.data(data)
                    if self._remaining == 0:
                        self._state = _CHUNK_END
                    return
                self._sink.data(data[:n])
                if self._done is None:
                    return
                data = data[n:]
                self._state = _CHUNK_END
            elif state in (_CHUNK_SIZE, _CHUNK_END, _TRAILERS):
                end = data.find(b"\r\n")
                if end < 0:
                    if len(data) > MAX_LINE:
                        return self._malformed("chunk line too long")
                    self._buffer = data
                    return
                line, data = data[:end], data[end + 2:]
                if state == _CHUNK_END:
                    if line:
                        return self._malformed("chunk not followed by CRLF")
                    self._state = _CHUNK_SIZE
                elif state == _CHUNK_SIZE:
                    size = line.split(b";", 1)[0].strip()
                    try:
                        if not size or len(size) > 16:
                            raise ValueError(size)
                        n = int(size, 16)
                        if n < 0 or size[:1] in (b"-", b"+") or b"_" in size:
                            raise ValueError(size)
                    except ValueError:
                        return self._malformed("bad chunk size")
                    if n == 0:
                        self._state = _TRAILERS
                    else:
                        self._remaining = n
                        self._state = _CHUNK_DATA
                elif not line:  # the blank line that ends the trailers
                    self._finish()
            else:  # _IDLE: bytes nobody asked for (or after a cancel)
                self._persistent = False
                self.abort()
                return
            if self._done is None:
                return
        return

    def _parse_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or status[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(status[1]) != 3 \
                or not status[1].isdigit():
            self._malformed("bad status line")
            return False
        code = int(status[1])
        phrase = status[2] if len(status) == 3 else b""
        headers: List[Header] = []
        length: Optional[int] = None
        chunked = False
        close = status[0] == b"HTTP/1.0"
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or b" " in name or b"\t" in name:
                self._malformed("bad header line")
                return False
            value = value.strip(b" \t")
            lower = name.lower()
            if lower == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    self._malformed("bad Content-Length")
                    return False
                length = int(value)
            elif lower == b"transfer-encoding":
                chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
                if not chunked:
                    close = True  # another coding: the body runs to the end
            elif lower == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                if b"close" in tokens:
                    close = True
                elif b"keep-alive" in tokens and status[0] == b"HTTP/1.0":
                    close = False
            headers.append((name, value))
        if 100 <= code < 200:
            if code == 101:
                self._malformed("unexpected 101 Switching Protocols")
                return False
            return True  # interim: the real response follows
        if close:
            self._persistent = False
        no_body = self._head_only or code in (204, 304)
        if chunked:
            length = None
        self._sink.head(code, phrase, headers, length, not no_body)
        if self._done is None:  # the sink gave up on this exchange
            return False
        if no_body:
            self._finish()
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._remaining = length
            self._state = _LENGTH
            if length == 0:
                self._finish()
        else:
            self._persistent = False
            self._state = _UNTIL_CLOSE
        return True

    def _malformed(self, why: str) -> None:
        done, self._done = self._done, None
        self._state = _IDLE
        self._persistent = False
        self.abort()
        if done is not None:
            done.errback(BadResponse(why))

    def _finish(self) -> None:
        self._state = _IDLE
        self._sink = None
        done, self._done = self._done, None
        if done is None:  # cancelled meanwhile
            return
        reusable = self._persistent and self._body_done
        self._body = None
        if reusable and self.pool is not None:
            # A slow client may have paused us; an idle connection reads.
            self.transport.resumeProducing()  # type: ignore[union-attr]
            self.pool.release(self)
        elif self.connected:
            self.transport.loseConnection()  # type: ignore[union-attr]
        if done is not None:
            done.callback(None)

    def cancel(self) -> None:
        """Give up on the current exchange: nothing more goes to the sink."""
        done, self._done = self._done, None
        self._sink = None
        self._state = _IDLE
        self._persistent = False
        self.abort()
        if done is not None and not done.called:
            done.errback(defer.CancelledError())


class _ConnectionFactory(Factory):
    noisy = False  # no "Starting factory" line for every new connection

    def __init__(self, pool: UpstreamPool, key: Key) -> None:
        self.pool = pool
        self.key = key

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self.pool, self.key)


def client_endpoint(reactor: Any, host: bytes, port: int, timeout: float) -> IStreamClientEndpoint:
    """A TCP client endpoint: an IP address directly, a name through ``HostnameEndpoint``."""
    name = host.decode("ascii")
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return endpoints.HostnameEndpoint(reactor, name, port, timeout=timeout)
    kind = endpoints.TCP4ClientEndpoint if address.version == 4 else endpoints.TCP6ClientEndpoint
    endpoint: IStreamClientEndpoint = kind(reactor, name, port, timeout=timeout)
    return endpoint


class UpstreamPool:
    """Idle connections per backend, and new ones when none is idle."""

    def __init__(self, reactor: Any, connect_timeout: float, pool_size: int = 64,
                 endpoint_for: Optional[Callable[[Backend], IStreamClientEndpoint]] = None,
                 tls: Optional[BackendTLS] = None) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.pool_size = pool_size
        self.tls = tls or BackendTLS()
        self._endpoint_for = endpoint_for or self._endpoint
        self._idle: Dict[Key, List[UpstreamConnection]] = {}
        self._endpoints: Dict[Key, IStreamClientEndpoint] = {}

    def _endpoint(self, backend: Backend) -> IStreamClientEndpoint:
        """TCP to the backend, with TLS on top for ``https``."""
        endpoint = client_endpoint(self.reactor, backend.host, backend.port, self.connect_timeout)
        if backend.scheme == b"https":
            return self.tls.wrap(endpoint, backend.host, backend.ca_file)
        return endpoint

    @property
    def idle(self) -> int:
        """Idle connections, all backends together."""
        return sum(len(v) for v in self._idle.values())

    def connection(self, backend: Backend, fresh: bool = False) -> defer.Deferred[UpstreamConnection]:
        """An idle connection to ``backend`` (unless ``fresh``), else a new one."""
        key = (backend.scheme, backend.host, backend.port, backend.ca_file)
        idle = self._idle.get(key)
        while idle and not fresh:
            connection = idle.pop()
            if connection.connected:
                return defer.succeed(connection)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            endpoint = self._endpoints[key] = self._endpoint_for(backend)
        d = endpoint.connect(_ConnectionFactory(self, key))

        def failed(reason: Failure) -> Failure:
            if reason.check(defer.CancelledError):
                return reason
            return Failure(ConnectFailed(reason.getErrorMessage()))

        d.addErrback(failed)
        return d  # type: ignore[return-value]

    def release(self, connection: UpstreamConnection) -> None:
        """A connection is free again: keep it, or close it if the pool is full."""
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.pool_size:
            connection.transport.loseConnection()  # type: ignore[union-attr]
        else:
            idle.append(connection)

    def forget(self, connection: UpstreamConnection) -> None:
        """A connection closed: it is no longer idle."""
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        """Close every idle connection (the gateway is stopping)."""
        for idle in self._idle.values():
            for connection in list(idle):
                connection.transport.loseConnection()  # type: ignore[union-attr]
        self._idle.clear()

