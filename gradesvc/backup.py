"""``GET /backup``: the snapshot streamed while it is produced.

The chunks of :func:`gradesvc.snapshot.snapshot_chunks` are written by a
``twisted.internet.task.cooperate`` task, so the reactor serves other requests
between chunks, and the task pauses whenever the client's transport pushes
back, so a slow reader never makes the daemon buffer the file.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterator, Optional

from twisted.internet import task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web import server
from twisted.web.iweb import IRequest
from zope.interface import implementer

from gradesvc.readapi import not_ready
from gradesvc.snapshot import snapshot_chunks
from gradesvc.status import ReplicaStatus
from gradesvc.storage import GradeStore
from svckit.jsonweb import JSONResource
from svckit.metrics import Registry

log = Logger()


@implementer(IPushProducer)
class _ChunkProducer:
    """Writes an iterator of chunks to a request as a cooperative task."""

    def __init__(
        self, request: IRequest, chunks: Iterator[bytes], cooperator: Optional[task.Cooperator]
    ) -> None:
        self.request = request
        self.chunks = chunks
        coop: Any = cooperator or task  # the module's cooperate() is the global one
        self.task = coop.cooperate(self._steps())
        request.registerProducer(self, True)
        request.notifyFinish().addErrback(self._client_gone)
        self.task.whenDone().addCallbacks(self._done, self._failed)

    def _steps(self) -> Iterator[None]:
        for chunk in self.chunks:
            self.request.write(chunk)
            yield None

    def _done(self, _: Any) -> None:
        self.request.unregisterProducer()
        self.request.finish()

    def _failed(self, failure: Any) -> None:
        if not failure.check(task.TaskStopped):
            log.failure("Backup failed while streaming", failure)
        self.request.unregisterProducer()
        if not self.request.finished:  # type: ignore[attr-defined]
            self.request.loseConnection()

    def _client_gone(self, failure: Any) -> None:
        log.info("Backup client went away: {reason}", reason=failure.value)
        self.stopProducing()

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


class BackupResource(JSONResource):
    """``GET /backup``: a ``csv.gz`` snapshot; 503 until this replica is ready."""

    def __init__(
        self,
        store: GradeStore,
        status: ReplicaStatus,
        registry: Registry,
        replica_id: str,
        cooperator: Optional[task.Cooperator] = None,
    ) -> None:
        super().__init__()
        self.store = store
        self.status = status
        self.replica_id = replica_id
        self.cooperator = cooperator
        self._backups = registry.counter(
            "gradesvc_backups_total", "GET /backup requests served."
        )

    def render_GET(self, request: IRequest) -> int:
        """Start streaming the snapshot."""
        if not self.status.ready:
            raise not_ready(self.status)
        now = datetime.now(timezone.utc)
        offset = self.status.applied_offset
        name = f"gradesvc-{self.replica_id}-{now.strftime('%Y%m%dT%H%M%SZ')}.csv.gz"
        request.setHeader(b"content-type", b"application/gzip")
        request.setHeader(
            b"content-disposition", f'attachment; filename="{name}"'.encode("ascii", "replace")
        )
        request.setHeader(b"x-stream-offset", str(offset).encode("ascii"))
        log.info(
            "Serving backup of {users} users at stream offset {offset}",
            users=len(self.store), offset=offset,
        )
        self._backups.inc()
        _ChunkProducer(request, snapshot_chunks(self.store, offset, now), self.cooperator)
        return server.NOT_DONE_YET
