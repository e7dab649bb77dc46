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

A snapshot is checked as soon as its head is read, before a single row is
stored: it must name this replica's stream, and its anchor must be in the
stream (:mod:`gradesvc.stream.verification`); the body is paused meanwhile.  A peer
serving another stream, another life of this one, or a previous release's
snapshot (which names no stream) is refused with an error line naming the
peer and what it serves, and the next peer is tried.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Optional, Sequence, Tuple

import treq
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gradesvc.state.identity import Anchor, StateIdentity, StreamId, Verify
from gradesvc.state.phase import ReplicaStatus
from gradesvc.state.snapshot import SnapshotReader
from gradesvc.state.snapshotbody import ForeignSnapshot, SnapshotBody
from gradesvc.state.store import GradeStore

log = Logger()

PROGRESS_EVERY = 100_000
PEER_AHEAD = 10_000
"""Offsets a peer must be past the checkpoint before its snapshot is loaded too."""
IDLE_TIMEOUT = 30.0


class Bootstrap:
    """Loads the first available peer snapshot into the store."""

    def __init__(
        self,
        store: GradeStore,
        status: ReplicaStatus,
        peers: Sequence[str],
        stream: StreamId,
        verify: Verify,
        *,
        clock: IReactorTime,
        http: Any = treq,
        connect_timeout: float = 5.0,
        idle_timeout: float = IDLE_TIMEOUT,
        credentials: Optional[Tuple[str, str]] = None,
    ) -> None:
        self.clock = clock
        self.credentials = credentials
        """Basic credentials sent to peers' ``/backup`` (``--peer-auth admin``), or None."""
        for peer in peers if credentials is not None else ():
            if peer.startswith("http://"):
                log.warn("--peer-auth admin: this replica's write credentials go to peer {peer} in cleartext"
                         " (an https:// peer URL encrypts them)", peer=peer)
        self.idle_timeout = idle_timeout
        self.store = store
        self.status = status
        self.peers = list(peers)
        self.stream = stream
        self.verify = verify
        self.http = http
        self.connect_timeout = connect_timeout

    async def run(self) -> Optional[Anchor]:
        """Load a snapshot at start; its anchor, or None to replay the stream from its start."""
        anchor = await self.load(-1)
        if anchor is not None:
            return anchor
        if self.peers:
            log.warn("No peer gave a snapshot; replaying the stream from its start")
        else:
            log.info("No peers configured; replaying the stream from its start")
        return None

    async def load(self, needed: int) -> Optional[Anchor]:
        """Load the first peer snapshot reflecting offset ``needed`` or later.

        Returns its anchor, or None when no peer has one.  A snapshot that
        is too old is still merged (harmless: the later offset wins per
        field) and the next peer is tried.
        """
        started = self.clock.seconds()
        self.status.loading_snapshot()
        for peer in self.peers:
            self.status.waiting_for = f"the snapshot of peer {peer}"
            anchor = await self._try_peer(peer.rstrip("/"))
            if anchor is not None and anchor.offset < needed:
                log.warn("Snapshot of {peer} reflects offset {offset}, before {needed}; trying the next",
                         peer=peer, offset=anchor.offset, needed=needed)
            elif anchor is not None:
                log.info(
                    "Loaded {rows} rows from {peer} in {seconds:.2f}s; resuming the"
                    " stream after offset {offset}",
                    rows=self.status.snapshot_rows, peer=peer, offset=anchor.offset,
                    seconds=self.clock.seconds() - started,
                )
                return anchor
        return None

    async def _check_head(self, peer: str, reader: SnapshotReader) -> None:
        """The snapshot's head is read: refuse a foreign one, else let its rows in."""
        declared = reader.identity
        assert declared is not None
        problem = declared.other_stream(self.stream)
        if declared.stream is None:
            problem = ("it names no stream (a previous release's peer): upgrade that"
                       " peer first, or let this replica replay the stream")
        elif problem is None:
            self.status.waiting_for = f"the broker, to check the snapshot of {peer}"
            problem = await self.verify(declared.anchor)
            self.status.waiting_for = f"the snapshot of peer {peer}"
        if problem is not None:
            self.status.state_refused(f"peer {peer}", declared.describe(), problem)
            raise ForeignSnapshot(f"it serves {declared.describe()}, but {problem}")
        reader.release()

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

    async def _try_peer(self, peer: str) -> Optional[Anchor]:
        url = f"{peer}/backup"
        log.info("Requesting snapshot from {url}", url=url)
        reader = SnapshotReader(self.store, hold=True)
        try:
            auth = {"auth": self.credentials} if self.credentials is not None else {}
            response = await self.http.get(url, unbuffered=True, timeout=self.connect_timeout, **auth)
            if response.code == 401:
                log.warn("Peer {url} wants credentials for /backup that this replica {did}; trying the next peer"
                         " (--peer-auth admin sends this replica's write credentials)", url=url,
                         did="sent and it refused" if self.credentials else "did not send")
                await response.text()
                return None
            if response.code != 200:
                log.info("Peer {url} answered {code}; trying the next", url=url, code=response.code)
                await response.text()
                return None
            self.status.snapshot_peer = peer
            next_report = PROGRESS_EVERY

            def chunk(data: bytes) -> Optional[defer.Deferred[None]]:
                nonlocal next_report
                held = reader.waiting
                reader.feed(data)
                if reader.waiting and not held:
                    return defer.ensureDeferred(self._check_head(peer, reader))
                self.status.snapshot_rows = reader.rows
                if reader.rows >= next_report:
                    next_report += PROGRESS_EVERY
                    log.info("Snapshot from {peer}: {rows} rows loaded", peer=peer, rows=reader.rows)
                return None

            body: defer.Deferred[None] = defer.Deferred()
            response.deliverBody(SnapshotBody(chunk, body, self.clock, self.idle_timeout))
            await body
            identity: StateIdentity = reader.finish()
        except ForeignSnapshot as e:
            log.error("Refusing the snapshot of peer {peer}: {error}; trying the next peer", peer=peer, error=e)
            return None
        except Exception as e:
            if isinstance(e, defer.CancelledError):
                raise
            log.warn(
                "Snapshot from {url} failed after {rows} rows: {error!r}; trying the next",
                url=url, rows=reader.rows, error=e,
            )
            return None
        self.status.snapshot_offset = identity.anchor.offset
        return identity.anchor


