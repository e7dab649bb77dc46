"""``GET /backup``: the snapshot streamed while it is produced.

The chunks of :func:`gradesvc.state.snapshot.snapshot_chunks` are written by a
``twisted.internet.task.cooperate`` task, so the reactor serves other requests
between chunks, and the task pauses whenever the client's transport pushes
back, so a slow reader never makes the daemon buffer the file.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer, task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from zope.interface import implementer

from gradesvc.state.identity import Anchor, StateIdentity, StreamId
from gradesvc.state.phase import ReplicaStatus
from gradesvc.state.snapshot import snapshot_chunks
from gradesvc.state.store import GradeStore
from svckit.responses import STREAMED, Streamed
from svckit.web import client_gone

log = Logger()


@implementer(IPushProducer)
class ChunkProducer:
    """Writes an iterator of chunks to a request as a cooperative task.

    :attr:`done` fires when every chunk is written; cancelling it (the
    router does when the client goes away) stops the task.
    """

    def __init__(
        self, request: server.Request, chunks: Iterator[bytes], cooperator: Optional[task.Cooperator]
    ) -> None:
        self.request = request
        self.chunks = chunks
        coop: Any = cooperator or task  # the module's cooperate() is the global one
        self.task = coop.cooperate(self._steps())
        request.registerProducer(self, True)
        self.done: defer.Deferred[None] = defer.Deferred(lambda _: self.stopProducing())
        self.task.whenDone().addCallbacks(self._finished, self._failed)

    def _steps(self) -> Iterator[None]:
        for chunk in self.chunks:
            self.request.write(chunk)
            yield None

    def _finished(self, _: Any) -> None:
        if not client_gone(self.request):
            self.request.unregisterProducer()
        if not self.done.called:
            self.done.callback(None)

    def _failed(self, failure: Failure) -> None:
        if not client_gone(self.request):
            self.request.unregisterProducer()
        if failure.check(task.TaskStopped):
            failure = Failure(defer.CancelledError("backup stopped"))
        if not self.done.called:
            self.done.errback(failure)

    def pauseProducing(self) -> None:
        """The client is slow: stop producing chunks."""
        self.task.pause()

    def resumeProducing(self) -> None:
        """The client caught up: produce again."""
        self.task.resume()

    def stopProducing(self) -> None:
        """The connection is gone."""
        try:
            self.task.stop()
        except (task.TaskDone, task.TaskStopped, task.TaskFailed):
            pass


class Backup:
    """``GET /backup``: a ``csv.gz`` snapshot naming its stream and anchor; 503 until ready."""

    def __init__(
        self,
        store: GradeStore,
        status: ReplicaStatus,
        stream: StreamId,
        anchor: Callable[[], Optional[Anchor]],
        registry: CollectorRegistry,
        replica_id: str,
        wall: Callable[[], float],
        cooperator: Optional[task.Cooperator] = None,
    ) -> None:
        self.store = store
        self.status = status
        self.stream = stream
        self.anchor = anchor
        self.replica_id = replica_id
        self.wall = wall
        self.cooperator = cooperator
        self._backups = Counter("gradesvc_backups", "GET /backup requests served.", registry=registry)

    async def __call__(self, request: server.Request) -> Streamed:
        """Stream the snapshot; return once it is all written."""
        anchor = self.anchor()
        if not self.status.ready or anchor is None or anchor.sha256 is None:
            raise self.status.not_ready()
        now = datetime.fromtimestamp(self.wall(), timezone.utc)
        offset = anchor.offset
        name = f"gradesvc-{self.replica_id}-{now.strftime('%Y%m%dT%H%M%SZ')}.csv.gz"
        request.setHeader(b"content-type", b"application/gzip")
        request.setHeader(
            b"content-disposition", f'attachment; filename="{name}"'.encode("ascii", "replace")
        )
        request.setHeader(b"x-stream-offset", str(offset).encode("ascii"))
        users = len(self.store)
        log.info("Serving backup of {users} users at stream offset {offset}", users=users, offset=offset)
        self._backups.inc()
        producer = ChunkProducer(request, snapshot_chunks(self.store, StateIdentity(self.stream, anchor), now), self.cooperator)
        try:
            await producer.done
        except defer.CancelledError:
            log.info("Backup client went away before the end")
            raise
        return STREAMED
