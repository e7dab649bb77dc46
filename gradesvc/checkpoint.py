"""Local checkpoints: the replica's state on its own disk, with the offset it reflects.

Every ``--checkpoint-interval`` seconds the replica writes its whole state in
the ``/backup`` format (same writer, so the per-field offsets are there) to a
temporary file in ``--data-dir``, a chunk per cooperative step so the reactor
keeps serving, then fsyncs it (in a thread), renames it over the previous
checkpoint and fsyncs the directory: a crash at any moment leaves the old
checkpoint or the new one, never a mix.  At start the replica loads its
checkpoint and resumes the stream from its offset + 1, needing no peer.  A
checkpoint that does not read to its end (truncated, torn, corrupt: gzip's
CRC and length trailer is checked) is ignored with a log line, and the store
is left empty for a peer's snapshot or the stream.

Rows read during a checkpoint may already hold writes newer than its offset;
replaying from the offset + 1 leaves them as they are (the later offset wins
per field), exactly as with a peer's ``/backup``.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Optional

from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gradesvc.retention import RetentionWatch
from gradesvc.snapshot import SnapshotError, SnapshotReader, snapshot_chunks
from gradesvc.status import Phase, ReplicaStatus
from gradesvc.storage import GradeStore

log = Logger()

READ_CHUNK = 256 * 1024


def _fsync_and_replace(tmp: Path, final: Path) -> None:
    """Runs in a thread: make the new file durable, then the rename."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class Checkpoints:
    """Writes and loads one replica's checkpoint file."""

    def __init__(
        self,
        store: GradeStore,
        status: ReplicaStatus,
        data_dir: Path,
        replica_id: str,
        *,
        clock: IReactorTime,
        wall: Callable[[], float],
        cooperator: Optional[task.Cooperator] = None,
    ) -> None:
        self.store = store
        self.status = status
        self.data_dir = data_dir
        self.path = data_dir / f"checkpoint-{replica_id}.csv.gz"
        self.clock = clock
        self.wall = wall
        self.cooperator: Any = cooperator or task
        self.offset = -1
        """The offset the newest checkpoint written or loaded reflects (-1: none)."""
        self.seconds = 0.0

    def consistent(self) -> bool:
        """Whether the store now reflects a prefix of the stream (worth a checkpoint)."""
        return self.status.phase in (Phase.CATCHING_UP, Phase.READY)

    async def write(self) -> Optional[int]:
        """Write a checkpoint now, unless nothing changed; its offset, or None."""
        offset = self.status.applied_offset
        if not self.consistent() or offset == self.offset or offset < 0:
            return None
        started = self.clock.seconds()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.data_dir / f".{self.path.name}.{uuid.uuid4().hex}.tmp"
        generated = datetime.fromtimestamp(self.wall(), timezone.utc)
        try:
            with open(tmp, "wb") as f:
                await self.cooperator.cooperate(self._write(f, snapshot_chunks(self.store, offset, generated))).whenDone()
            await threads.deferToThread(_fsync_and_replace, tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.offset = offset
        self.seconds = self.clock.seconds() - started
        log.info("Checkpoint at offset {offset}: {rows} users in {seconds:.2f}s",
                 offset=offset, rows=len(self.store), seconds=self.seconds)
        return offset

    @staticmethod
    def _write(f: Any, chunks: Iterator[bytes]) -> Iterator[None]:
        for chunk in chunks:
            f.write(chunk)
            yield None

    async def load(self) -> Optional[int]:
        """Load the checkpoint into the (empty) store; its offset, or None.

        A missing file is None; one that does not read to its end is logged,
        the store is emptied again, and None is returned.
        """
        if not self.path.exists():
            log.info("No checkpoint at {path}", path=str(self.path))
            return None
        started = self.clock.seconds()
        reader = SnapshotReader(self.store)
        try:
            with open(self.path, "rb") as f:
                await self.cooperator.cooperate(self._read(f, reader)).whenDone()
            offset = reader.finish()
        except (OSError, SnapshotError, ValueError) as e:
            log.error("Checkpoint {path} is unusable ({error}); ignoring it", path=str(self.path), error=e)
            self.store.clear()
            return None
        self.offset = offset
        log.info("Loaded checkpoint {path}: {rows} users at offset {offset} in {seconds:.2f}s",
                 path=str(self.path), rows=reader.rows, offset=offset,
                 seconds=self.clock.seconds() - started)
        return offset

    @staticmethod
    def _read(f: Any, reader: SnapshotReader) -> Iterator[None]:
        while True:
            data = f.read(READ_CHUNK)
            if not data:
                return
            reader.feed(data)
            yield None


def checkpoint_and_watch(
    checkpoints: Checkpoints,
    stream_start: Callable[[], Awaitable[Optional[int]]],
    watch: RetentionWatch,
) -> Callable[[], defer.Deferred[None]]:
    """One round of the periodic checkpoint: write it, then compare it with retention."""

    async def run() -> None:
        offset = await checkpoints.write()
        if offset is not None:
            watch.update(offset, await stream_start())

    return lambda: defer.ensureDeferred(run())
