"""Test doubles shared by both daemons, in the manner of ``twisted.internet.testing``.

* :func:`response`: an HTTP/1.1 answer written to a ``StringTransport``,
  split into status, head and body (a text answer's request-id line checked
  against its ``X-Request-Id`` header and removed);
* :class:`InlinePool`: the part of adbapi's ``ConnectionPool`` the daemons
  use, run at once on one DB-API connection in this thread, so a test needs
  no threads and no reactor to use a real database (SQLite in memory).
"""

from __future__ import annotations

from typing import Any, Callable, Tuple, TypeVar

from twisted.internet import defer
from twisted.internet.testing import StringTransport

T = TypeVar("T")


def response(transport: StringTransport) -> Tuple[int, bytes, bytes]:
    """Status, head and body of what was written to ``transport`` (one answer).

    A text answer of ours ends with ``request id: ID``: it is checked to be
    the ``X-Request-Id`` header's, and returned without it.
    """
    head, _, body = transport.value().partition(b"\r\n\r\n")
    message, marker, rest = body.partition(b"\nrequest id: ")
    if marker:
        ids = [line.split(b": ", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"x-request-id:")]
        assert [rest] == [ids[0] + b"\n"], (head, body)
        body = message
    return int(head.split(b" ", 2)[1]), head, body


class InlinePool:
    """``runInteraction``, ``runOperation`` and ``close`` of ``adbapi.ConnectionPool``, run inline.

    Each call runs in a transaction on ``connection`` and returns a Deferred
    that has already fired (committed, or rolled back with the failure).
    """

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.calls = 0
        """Calls made so far."""

    def runInteraction(self, work: Callable[..., T], *args: Any, **kw: Any) -> defer.Deferred[T]:
        """``work(cursor, *args, **kw)`` in a transaction."""
        self.calls += 1
        cursor = self.connection.cursor()
        try:
            result = work(cursor, *args, **kw)
        except BaseException:
            self.connection.rollback()
            return defer.fail()
        finally:
            cursor.close()
        self.connection.commit()
        return defer.succeed(result)

    def runOperation(self, statement: str, *args: Any) -> defer.Deferred[None]:
        """One statement in a transaction."""

        def execute(cursor: Any) -> None:
            cursor.execute(statement, *args)

        return self.runInteraction(execute)

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()
