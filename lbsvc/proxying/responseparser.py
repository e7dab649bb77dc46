"""The upstream client's HTTP/1.1 response parser: a response's framing, as its bytes arrive.

Status line, headers (a list of raw ``(name, value)`` pairs), then a body
framed by ``Content-Length``, chunked encoding or the end of the connection.
Interim ``1xx`` responses are skipped; ``HEAD``, ``204`` and ``304`` have no
body.  The head and the body pieces go to an :class:`IResponseSink` as they
are parsed; nothing is buffered beyond one partial line.  What the parser
finds about the exchange (complete, malformed, bytes nobody asked for) it
tells its owner, the connection (:class:`lbsvc.proxying.upstream.UpstreamConnection`),
which decides what becomes of the connection.

One integer state, compared in the order of how often each occurs: this is
the data path of every proxied answer.
"""

from __future__ import annotations

from typing import Any, List, Optional, Protocol, Tuple

from zope.interface import Interface

MAX_HEAD = 64 * 1024
"""The largest response head accepted (status line and headers)."""
MAX_LINE = 4096
"""The longest chunk-size or trailer line accepted."""

Header = Tuple[bytes, bytes]

# Parser states.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(8)


class IResponseSink(Interface):
    """Where a response goes as it is parsed."""

    def head(code: int, phrase: bytes, headers: List[Header], length: Optional[int], body: bool) -> None:
        """Status and headers; ``length`` is the declared ``Content-Length`` (None
        without one); ``body`` whether a body follows (not after ``HEAD``, 204, 304)."""

    def data(chunk: bytes) -> None:
        """A piece of the body."""


class ParserOwner(Protocol):
    """What the parser tells about the exchange: the connection it reads for."""

    def finished(self) -> None:
        """The response is complete."""

    def malformed(self, why: str) -> None:
        """The response cannot be parsed."""

    def stray(self) -> None:
        """Bytes arrived while no response was expected."""


class ResponseParser:
    """The framing of one response at a time.

    ``owner`` is told ``finished()`` when a response is complete,
    ``malformed(why)`` when it cannot be parsed, and ``stray()`` when bytes
    arrive while no response is expected; it calls :meth:`stop` to give up on
    an exchange (nothing more then goes to the sink).
    """

    def __init__(self, owner: ParserOwner) -> None:
        self.owner = owner
        self.state = _IDLE
        self.sink: Any = None
        self.head_only = False
        self.persistent = True
        """False once the response said the connection ends with it (or its body runs to the close)."""
        self._buffer = b""
        self._remaining = 0

    def start(self, sink: IResponseSink, head_only: bool) -> None:
        """Expect a response (to a ``HEAD`` request when ``head_only``)."""
        self.sink = sink
        self.head_only = head_only
        self.persistent = True
        self.state = _HEAD

    def stop(self) -> None:
        """No response is expected any more."""
        self.sink = None
        self.state = _IDLE

    @property
    def until_close(self) -> bool:
        """Whether the body being read ends when the connection does."""
        return self.state == _UNTIL_CLOSE

    def _finished(self) -> None:
        self.state = _IDLE
        self.sink = None
        self.owner.finished()

    def feed(self, data: bytes) -> None:
        """Bytes from the backend, parsed as far as they go."""
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        while data:
            state = self.state
            if state == _LENGTH:
                n = self._remaining
                if len(data) < n:
                    self._remaining = n - len(data)
                    self.sink.data(data)
                    return
                self.sink.data(data[:n])
                data = data[n:]
                if self.sink is None:  # the sink gave up
                    return
                self._finished()
            elif state == _HEAD:
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if b"\n\n" in data:
                        return self.owner.malformed("response head framed with bare LF")
                    if len(data) > MAX_HEAD:
                        return self.owner.malformed("response head too large")
                    self._buffer = data
                    return
                if end > MAX_HEAD:
                    return self.owner.malformed("response head too large")
                head, data = data[:end], data[end + 4:]
                if head.count(b"\n") != head.count(b"\r\n"):
                    return self.owner.malformed("response head with a bare LF")
                if not self._parse_head(head):
                    return
            elif state == _UNTIL_CLOSE:
                self.sink.data(data)
                return
            elif state == _CHUNK_DATA:
                n = self._remaining
                if len(data) <= n:
                    self._remaining = n - len(data)
                    self.sink.data(data)
                    if self._remaining == 0:
                        self.state = _CHUNK_END
                    return
                self.sink.data(data[:n])
                if self.sink is None:
                    return
                data = data[n:]
                self.state = _CHUNK_END
            elif state in (_CHUNK_SIZE, _CHUNK_END, _TRAILERS):
                end = data.find(b"\r\n")
                if end < 0:
                    if len(data) > MAX_LINE:
                        return self.owner.malformed("chunk line too long")
                    self._buffer = data
                    return
                line, data = data[:end], data[end + 2:]
                if state == _CHUNK_END:
                    if line:
                        return self.owner.malformed("chunk not followed by CRLF")
                    self.state = _CHUNK_SIZE
                elif state == _CHUNK_SIZE:
                    size = line.split(b";", 1)[0].strip()
                    try:
                        if not size or len(size) > 16:
                            raise ValueError(size)
                        n = int(size, 16)
                        if n < 0 or size[:1] in (b"-", b"+") or b"_" in size:
                            raise ValueError(size)
                    except ValueError:
                        return self.owner.malformed("bad chunk size")
                    if n == 0:
                        self.state = _TRAILERS
                    else:
                        self._remaining = n
                        self.state = _CHUNK_DATA
                elif not line:  # the blank line that ends the trailers
                    self._finished()
            else:  # _IDLE: bytes nobody asked for (or after a cancel)
                self.persistent = False
                self.owner.stray()
                return
            if self.sink is None:
                return
        return

    def _parse_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or status[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(status[1]) != 3 \
                or not status[1].isdigit():
            self.owner.malformed("bad status line")
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
                self.owner.malformed("bad header line")
                return False
            value = value.strip(b" \t")
            lower = name.lower()
            if lower == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    self.owner.malformed("bad Content-Length")
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
                self.owner.malformed("unexpected 101 Switching Protocols")
                return False
            return True  # interim: the real response follows
        if close:
            self.persistent = False
        no_body = self.head_only or code in (204, 304)
        if chunked:
            length = None
        self.sink.head(code, phrase, headers, length, not no_body)
        if self.sink is None:  # the sink gave up on this exchange
            return False
        if no_body:
            self._finished()
        elif chunked:
            self.state = _CHUNK_SIZE
        elif length is not None:
            self._remaining = length
            self.state = _LENGTH
            if length == 0:
                self._finished()
        else:
            self.persistent = False
            self.state = _UNTIL_CLOSE
        return True
