"""Start-up: load a peer's snapshot, then let the consumer replay from its offset.

Each peer's ``/backup`` is tried in turn; its rows are merged into the store as
they stream in, never holding the file.  The stream is then consumed from the
snapshot's *recorded offset* + 1, not from its generation time: a time lookup
in the broker works per chunk at one-second precision and the peer may lag its
own stream, so resuming by time can skip writes that were in flight.

A peer that fails half-way (dies, times out, sends garbage) leaves only
correctly versioned rows behind, which the last-writer-wins merge makes
harmless; the loader moves on to the next peer, and with no peer left it
starts from the beginning of the stream.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import treq
from twisted.internet import defer
from twisted.logger import Logger

from gradesvc.hlc import HybridLogicalClock
from gradesvc.snapshot import SnapshotReader
from gradesvc.status import LOADING_SNAPSHOT, ReplicaStatus
from gradesvc.storage import GradeStore

log = Logger()

PROGRESS_EVERY = 100_000


class Bootstrap:
    """Loads the first available peer snapshot into the store."""

    def __init__(
        self,
        store: GradeStore,
        hlc: HybridLogicalClock,
        status: ReplicaStatus,
        peers: Sequence[str],
        http: Any = treq,
        connect_timeout: float = 5.0,
    ) -> None:
        self.store = store
        self.hlc = hlc
        self.status = status
        self.peers = list(peers)
        self.http = http
        self.connect_timeout = connect_timeout

    async def run(self) -> int:
        """Load a snapshot; return the stream offset to resume after (-1: none)."""
        started = time.monotonic()
        self.status.phase = LOADING_SNAPSHOT
        for peer in self.peers:
            offset = await self._try_peer(peer.rstrip("/"))
            if offset is not None:
                log.info(
                    "Loaded {rows} rows from {peer} in {seconds:.2f}s; resuming the"
                    " stream after offset {offset}",
                    rows=self.status.snapshot_rows, peer=peer, offset=offset,
                    seconds=time.monotonic() - started,
                )
                return offset
        if self.peers:
            log.warn("No peer gave a snapshot; replaying the stream from its start")
        else:
            log.info("No peers configured; replaying the stream from its start")
        return -1

    async def _try_peer(self, peer: str) -> Optional[int]:
        url = f"{peer}/backup"
        log.info("Requesting snapshot from {url}", url=url)
        reader = SnapshotReader(self.store)
        try:
            response = await self.http.get(url, unbuffered=True, timeout=self.connect_timeout)
            if response.code != 200:
                log.info("Peer {url} answered {code}; trying the next", url=url, code=response.code)
                await response.text()
                return None
            self.status.snapshot_peer = peer
            next_report = PROGRESS_EVERY

            def chunk(data: bytes) -> None:
                nonlocal next_report
                reader.feed(data)
                self.status.snapshot_rows = reader.rows
                if reader.rows >= next_report:
                    next_report += PROGRESS_EVERY
                    log.info("Snapshot from {peer}: {rows} rows loaded", peer=peer, rows=reader.rows)

            await self.http.collect(response, chunk)
            offset = reader.finish()
        except Exception as e:
            if isinstance(e, defer.CancelledError):
                raise
            log.warn(
                "Snapshot from {url} failed after {rows} rows: {error!r}; trying the next",
                url=url, rows=reader.rows, error=e,
            )
            return None
        finally:
            if reader.max_timestamp:
                self.hlc.observe(reader.max_timestamp)
        self.status.snapshot_offset = offset
        return offset
