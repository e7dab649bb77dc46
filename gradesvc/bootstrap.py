"""Start-up: load a peer's snapshot, then let the consumer replay from its offset.

Each peer's ``/backup`` is tried in turn; its rows are merged into the store as
they stream in, never holding the file.  The stream is then consumed from the
snapshot's *recorded offset* + 1, not from its generation time: a time lookup
in the broker works per chunk at one-second precision and the peer may lag its
own stream, so resuming by time can skip writes that were in flight.

A peer that fails half-way (dies, stalls for ``idle_timeout`` seconds, sends
garbage) leaves only correctly versioned rows behind, which the merge rule
(the later stream offset wins) makes harmless; the loader moves on to the next peer, and with no peer left it
starts from the beginning of the stream.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Optional, Sequence

import treq
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from gradesvc.snapshot import SnapshotReader
from gradesvc.status import ReplicaStatus
from gradesvc.storage import GradeStore

log = Logger()

PROGRESS_EVERY = 100_000
PEER_AHEAD = 10_000
"""Offsets a peer must be past the checkpoint before its snapshot is loaded too."""
IDLE_TIMEOUT = 30.0


class PeerStalled(Exception):
    """A peer sent nothing of its snapshot for too long."""


class _SnapshotBody(Protocol):
    """Feeds a response body to ``feed``; gives up when it stalls or ``feed`` fails.

    Giving up closes the connection (``stopProducing``), so a peer that stops
    sending without closing cannot hold a bootstrapping replica forever.
    """

    def __init__(
        self,
        feed: Callable[[bytes], None],
        done: defer.Deferred[None],
        clock: IReactorTime,
        idle_timeout: float,
    ) -> None:
        self.feed = feed
        self.done = done
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.error: Optional[BaseException] = None
        self._timer: Optional[IDelayedCall] = None

    def connectionMade(self) -> None:
        self._timer = self.clock.callLater(self.idle_timeout, self._stalled)

    def dataReceived(self, data: bytes) -> None:
        if self.error is not None:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle_timeout)
        try:
            self.feed(data)
        except Exception as e:
            self._give_up(e)

    def _stalled(self) -> None:
        self._give_up(PeerStalled(f"no snapshot data for {self.idle_timeout:g}s"))

    def _give_up(self, error: BaseException) -> None:
        self.error = error
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.error is not None:
            self.done.errback(self.error)
        elif reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)


class Bootstrap:
    """Loads the first available peer snapshot into the store."""

    def __init__(
        self,
        store: GradeStore,
        status: ReplicaStatus,
        peers: Sequence[str],
        *,
        clock: IReactorTime,
        http: Any = treq,
        connect_timeout: float = 5.0,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.store = store
        self.status = status
        self.peers = list(peers)
        self.http = http
        self.connect_timeout = connect_timeout

    async def run(self) -> int:
        """Load a snapshot at start; return the stream offset to resume after (-1: none)."""
        offset = await self.load(-1)
        if offset is not None:
            return offset
        if self.peers:
            log.warn("No peer gave a snapshot; replaying the stream from its start")
        else:
            log.info("No peers configured; replaying the stream from its start")
        return -1

    async def load(self, needed: int) -> Optional[int]:
        """Load the first peer snapshot reflecting offset ``needed`` or later.

        Returns its offset, or None when no peer has one.  A snapshot that
        is too old is still merged (harmless: the later offset wins per
        field) and the next peer is tried.
        """
        started = self.clock.seconds()
        self.status.loading_snapshot()
        for peer in self.peers:
            offset = await self._try_peer(peer.rstrip("/"))
            if offset is not None and offset < needed:
                log.warn("Snapshot of {peer} reflects offset {offset}, before {needed}; trying the next",
                         peer=peer, offset=offset, needed=needed)
            elif offset is not None:
                log.info(
                    "Loaded {rows} rows from {peer} in {seconds:.2f}s; resuming the"
                    " stream after offset {offset}",
                    rows=self.status.snapshot_rows, peer=peer, offset=offset,
                    seconds=self.clock.seconds() - started,
                )
                return offset
        return None

    async def furthest_peer(self) -> int:
        """The highest offset a ready peer has applied (-1: none answered)."""
        best = -1
        for peer in self.peers:
            try:
                response = await self.http.get(f"{peer.rstrip('/')}/ready", timeout=self.connect_timeout)
                report = json.loads(await response.content())
            except Exception as e:
                if isinstance(e, defer.CancelledError):
                    raise
                log.info("Peer {peer} did not say where it is: {error!r}", peer=peer, error=e)
                continue
            offset = report.get("applied_offset") if isinstance(report, dict) else None
            if response.code == 200 and isinstance(offset, int):
                best = max(best, offset)
        return best

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

            body: defer.Deferred[None] = defer.Deferred()
            response.deliverBody(_SnapshotBody(chunk, body, self.clock, self.idle_timeout))
            await body
            offset = reader.finish()
        except Exception as e:
            if isinstance(e, defer.CancelledError):
                raise
            log.warn(
                "Snapshot from {url} failed after {rows} rows: {error!r}; trying the next",
                url=url, rows=reader.rows, error=e,
            )
            return None
        self.status.snapshot_offset = offset
        return offset


class BootstrapService(service.Service):
    """At start: the local checkpoint if there is a usable one, else a peer's snapshot.

    ``loaded`` (the stream consumer's) fires with the offset the loaded state
    reflects; the consumer subscribes from the one after it.  If the stream
    no longer reaches it, the consumer finds the gap and re-bootstraps from
    a peer.
    """

    def __init__(self, bootstrap: Bootstrap, loaded: defer.Deferred[int],
                 checkpoint: Optional[Callable[[], Awaitable[Optional[int]]]] = None) -> None:
        self.bootstrap = bootstrap
        self.loaded = loaded
        self.checkpoint = checkpoint
        self._running: Optional[defer.Deferred[None]] = None

    def startService(self) -> None:
        """Load the state in the background."""
        super().startService()
        self._running = defer.ensureDeferred(self._run())
        self._running.addErrback(self._failed)

    async def _run(self) -> None:
        offset = None
        if self.checkpoint is not None:
            self.bootstrap.status.loading_snapshot()
            offset = await self.checkpoint()
        if offset is None:
            offset = await self.bootstrap.run()
        elif self.bootstrap.peers:
            offset = await self._catch_up_from_a_peer(offset)
        self.loaded.callback(offset)

    async def _catch_up_from_a_peer(self, offset: int) -> int:
        """After the checkpoint: a peer's snapshot too, when it is much further ahead.

        Replaying N messages takes about as long as loading N * 16 users, so a
        peer ahead by more than that (and by at least :data:`PEER_AHEAD`) is
        worth a snapshot; rows merge with the checkpoint's by their offsets.
        """
        furthest = await self.bootstrap.furthest_peer()
        worth = max(PEER_AHEAD, len(self.bootstrap.store) // 16)
        if furthest - offset <= worth:
            return offset
        log.info("A peer is {ahead} offsets past the checkpoint; loading its snapshot too",
                 ahead=furthest - offset)
        loaded = await self.bootstrap.load(offset + 1)
        return offset if loaded is None else max(offset, loaded)

    def _failed(self, failure: Failure) -> None:
        if not failure.check(defer.CancelledError):
            log.failure("Bootstrap failed; replaying the stream from its start", failure)
            self.loaded.callback(-1)

    def stopService(self) -> None:
        """Abandon a bootstrap in progress."""
        super().stopService()
        if self._running is not None:
            self._running.cancel()
