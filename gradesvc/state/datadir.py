"""A replica's data directory: held by one process, with a checkpoint named after its stream.

:class:`DataDir` takes an exclusive ``flock`` on ``gradesvc.lock`` in the
directory for as long as the process lives (the kernel lets go when it
exits, however it exits), and writes the holder's pid, replica id and stream
into that file, so a second process on the same directory refuses to start
with a line naming the holder.  Two replicas can never write one checkpoint.

The checkpoint is ``checkpoint-<vhost>-<stream>.csv.gz`` (each part
percent-encoded), so a replica pointed at another stream never even opens the
first one's file.  A file that is refused (another stream's, another life's,
or a previous release's that cannot be verified) is *moved aside*, never
deleted: renamed with ``.refused-<UTC time>`` appended, beside the original.
"""

from __future__ import annotations

import fcntl
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, List, Optional
from urllib.parse import quote

from twisted.application import service
from twisted.logger import Logger

from gradesvc.state.identity import StreamId

log = Logger()

LOCK_NAME = "gradesvc.lock"
DEFAULT_ROOT = "gradesvc-data"


class DataDirInUse(Exception):
    """Another live process holds the data directory."""


def _safe(text: str) -> str:
    return quote(text, safe="") or "%00"


def default_data_dir(stream: str, replica_id: str) -> str:
    """Where a replica keeps its state when ``--data-dir`` is not given: one directory per stream and replica."""
    return str(Path(DEFAULT_ROOT) / _safe(stream) / _safe(replica_id))


class DataDir(service.Service):
    """One replica's directory: its lock, its checkpoint's name, moving refused files aside.

    As a service it writes the holder's pid when the process starts running
    (after ``twistd`` went to the background) and lets go when it stops.
    """

    def __init__(self, path: Path, stream: StreamId, replica_id: str,
                 legacy_dirs: Optional[List[Path]] = None) -> None:
        self.path = path
        self.stream = stream
        self.replica_id = replica_id
        self.checkpoint = path / f"checkpoint-{_safe(stream.vhost)}-{_safe(stream.name)}.csv.gz"
        legacy_name = f"checkpoint-{replica_id}.csv.gz"
        self.legacy_checkpoints = [d / legacy_name for d in [path, *(legacy_dirs or [])]]
        """Where the previous release kept this replica's checkpoint (no identity in it)."""
        self._lock: Optional[IO[str]] = None

    def lock(self) -> None:
        """Hold the directory (creating it); :class:`DataDirInUse` when another process does."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK_NAME, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise DataDirInUse(
                f"data dir {self.path} is in use by {holder}; give this replica its own --data-dir"
            ) from None
        self._lock = handle
        self.mark_holder()

    def mark_holder(self) -> None:
        """Write who holds the lock (again after twistd forked into the background)."""
        if self._lock is None:
            return
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"process {os.getpid()} (replica {self.replica_id!r}, stream {self.stream})\n")
        self._lock.flush()

    def startService(self) -> None:
        """Name this process as the holder."""
        super().startService()
        self.mark_holder()

    def stopService(self) -> None:
        """Let go of the directory."""
        super().stopService()
        self.unlock()

    def unlock(self) -> None:
        """Let go of the directory."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def move_aside(self, path: Path, now: Optional[Any] = None) -> Optional[Path]:
        """Rename a refused file beside itself; its new path (None: it was not there)."""
        moment = now or datetime.now(timezone.utc)
        target = path.with_name(f"{path.name}.refused-{moment.strftime('%Y%m%dT%H%M%S.%fZ')}")
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return None
        log.warn("Moved {path} aside to {target}; it is kept for you to inspect or delete",
                 path=str(path), target=str(target))
        return target
