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

A checkpoint names its stream and carries its anchor (:mod:`gradesvc.state.identity`);
its file name names the stream too (:mod:`gradesvc.state.datadir`).  At start its
head is read first and checked, against the replica's own stream and, by its
anchor, against the stream's contents (:mod:`gradesvc.stream.verification`), before
any row reaches the store; one that fails is moved aside with one error line.
A previous release's checkpoint (no identity) is loaded, checked by its newest
written field, and adopted under the new name, or moved aside.

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

from gradesvc.state.datadir import DataDir
from gradesvc.state.identity import Anchor, StateIdentity, Verify
from gradesvc.state.phase import Phase, ReplicaStatus
from gradesvc.state.retention import RetentionWatch
from gradesvc.state.snapshot import SnapshotError, SnapshotReader, snapshot_chunks
from gradesvc.state.store import GradeStore

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
        data_dir: DataDir,
        anchor: Callable[[], Optional[Anchor]],
        verify: Verify,
        *,
        clock: IReactorTime,
        wall: Callable[[], float],
        cooperator: Optional[task.Cooperator] = None,
    ) -> None:
        self.store = store
        self.status = status
        self.data_dir = data_dir
        self.path = data_dir.checkpoint
        self.anchor = anchor
        self.verify = verify
        self.clock = clock
        self.wall = wall
        self.cooperator: Any = cooperator or task
        self.offset = -1
        """The offset the newest checkpoint written or loaded reflects (-1: none)."""
        self.seconds = 0.0
        self.written_at: Optional[float] = None
        """When this process last wrote a checkpoint (the clock's seconds), or None."""
        self._generation = 0
        """Moves on when the checkpoint is refused, so a write in progress is dropped."""

    def consistent(self) -> bool:
        """Whether the store now reflects a prefix of the stream (worth a checkpoint)."""
        return self.status.phase in (Phase.CATCHING_UP, Phase.READY)

    async def write(self) -> Optional[int]:
        """Write a checkpoint now, unless nothing changed; its offset, or None."""
        anchor = self.anchor()
        if not self.consistent() or anchor is None or anchor.sha256 is None or anchor.offset == self.offset:
            return None
        started = self.clock.seconds()
        generation = self._generation
        self.data_dir.path.mkdir(parents=True, exist_ok=True)
        tmp = self.data_dir.path / f".{self.path.name}.{uuid.uuid4().hex}.tmp"
        generated = datetime.fromtimestamp(self.wall(), timezone.utc)
        identity = StateIdentity(self.data_dir.stream, anchor)
        try:
            with open(tmp, "wb") as f:
                chunks = snapshot_chunks(self.store, identity, generated)
                await self.cooperator.cooperate(self._write(f, chunks)).whenDone()
            if generation != self._generation:
                tmp.unlink()
                return None
            await threads.deferToThread(_fsync_and_replace, tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.offset = anchor.offset
        self.written_at = self.clock.seconds()
        self.seconds = self.written_at - started
        log.info("Checkpoint at offset {offset}: {rows} users in {seconds:.2f}s",
                 offset=anchor.offset, rows=len(self.store), seconds=self.seconds)
        return anchor.offset

    @staticmethod
    def _write(f: Any, chunks: Iterator[bytes]) -> Iterator[None]:
        for chunk in chunks:
            f.write(chunk)
            yield None

    async def load(self) -> Optional[Anchor]:
        """Load this replica's checkpoint into the (empty) store, once verified; its anchor, or None.

        A missing file is None; one that does not read to its end is logged,
        the store is emptied again, and None is returned; one of another
        stream or another life of this one is moved aside (None).
        """
        for path in [self.path, *self.data_dir.legacy_checkpoints]:
            if path.exists():
                return await self._load(path)
        log.info("No checkpoint at {path}", path=str(self.path))
        return None

    async def _load(self, path: Path) -> Optional[Anchor]:
        started = self.clock.seconds()
        reader = SnapshotReader(self.store, hold=True)
        try:
            with open(path, "rb") as f:
                await self.cooperator.cooperate(self._read(f, reader, head_only=True)).whenDone()
                declared = reader.identity
                if declared is not None and declared.stream is not None:
                    self.status.waiting_for = "the broker, to check the checkpoint against the stream"
                    problem = declared.other_stream(self.data_dir.stream) or await self.verify(declared.anchor)
                    if problem is not None:
                        self._refuse(path, declared, problem)
                        return None
                reader.release()
                await self.cooperator.cooperate(self._read(f, reader)).whenDone()
            identity = reader.finish()
        except (OSError, SnapshotError, ValueError) as e:
            log.error("Checkpoint {path} is unusable ({error}); ignoring it", path=str(path), error=e)
            self.store.clear()
            return None
        if identity.stream is None:
            self.status.waiting_for = "the broker, to check the previous release's checkpoint"
            problem = await self.verify(identity.anchor)
            if problem is not None:
                self.store.clear()
                self._refuse(path, identity, problem)
                return None
            os.replace(path, self.path)
            log.info("Checkpoint {path} of the previous release verified against stream {stream};"
                     " kept as {new}", path=str(path), stream=self.data_dir.stream, new=str(self.path))
        self.offset = identity.anchor.offset
        log.info("Loaded checkpoint {path}: {rows} users at {anchor} in {seconds:.2f}s",
                 path=str(path), rows=reader.rows, anchor=identity.anchor.describe(),
                 seconds=self.clock.seconds() - started)
        return identity.anchor

    def _refuse(self, path: Path, declared: StateIdentity, problem: str) -> None:
        """One error line naming both identities; the file moved aside; ``/ready`` told."""
        target = self.data_dir.move_aside(path)
        log.error(
            "Refusing checkpoint {path}: it holds {declared}, but {problem} (this replica serves stream"
            " {stream}). Moved aside to {target}; rebuilding from a peer or the stream. After"
            " recreating a stream this is expected: nothing to do.",
            path=str(path), declared=declared.describe(), problem=problem,
            stream=self.data_dir.stream, target=str(target),
        )
        self.status.state_refused("checkpoint", declared.describe(), problem, target)

    def refuse_current(self) -> Optional[Path]:
        """The state in memory was refused: its checkpoint goes aside too; where to (None: there was none)."""
        self._generation += 1
        self.offset = -1
        return self.data_dir.move_aside(self.path)

    @staticmethod
    def _read(f: Any, reader: SnapshotReader, head_only: bool = False) -> Iterator[None]:
        while not (head_only and reader.identity is not None):
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
