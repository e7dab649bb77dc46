"""The access log: one line per request, combined log format or JSON, written in batches.

Formatting a log event per request through ``twisted.logger`` (what
``twisted.web``'s default does when no file is given) was the largest cost of
a small request after the work itself.  :class:`AccessLog` keeps one line per
request, formatted cheaply, in a list and writes the list out about once a
second (nginx's ``buffer=``/``flush=``), or sooner when :data:`MAX_BUFFERED`
lines are waiting, and on shutdown.

Formats (``--access-log-format``):

* ``combined`` (the default): Apache/nginx's combined log format; a request's
  user (lbsvc) stands in the ``remote_user`` place.
* ``json``: one object a line: ``time`` (UTC, milliseconds), ``request_id``,
  ``client``, ``method``, ``target``, ``protocol``, ``status``, ``bytes``,
  ``duration_ms`` (from the end of the request head to the end of the
  answer), ``referer`` and ``user_agent`` (null when absent), and what the
  daemon adds to the request's :attr:`~svckit.site.GuardedRequest.log_fields`
  (lbsvc: ``user``, ``backend``, ``upstream_ms``).  Bytes that are not ASCII
  (in a target or a header) are shown as the Latin-1 characters of the same
  code, escaped, so a line is always ASCII and always valid JSON.

Destinations: ``-`` writes each batch as one event into the daemon's own log
(one request per line; ``twistd``'s text log indents continuation lines with
a tab), a path appends to that file, and ``off`` writes nothing.
"""

from __future__ import annotations

import re
import time
from json.encoder import encode_basestring_ascii as _json_string
from typing import IO, Callable, Dict, List, Optional, Union

from twisted.application import service
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server

from svckit.requestid import request_id

log = Logger()

OFF = "off"
MAIN_LOG = "-"
COMBINED = "combined"
JSON = "json"
FORMATS = (COMBINED, JSON)
FLUSH_INTERVAL = 1.0
MAX_BUFFERED = 2000

LogFields = Dict[str, Union[str, int, float, None]]
"""What a daemon adds to a request's JSON line (names to plain values)."""

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


def _json(value: Optional[bytes]) -> str:
    """Raw bytes as a JSON string (``null`` for none), byte for byte as Latin-1."""
    if value is None:
        return "null"
    return _json_string(value.decode("latin-1"))


def _json_value(value: Union[str, int, float, None]) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(int(value))


def log_time(seconds: float) -> str:
    """``25/Nov/2026:13:45:00 +0000``: the combined log format's time, in UTC."""
    t = time.gmtime(seconds)
    return (f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year:04d}"
            f":{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")


def iso_time(seconds: float) -> str:
    """``2026-11-25T13:45:00``: the JSON format's time to the second, in UTC (milliseconds follow)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def _header(request: server.Request, name: bytes) -> Optional[bytes]:
    values = request.requestHeaders.getRawHeaders(name)
    return values[0] if values else None


class AccessLog(service.Service):
    """Buffers access log lines and writes them out in batches."""

    def __init__(self, destination: str, clock: IReactorTime, format: str = COMBINED) -> None:
        if format not in FORMATS:
            raise ValueError(f"access log format must be one of {', '.join(FORMATS)}, not {format!r}")
        self.destination = destination
        self.clock = clock
        self.format = format
        self.enabled = destination != OFF
        self._line: Callable[[server.Request, int, int], str] = (
            self._combined if format == COMBINED else self._json_line)
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

    def _combined(self, request: server.Request, code: int, now: int) -> str:
        """One combined-log-format line (without the newline)."""
        if now != self._second:
            self._second, self._time = now, log_time(now)
        client = getattr(request.getClientAddress(), "host", "-")
        method = getattr(request, "method", None) or b"-"
        uri = getattr(request, "uri", None) or b"-"
        request_line = _quote(method + b" " + uri + b" " + (request.clientproto or b"HTTP/1.1"))
        fields: Optional[LogFields] = getattr(request, "log_fields", None)
        user = fields.get("user") if fields else None
        user_text = _quote(user.encode("utf-8")) if isinstance(user, str) else "-"
        return (
            f'{client} - {user_text} [{self._time}] "{request_line}" {code} {request.sentLength or "-"}'
            f' "{_quote(_header(request, b"referer"))}" "{_quote(_header(request, b"user-agent"))}"'
        )

    def _json_line(self, request: server.Request, code: int, now: int) -> str:
        """One JSON object (without the newline)."""
        seconds = self.clock.seconds()
        if now != self._second:
            self._second, self._time = now, iso_time(now)
        started = getattr(request, "started", None)
        if started is None:
            started = seconds
        client = getattr(request.getClientAddress(), "host", None)
        line = (
            f'{{"time":"{self._time}.{int(seconds * 1000) % 1000:03d}Z"'
            f',"request_id":"{request_id(request).decode("ascii")}"'
            f',"client":{_json_string(client) if isinstance(client, str) else "null"}'
            f',"method":{_json(getattr(request, "method", None))},"target":{_json(getattr(request, "uri", None))}'
            f',"protocol":{_json(request.clientproto)},"status":{code},"bytes":{request.sentLength}'
            f',"duration_ms":{(seconds - started) * 1000:.3f}'
            f',"referer":{_json(_header(request, b"referer"))},"user_agent":{_json(_header(request, b"user-agent"))}'
        )
        fields: Optional[LogFields] = getattr(request, "log_fields", None)
        if fields:
            line += "".join([f",{_json_string(k)}:{_json_value(v)}" for k, v in fields.items()])
        return line + "}"

    def record(self, request: server.Request, code: Optional[int] = None) -> None:
        """Buffer the line of a finished (or refused) request."""
        if not self.enabled:
            return
        self._lines.append(self._line(request, request.code if code is None else code, int(self.clock.seconds())))
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