class BootstrapService(service.Service):
    """At start: the local checkpoint if there is a usable one, else a peer's snapshot.

    ``loaded`` (the stream consumer's) fires with the offset the loaded state
    reflects; the consumer subscribes from the one after it.  If the stream
    no longer reaches it, the consumer finds the gap and re-bootstraps from
    a peer.
    """

    def __init__(self, bootstrap: Bootstrap, loaded: defer.Deferred[Optional[Anchor]],
                 checkpoint: Optional[Callable[[], Awaitable[Optional[Anchor]]]] = None) -> None:
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
        anchor = None
        if self.checkpoint is not None:
            self.bootstrap.status.loading_snapshot()
            self.bootstrap.status.waiting_for = "the checkpoint to load"
            anchor = await self.checkpoint()
        if anchor is None:
            anchor = await self.bootstrap.run()
        elif self.bootstrap.peers:
            anchor = await self._catch_up_from_a_peer(anchor)
        self.bootstrap.status.waiting_for = "a broker connection, to subscribe to the stream"
        self.loaded.callback(anchor)

    async def _catch_up_from_a_peer(self, anchor: Anchor) -> Anchor:
        """After the checkpoint: a peer's snapshot too, when it is much further ahead.

        Replaying N messages takes about as long as loading N * 16 users, so a
        peer ahead by more than that (and by at least :data:`PEER_AHEAD`) is
        worth a snapshot; rows merge with the checkpoint's by their offsets.
        """
        offset = anchor.offset
        furthest = await self.bootstrap.furthest_peer()
        worth = max(PEER_AHEAD, len(self.bootstrap.store) // 16)
        if furthest - offset <= worth:
            return anchor
        log.info("A peer is {ahead} offsets past the checkpoint; loading its snapshot too",
                 ahead=furthest - offset)
        loaded = await self.bootstrap.load(offset + 1)
        return anchor if loaded is None or loaded.offset <= offset else loaded

    def _failed(self, failure: Failure) -> None:
        if not failure.check(defer.CancelledError):
            log.failure("Bootstrap failed; replaying the stream from its start", failure)
            self.loaded.callback(None)

    def stopService(self) -> None:
        """Abandon a bootstrap in progress."""
        super().stopService()
        if self._running is not None:
            self._running.cancel()
