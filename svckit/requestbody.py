"""A request body passed on as it arrives, with back-pressure both ways.

``twisted.web`` stores a whole body before a resource sees the request.  A
route with ``stream_body`` (lbsvc's proxy) is dispatched as soon as its
headers are admitted instead, and its body reaches the handler through a
:class:`RequestBody`: an ``IBodyProducer`` that the handler hands to whatever
consumes it (an upstream connection).  Chunks are written to the consumer as
they come; while the consumer is paused, or before there is one, they are
held, and past :data:`HIGH_WATER` bytes held the client's connection stops
being read, so memory per request stays bounded whatever the body's size.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

HIGH_WATER = 64 * 1024
"""Bytes held before the client's connection is paused."""


class BodyBrokenOff(Exception):
    """The client's connection closed before the whole body arrived."""


@implementer(IBodyProducer)
class RequestBody:
    """The body of a request that is still arriving."""

    def __init__(self, length: Optional[int], pause_client: Callable[[], None],
                 resume_client: Callable[[], None]) -> None:
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self.complete = False
        """Whether the last byte has arrived."""
        self.received = 0
        """Bytes arrived so far."""
        self.started = False
        """Whether a consumer was given the body (it can be given only once)."""
        self._pause_client = pause_client
        self._resume_client = resume_client
        self._client_paused = False
        self._held: List[bytes] = []
        self._held_bytes = 0
        self._consumer: Any = None
        self._paused = False
        self._done: Optional[defer.Deferred[None]] = None
        self._broken: Optional[Failure] = None

    @property
    def waiting_on_consumer(self) -> bool:
        """Whether the body is held up by its consumer (not by the client)."""
        return self._paused or (self._consumer is None and not self.complete)

    # --- fed by the request -------------------------------------------------

    def feed(self, data: bytes) -> None:
        """A chunk of the body arrived."""
        self.received += len(data)
        if self._consumer is not None and not self._paused and not self._held:
            self._consumer.write(data)
            return
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > HIGH_WATER:
            # Asked again for every chunk held: the channel resumes its
            # transport on its own when its write buffer drains.
            self._client_paused = True
            self._pause_client()

    def finish(self) -> None:
        """The last chunk arrived."""
        self.complete = True
        self._flush()

    def break_off(self) -> None:
        """The client went away before the end of the body."""
        if self.complete:
            return
        self._broken = Failure(BodyBrokenOff("the client closed its connection mid-body"))
        self._held.clear()
        self._held_bytes = 0
        self._fail()

    # --- IBodyProducer ------------------------------------------------------

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        """Write the body to ``consumer``; fires when all of it was written."""
        if self.started:
            raise RuntimeError("a streamed request body can be sent only once")
        self.started = True
        self._consumer = consumer
        done: defer.Deferred[None] = defer.Deferred()
        self._done = done
        consumer.registerProducer(self, True)
        if self._broken is not None:
            self._fail()
        else:
            self._flush()
        return done

    def pauseProducing(self) -> None:
        """The consumer is full: hold what arrives."""
        self._paused = True

    def resumeProducing(self) -> None:
        """The consumer drained: write what is held."""
        self._paused = False
        self._flush()

    def stopProducing(self) -> None:
        """The consumer is gone: drop the body."""
        self._consumer = None
        self._done = None
        self._held.clear()
        self._held_bytes = 0
        self._resume()

    # --- internals ----------------------------------------------------------

    def _flush(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        while self._held and not self._paused:
            chunk = self._held.pop(0)
            self._held_bytes -= len(chunk)
            consumer.write(chunk)
        if self._held_bytes <= HIGH_WATER:
            self._resume()
        if self.complete and not self._held and self._done is not None:
            done, self._done = self._done, None
            consumer.unregisterProducer()
            self._consumer = None
            done.callback(None)

    def _resume(self) -> None:
        if self._client_paused:
            self._client_paused = False
            self._resume_client()

    def _fail(self) -> None:
        done, self._done = self._done, None
        if done is not None and self._broken is not None:
            if self._consumer is not None:
                self._consumer.unregisterProducer()
                self._consumer = None
            done.errback(self._broken)
