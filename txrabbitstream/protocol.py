"""The client side of RabbitMQ's stream protocol, as a Twisted ``Protocol``.

:class:`StreamClient` opens the connection itself once TCP (or TLS) is up:
peer properties, SASL PLAIN, the broker's ``Tune`` answered with the smaller
frame size and heartbeat of the two sides, ``Open`` of the virtual host; then
:attr:`StreamClient.ready` fires.  After that:

* requests (``create``, ``delete``, ``metadata``, ``declare_publisher``,
  ``query_publisher_sequence``, ``subscribe``, ``unsubscribe``, ``close``) each
  return one Deferred, fired by the response with the same correlation id;
  an error code is a :class:`StreamError`;
* :meth:`StreamClient.publish` writes entries (made by
  :func:`~txrabbitstream.frames.simple_entry` or
  :func:`~txrabbitstream.frames.sub_entry`) in as many ``Publish`` frames as
  the agreed frame size needs; confirms and errors come back as lists of
  publishing ids through :attr:`StreamClient.on_confirm` and
  :attr:`StreamClient.on_publish_error`: no Deferred per message;
* each subscription's chunks go, parsed and CRC-checked, to the handler given
  to :meth:`StreamClient.subscribe`, which grants more with
  :meth:`StreamClient.credit`;
* heartbeats are sent every agreed interval, and a broker silent for two
  intervals is taken for gone;
* a frame or chunk that cannot be read ends the connection (never a record
  skipped or read twice: the caller resubscribes from what it has).

When the connection ends, every request still waiting fails with the
reason and :attr:`StreamClient.lost` fires with it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import attrs
from twisted.internet import defer, error, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from txrabbitstream import frames
from txrabbitstream.chunk import Chunk, ChunkError, parse_chunk
from txrabbitstream.frames import FrameError, Reader

log = Logger()

DEFAULT_FRAME_MAX = 1024 * 1024
DEFAULT_HEARTBEAT = 60
MAX_INCOMING_FRAME = 512 * 1024 * 1024
"""The largest frame accepted from the broker: a memory bound, not the agreed frame size, which limits only
what the client sends (a ``Deliver`` carries a whole chunk, and the broker writes chunks larger than that:
2.3 MB seen with the default 1 MiB)."""

ChunkHandler = Callable[[Chunk], None]


class StreamError(Exception):
    """The broker answered a request with an error code."""

    def __init__(self, command: str, code: int) -> None:
        self.command = command
        self.code = code
        super().__init__(f"{command}: {frames.CODE_NAMES.get(code, f'code {code:#x}')}")


class ProtocolError(Exception):
    """The broker sent something this client cannot read; the connection is closed."""


@attrs.frozen
class Broker:
    """A node as ``Metadata`` names it."""

    host: str
    port: int


@attrs.frozen
class StreamMetadata:
    """Where a stream lives: its leader and replicas (None and [] when the code is not OK)."""

    code: int
    leader: Optional[Broker]
    replicas: Tuple[Broker, ...]


def _negotiate(ours: int, theirs: int) -> int:
    """The smaller of two limits where 0 means none."""
    if ours == 0 or theirs == 0:
        return ours or theirs
    return min(ours, theirs)


def _nothing(reader: Reader) -> None:
    """A response that carries nothing but its code."""


def _strings(reader: Reader) -> List[Optional[str]]:
    return [reader.string() for _ in range(reader.u32())]


def _metadata(reader: Reader) -> Dict[str, StreamMetadata]:
    brokers: Dict[int, Broker] = {}
    for _ in range(reader.u32()):
        reference = reader.u16()
        host = reader.string() or ""
        brokers[reference] = Broker(host, reader.u32())
    found: Dict[str, StreamMetadata] = {}
    for _ in range(reader.u32()):
        name = reader.string() or ""
        code, leader = reader.u16(), reader.u16()
        replicas = tuple(brokers[r] for r in reader.array(frames.U16) if r in brokers)
        found[name] = StreamMetadata(code, brokers.get(leader) if code == frames.OK else None,
                                     replicas if code == frames.OK else ())
    return found


class StreamClient(Protocol):
    """One connection to one node."""

    def __init__(self, username: str, password: str, vhost: str = "/", *, clock: IReactorTime,
                 frame_max: int = DEFAULT_FRAME_MAX, heartbeat: int = DEFAULT_HEARTBEAT,
                 client_properties: Mapping[str, str] = {}) -> None:
        self.username = username
        self.password = password
        self.vhost = vhost
        self.clock = clock
        self.frame_max = frame_max
        """The largest frame this client sends: ours until ``Tune``, then the agreed one."""
        self.heartbeat = heartbeat
        self.client_properties = {"product": "txrabbitstream", **client_properties}
        self.server_properties: Dict[str, str] = {}
        self.ready: defer.Deferred[StreamClient] = defer.Deferred()
        """Fires once the virtual host is open; fails if the connection could not be opened."""
        self.lost: defer.Deferred[BaseException] = defer.Deferred()
        """Fires with the reason (an exception) once the connection is gone."""
        self.on_confirm: Callable[[int, List[int]], None] = lambda publisher, ids: None
        """``(publisher id, publishing ids)`` the broker has stored."""
        self.on_publish_error: Callable[[int, List[Tuple[int, int]]], None] = lambda publisher, errors: None
        """``(publisher id, [(publishing id, code)])`` the broker refused."""
        self.on_metadata_update: Callable[[int, str], None] = lambda code, stream: None
        """``(code, stream)``: the stream moved or is gone; its publishers and subscriptions are over."""
        self._reader = frames.FrameReader(MAX_INCOMING_FRAME)
        self._correlation = 0
        self._waiting: Dict[int, Tuple[str, Callable[[Reader], Any], defer.Deferred[Any]]] = {}
        self._subscriptions: Dict[int, ChunkHandler] = {}
        self._tuned: defer.Deferred[None] = defer.Deferred()
        self._beat: Optional[task.LoopingCall] = None
        self._heard = 0.0
        self._closing: Optional[Failure] = None

    # --- the connection ------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)  # small frames (a confirm, a credit) must not wait for Nagle
        self._heard = self.clock.seconds()
        defer.ensureDeferred(self._open()).addCallbacks(self.ready.callback, self._open_failed)

    async def _open(self) -> StreamClient:
        self.server_properties = await self._request(
            "peer properties", Reader.properties, frames.peer_properties, self.client_properties)
        mechanisms = await self._request("SASL handshake", _strings, frames.sasl_handshake)
        if "PLAIN" not in mechanisms:
            raise StreamError("SASL handshake", frames.SASL_MECHANISM_NOT_SUPPORTED)
        await self._request("SASL authenticate", _nothing, frames.sasl_authenticate, "PLAIN",
                            frames.plain(self.username, self.password))
        await self._tuned
        await self._request("open", _nothing, frames.open_vhost, self.vhost)
        if self.heartbeat:
            self._beat = task.LoopingCall(self._heartbeat)
            self._beat.clock = self.clock
            self._beat.start(self.heartbeat, now=False)
        return self

    def _open_failed(self, failure: Failure) -> None:
        self.ready.errback(failure)
        self.abort()

    def dataReceived(self, data: bytes) -> None:
        self._heard = self.clock.seconds()
        try:
            for frame in self._reader.feed(data):
                self._frame(frame)
        except (FrameError, ChunkError, ProtocolError) as e:
            log.error("Stream protocol: {error}; closing the connection", error=e)
            self.abort(Failure(ProtocolError(str(e))))

    def _frame(self, frame: bytes) -> None:
        key, _version = frames.head(frame)
        if key == frames.DELIVER:
            handler = self._subscriptions.get(frame[4]) if len(frame) > 4 else None
            if handler is not None:
                handler(parse_chunk(frame, 5))
            return
        reader = Reader(frame, 4)
        if key == frames.PUBLISH_CONFIRM:
            publisher = reader.u8()
            self.on_confirm(publisher, reader.array(frames.U64))
        elif key == frames.PUBLISH_ERROR:
            publisher = reader.u8()
            errors = [(reader.u64(), reader.u16()) for _ in range(reader.u32())]
            self.on_publish_error(publisher, errors)
        elif key & frames.RESPONSE:
            self._response(key & ~frames.RESPONSE, reader)
        elif key == frames.HEARTBEAT:
            pass
        elif key == frames.TUNE:
            frame_max = _negotiate(self.frame_max, reader.u32())
            heartbeat = _negotiate(self.heartbeat, reader.u32())
            self.frame_max, self.heartbeat = frame_max, heartbeat
            self._write(frames.tune(frame_max, heartbeat))
            if not self._tuned.called:
                self._tuned.callback(None)
        elif key == frames.METADATA_UPDATE:
            code = reader.u16()
            self.on_metadata_update(code, reader.string() or "")
        elif key == frames.CLOSE:
            correlation, code = reader.u32(), reader.u16()
            reason = reader.string()
            self._closing = Failure(ConnectionClosedByBroker(code, reason or ""))
            self._write(frames.response(frames.CLOSE, correlation, frames.OK))
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            raise ProtocolError(f"unexpected frame with key {key:#06x}")

    def _response(self, key: int, reader: Reader) -> None:
        if key == frames.CREDIT:  # no correlation id: sent only when a credit went wrong
            # Credit racing an unsubscribe (the id may even be in use again), or for a
            # subscription the broker ended: nothing is lost, nothing to do.
            code, subscription = reader.u16(), reader.u8()
            log.debug("Credit for subscription {id} refused: {why}", id=subscription,
                      why=frames.CODE_NAMES.get(code, code))
            return
        correlation = reader.u32()
        waiting = self._waiting.pop(correlation, None)
        if waiting is None:
            raise ProtocolError(f"a response ({key:#06x}) to no request ({correlation})")
        name, parse, d = waiting
        if key != frames.METADATA:
            code = reader.u16()
            if code != frames.OK:
                d.errback(StreamError(name, code))
                return
        d.callback(parse(reader))  # a response cut short raises here: the connection is closed

    def _heartbeat(self) -> None:
        if self.clock.seconds() - self._heard > 2 * self.heartbeat:
            log.warn("Stream protocol: nothing from the broker for {seconds:.0f}s; closing the connection",
                     seconds=self.clock.seconds() - self._heard)
            self.abort(Failure(error.TimeoutError("no heartbeat from the broker")))
            return
        self._write(frames.heartbeat())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        reason = self._closing or reason
        waiting, self._waiting = self._waiting, {}
        for _name, _parse, d in waiting.values():
            d.errback(reason)
        self._subscriptions.clear()
        if not self._tuned.called:
            self._tuned.errback(reason)
            self._tuned.addErrback(lambda _: None)
        if not self.lost.called:
            self.lost.callback(reason.value or error.ConnectionDone())

    def abort(self, reason: Optional[Failure] = None) -> None:
        """Drop the connection now (pending requests fail with ``reason``)."""
        if reason is not None and self._closing is None:
            self._closing = reason
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # --- requests ----------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _request(self, name: str, parse: Callable[[Reader], Any], build: Callable[..., bytes],
                 *args: Any) -> defer.Deferred[Any]:
        """Send a request; its Deferred fires with what ``parse`` reads of the response."""
        if self.lost.called:
            return defer.fail(error.ConnectionDone("the stream connection is closed"))
        self._correlation = (self._correlation + 1) & 0xFFFFFFFF
        correlation = self._correlation
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiting[correlation] = (name, parse, d)
        self._write(build(correlation, *args))
        return d

    async def create(self, stream: str, arguments: Mapping[str, str] = {}) -> bool:
        """Create ``stream``; False if it exists already (whatever it was created with)."""
        try:
            await self._request("create", _nothing, frames.create, stream, arguments)
        except StreamError as e:
            if e.code == frames.STREAM_ALREADY_EXISTS:
                return False
            raise
        return True

    async def delete(self, stream: str) -> None:
        """Delete ``stream``."""
        await self._request("delete", _nothing, frames.delete, stream)

    async def metadata(self, streams: Sequence[str]) -> Dict[str, StreamMetadata]:
        """Where each of ``streams`` lives."""
        found: Dict[str, StreamMetadata] = await self._request("metadata", _metadata, frames.metadata, list(streams))
        return found

    async def declare_publisher(self, publisher_id: int, reference: str, stream: str) -> None:
        """Publisher ``publisher_id`` on ``stream``; a ``reference`` turns on deduplication ('' for none)."""
        await self._request("declare publisher", _nothing, frames.declare_publisher, publisher_id, reference, stream)

    async def query_publisher_sequence(self, reference: str, stream: str) -> int:
        """The last publishing id the stream holds of publisher ``reference`` (0: none)."""
        stored: int = await self._request("query publisher sequence", Reader.u64, frames.query_publisher_sequence,
                                          reference, stream)
        return stored

    async def delete_publisher(self, publisher_id: int) -> None:
        await self._request("delete publisher", _nothing, frames.delete_publisher, publisher_id)

    def publish(self, publisher_id: int, entries: Sequence[bytes]) -> int:
        """Write ``entries`` in ``Publish`` frames that fit the agreed frame size; how many frames."""
        written = frames.pack_publishes(publisher_id, entries, self.frame_max)
        if self.transport is not None:
            self.transport.writeSequence(written)
        return len(written)

    async def subscribe(self, subscription_id: int, stream: str, handler: ChunkHandler, *,
                        offset_type: int = frames.OFFSET_AT, offset: int = 0, credit: int = 2,
                        options: Mapping[str, str] = {}) -> None:
        """Chunks of ``stream`` from ``offset`` to ``handler``, ``credit`` of them before more are granted.

        The first chunk may begin before ``offset``: its records below it are the caller's to skip.
        """
        self._subscriptions[subscription_id] = handler
        try:
            await self._request("subscribe", _nothing, frames.subscribe, subscription_id, stream, offset_type,
                                offset, credit, options)
        except BaseException:
            self._subscriptions.pop(subscription_id, None)
            raise

    def credit(self, subscription_id: int, chunks: int = 1) -> None:
        """Let the broker send ``chunks`` more chunks of a subscription."""
        self._write(frames.credit(subscription_id, chunks))

    async def unsubscribe(self, subscription_id: int) -> None:
        """End a subscription; chunks already on their way are dropped."""
        self._subscriptions.pop(subscription_id, None)
        await self._request("unsubscribe", _nothing, frames.unsubscribe, subscription_id)

    async def close(self, reason: str = "closing") -> None:
        """Close the connection as the protocol asks: ``Close``, its response, then the socket."""
        try:
            await self._request("close", _nothing, frames.close, frames.OK, reason)
        finally:
            if self.transport is not None:
                self.transport.loseConnection()


class ConnectionClosedByBroker(error.ConnectionClosed):
    """The broker sent ``Close`` with this code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed by the broker: {frames.CODE_NAMES.get(code, code)} ({reason})")
        self.code = code
        self.reason = reason
