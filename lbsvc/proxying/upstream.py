"""The upstream HTTP/1.1 client: pooled, persistent connections to backends.

``twisted.web.client.Agent`` is general (proxies, TLS, redirects, a
``Headers`` object and a ``Response`` per request, an endpoint per request);
a gateway needs none of that and pays for all of it on every request.  This
module is the small client the gateway uses instead:

* :class:`~lbsvc.proxying.connections.UpstreamConnections` keeps up to
  ``pool_size`` idle connections per backend and hands them out most recently
  used first; a new connection sets ``TCP_NODELAY`` once, when it is made.
* :class:`UpstreamConnection` (here) writes a request head built by the caller
  as one ``bytes``, streams a body from an ``IBodyProducer``
  (``Content-Length`` or chunked) with back-pressure, and has the response
  parsed by a :class:`~lbsvc.proxying.responseparser.ResponseParser`, whose
  findings decide whether the connection goes back to its pool.

Errors say whose fault they are: :class:`ConnectFailed` (nothing was sent, the
next backend may be tried), :class:`StaleConnection` (a reused idle connection
closed before answering), :class:`BadResponse` (malformed, or cut off).
Pipelining is not used: one request at a time per connection.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import Interface

from lbsvc.proxying.responseparser import Header, IResponseSink, ResponseParser

__all__ = ["Header", "IResponseSink", "UpstreamConnection"]

log = Logger()

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


class IConnectionKeeper(Interface):
    """Where a connection goes back to when it is free again, and leaves when it is lost."""

    def release(connection: UpstreamConnection) -> None:
        """``connection`` answered whole and may carry another request."""

    def forget(connection: UpstreamConnection) -> None:
        """``connection`` is closed (or closing): never hand it out again."""


class UpstreamConnection(Protocol):
    """One persistent HTTP/1.1 connection to a backend."""

    def __init__(self, pool: Optional[IConnectionKeeper], key: Key) -> None:
        self.pool = pool
        self.key = key
        self.used = 0
        """Requests sent on this connection so far."""
        self.connected = False
        self.parser = ResponseParser(self)
        self._done: Optional[defer.Deferred[None]] = None
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
        if self.parser.until_close:
            self.parser.stop()
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
        self._persistent = True
        self._received_any = False
        self.parser.start(sink, head_only)
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
        self.parser.feed(data)

    # --- what the parser found ------------------------------------------

    def malformed(self, why: str) -> None:
        """The response cannot be parsed: the exchange fails, the connection is dropped."""
        done, self._done = self._done, None
        self.parser.stop()
        self._persistent = False
        self.abort()
        if done is not None:
            done.errback(BadResponse(why))

    def stray(self) -> None:
        """Bytes nobody asked for (or after a cancel): the connection cannot be trusted."""
        self._persistent = False
        self.abort()

    def finished(self) -> None:
        """The response is complete: the connection goes back to its pool if it can be reused."""
        done, self._done = self._done, None
        if done is None:  # cancelled meanwhile
            return
        reusable = self._persistent and self.parser.persistent and self._body_done
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
        self.parser.stop()
        self._persistent = False
        self.abort()
        if done is not None and not done.called:
            done.errback(defer.CancelledError())
