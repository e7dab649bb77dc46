"""The access log: one combined-log-format line per request, written in batches.

Formatting a log event per request through ``twisted.logger`` (what
``twisted.web``'s default does when no file is given) was the largest cost of
a small request after the work itself.  :class:`AccessLog` keeps one line per
request, formatted cheaply, in a list and writes the list out about once a
second (nginx's ``buffer=``/``flush=``), or sooner when :data:`MAX_BUFFERED`
lines are waiting, and on shutdown.

Destinations: ``-`` writes each batch as one event into the daemon's own log
(one request per line; ``twistd``'s text log indents continuation lines with
a tab), a path appends to that file, and ``off`` writes nothing.
"""

from __future__ import annotations

import re
import time
from typing import IO, List, Optional

from twisted.application import service
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server

log = Logger()

OFF = "off"
MAIN_LOG = "-"
FLUSH_INTERVAL = 1.0
MAX_BUFFERED = 2000

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def _quote(value: Optional[bytes]) -> str:
    """A header or request line as it may appear inside double quotes."""
    if not value:
        return "-"
    text = value.decode("latin-1")
    if _UNSAFE.search(text):
        text = _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text


def log_time(seconds: float) -> str:
    """``25/Nov/2026:13:45:00 +0000``: the combined log format's time, in UTC."""
    t = time.gmtime(seconds)
    return (f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year:04d}"
            f":{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")


class AccessLog(service.Service):
    """Buffers access log lines and writes them out in batches."""

    def __init__(self, destination: str, clock: IReactorTime) -> None:
        self.destination = destination
        self.clock = clock
        self.enabled = destination != OFF
        self._lines: List[str] = []
        self._file: Optional[IO[bytes]] = None
        self._second = -1
        self._time = ""
        self._loop = task.LoopingCall(self.flush)
        self._loop.clock = clock

    def startService(self) -> None:
        """Open the file (if any) and flush every second."""
        super().startService()
        if not self.enabled:
            return
        if self.destination != MAIN_LOG:
            self._file = open(self.destination, "ab")
        self._loop.start(FLUSH_INTERVAL, now=False)

    def stopService(self) -> None:
        """Write what is buffered and close the file."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def line(self, client: str, request_line: str, code: int, length: int,
             referer: Optional[bytes], agent: Optional[bytes]) -> str:
        """One combined-log-format line (without the newline)."""
        now = int(self.clock.seconds())
        if now != self._second:
            self._second, self._time = now, log_time(now)
        return (
            f'{client} - - [{self._time}] "{request_line}" {code} {length or "-"}'
            f' "{_quote(referer)}" "{_quote(agent)}"'
        )

    def record(self, request: server.Request, code: Optional[int] = None) -> None:
        """Buffer the line of a finished (or refused) request."""
        if not self.enabled:
            return
        address = request.getClientAddress()
        client = getattr(address, "host", "-")
        method = getattr(request, "method", None) or b"-"
        uri = getattr(request, "uri", None) or b"-"
        request_line = _quote(method + b" " + uri + b" " + (request.clientproto or b"HTTP/1.1"))
        headers = request.requestHeaders
        referer = headers.getRawHeaders(b"referer")
        agent = headers.getRawHeaders(b"user-agent")
        self._lines.append(self.line(
            client, request_line, request.code if code is None else code, request.sentLength,
            referer[0] if referer else None, agent[0] if agent else None,
        ))
        if len(self._lines) >= MAX_BUFFERED:
            self.flush()

    def flush(self) -> None:
        """Write the buffered lines out now."""
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        if self._file is not None:
            self._file.write(("\n".join(lines) + "\n").encode("utf-8"))
            self._file.flush()
        else:
            log.info("{access}", access="\n".join(lines))

    @property
    def buffered(self) -> int:
        """Lines waiting to be written."""
        return len(self._lines)
