"""Spike (issue #21, step 0): read one stream with pika and with the stream protocol, and compare.

``BENCH_STREAM_MESSAGES`` (1,000,000) gradesvc write messages are published to
a fresh stream the way gradesvc publishes them (AMQP 0.9.1 through pika, the
same properties and body), then read from the first offset twice, in this
process, with the reactor:

* **pika**: gradesvc's consume loop without the apply: pika's Twisted
  adapter, ``basic_qos(prefetch_count=1000)``, ``x-stream-offset: first``,
  every message of a read taken at once (the queue's ``pending`` list), its
  ``x-stream-offset`` header and body looked at, one multiple ack per batch.
* **stream protocol** (port 5552): a minimal Twisted client written for this
  spike (peer properties, SASL PLAIN, tune, open, subscribe at ``first`` with
  credit, one credit back per chunk): every ``Deliver`` chunk's header parsed,
  its CRC checked, every entry cut out and decoded as an AMQP 1.0 message
  (message annotations, properties, application properties and the data
  section), so both sides hand over the same things: offset, type, body.

Prints messages per second for each and the ratio; with ``--profile``,
the top of a cProfile of the stream-protocol read.  The stream is deleted at
the end (``BENCH_STREAM_KEEP=1`` keeps it and prints its name;
``BENCH_STREAM_NAME=...`` reads an existing one instead of publishing).

Needs the ``rabbitmq_stream`` plugin: ``rabbitmq-plugins enable rabbitmq_stream``.
"""

from __future__ import annotations

import cProfile
import json
import os
import platform
import pstats
import struct
import sys
import time
import uuid
import zlib
from typing import Any, Callable, Dict, List, Optional, Tuple

import pika
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

MESSAGES = int(os.environ.get("BENCH_STREAM_MESSAGES", "1000000"))
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
STREAM_PORT = int(os.environ.get("BENCH_STREAM_PORT", "5552"))
CREDIT = int(os.environ.get("BENCH_STREAM_CREDIT", "100"))
"""Chunks the broker may send ahead; one more is granted for each chunk read."""


def broker_cpu() -> float:
    """CPU seconds the broker (beam.smp) has used so far (0 when it is not found)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if open(f"/proc/{pid}/comm").read().strip() == "beam.smp":
                    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:
                continue
    return 0.0


class Measured:
    """Wall time, this process's CPU and the broker's CPU over one read."""

    def __enter__(self) -> Measured:
        self.wall, self.cpu, self.broker = time.monotonic(), time.process_time(), broker_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.wall
        self.cpu = time.process_time() - self.cpu
        self.broker = broker_cpu() - self.broker

    def line(self, name: str, count: int) -> str:
        return (f"{name}: {count / self.wall:,.0f} msg/s; reader CPU {self.cpu / count * 1e6:.1f} us/msg"
                f" ({self.cpu / self.wall:.0%} of the wall time), broker CPU {self.broker:.1f}s")


def publish(stream: str, count: int) -> None:
    """``count`` writes as gradesvc publishes them; only the last waits for its confirm."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.queue_declare(stream, durable=True, arguments={"x-queue-type": "stream"})
    started = time.monotonic()
    for i in range(count):
        if i == count - 1:
            channel.confirm_delivery()
        body = json.dumps({"replica": "spike", "id": uuid.uuid4().hex, "at": 1764000000000 + i, "user_id": str(i),
                           "patch": {"postpaid_limit": i, "spp": 2 * i, "shipping_fee": 20, "return_fee": 29}},
                          separators=(",", ":")).encode()
        props = pika.BasicProperties(app_id="spike", message_id=f"spike:{i}", content_type="application/json",
                                     type="write", timestamp=1764000000 + i // 1000, delivery_mode=2)
        channel.basic_publish("", stream, body, props)
    connection.close()
    print(f"published {count:,} messages in {time.monotonic() - started:.1f}s", flush=True)


def delete(stream: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    connection.channel().queue_delete(stream)
    connection.close()


# --- pika, as gradesvc consumes ------------------------------------------------

async def read_with_pika(stream: str, count: int) -> float:
    parameters = pika.URLParameters(AMQP_URL)
    client = protocol.ClientCreator(reactor, TwistedProtocolConnection, parameters)
    connection = await client.connectTCP(parameters.host, parameters.port)
    await connection.ready
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=1000)
    queue, _ = await channel.basic_consume(stream, arguments={"x-stream-offset": "first"})
    seen = 0
    size = 0
    started = time.monotonic()
    while seen < count:
        message = await queue.get()
        batch = [message, *queue.pending]
        del queue.pending[:]
        for _, _method, properties, body in batch:
            offset = properties.headers["x-stream-offset"]
            if properties.type == "write":
                size += len(body)
            seen += 1
        channel.basic_ack(batch[-1][1].delivery_tag, multiple=True)
        await task.deferLater(reactor, 0, lambda: None)
    elapsed = time.monotonic() - started
    assert offset == count - 1 and size > 100 * count, (offset, size)
    connection.close()
    return count / elapsed


# --- the stream protocol ---------------------------------------------------------

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_CHUNK = struct.Struct(">bbHIqQQiIII")  # magic/version, type, entries, records, timestamp, epoch, first, crc, data, trailer, reserved

# AMQP 1.0 fixed-width format codes and their widths.
_FIXED = {0x40: 0, 0x41: 0, 0x42: 0, 0x43: 0, 0x44: 0, 0x45: 0, 0x50: 1, 0x51: 1, 0x52: 1, 0x53: 1, 0x54: 1,
          0x55: 1, 0x56: 1, 0x60: 2, 0x61: 2, 0x70: 4, 0x71: 4, 0x72: 4, 0x73: 4, 0x74: 4, 0x80: 8, 0x81: 8,
          0x82: 8, 0x83: 8, 0x84: 8, 0x94: 16, 0x98: 16}


def decode(data: bytes, pos: int) -> Tuple[Any, int]:
    """One AMQP 1.0 value at ``pos``: (value, next position)."""
    code = data[pos]
    pos += 1
    if code == 0x00:  # described: the descriptor, then the value
        _, pos = decode(data, pos)
        return decode(data, pos)
    if code in (0xa1, 0xa3):
        n = data[pos]
        return data[pos + 1:pos + 1 + n].decode("utf-8"), pos + 1 + n
    if code == 0xa0:
        n = data[pos]
        return data[pos + 1:pos + 1 + n], pos + 1 + n
    if code in (0xb1, 0xb3):
        n = _U32.unpack_from(data, pos)[0]
        return data[pos + 4:pos + 4 + n].decode("utf-8"), pos + 4 + n
    if code == 0xb0:
        n = _U32.unpack_from(data, pos)[0]
        return data[pos + 4:pos + 4 + n], pos + 4 + n
    if code in (0xc0, 0xc1, 0xd0, 0xd1):
        if code < 0xd0:
            count, pos = data[pos + 1], pos + 2
        else:
            count, pos = _U32.unpack_from(data, pos + 4)[0], pos + 8
        items = []
        for _ in range(count):
            item, pos = decode(data, pos)
            items.append(item)
        if code in (0xc1, 0xd1):
            return dict(zip(items[::2], items[1::2])), pos
        return items, pos
    if code == 0x45:
        return [], pos
    if code in (0x40, 0x41, 0x42):
        return (None, True, False)[code - 0x40], pos
    if code in (0x43, 0x44):
        return 0, pos
    if code in (0x50, 0x52, 0x53):
        return data[pos], pos + 1
    if code == 0x60:
        return _U16.unpack_from(data, pos)[0], pos + 2
    if code == 0x70:
        return _U32.unpack_from(data, pos)[0], pos + 4
    if code in (0x80, 0x81, 0x83):
        return struct.unpack_from(">q" if code != 0x80 else ">Q", data, pos)[0], pos + 8
    width = _FIXED.get(code)
    if width is None:
        raise ValueError(f"AMQP 1.0 format code 0x{code:02x} not handled")
    return data[pos:pos + width], pos + width


def message_sections(data: bytes) -> Dict[int, Any]:
    """An AMQP 1.0 message's sections by descriptor code, every one decoded (0x72 annotations,
    0x73 properties, 0x74 application properties, 0x75 data...): for looking, not for speed."""
    sections: Dict[int, Any] = {}
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] != 0x00 or data[pos + 1] != 0x53:
            raise ValueError("not an AMQP 1.0 section")
        code = data[pos + 2]
        sections[code], pos = decode(data, pos + 3)
    return sections


def skip(data: bytes, pos: int) -> int:
    """The position after the AMQP 1.0 value at ``pos``, without decoding it (compound values by their size)."""
    code = data[pos]
    if code in (0xc0, 0xc1, 0xe0, 0xa0, 0xa1, 0xa3):
        return pos + 2 + data[pos + 1]
    if code in (0xd0, 0xd1, 0xf0, 0xb0, 0xb1, 0xb3):
        return pos + 5 + _U32.unpack_from(data, pos + 1)[0]
    if code == 0x00:
        return skip(data, skip(data, pos + 1))
    return pos + 1 + _FIXED[code]


def gradesvc_view(data: bytes) -> Tuple[Optional[str], bytes]:
    """What gradesvc needs of a message: its 0.9.1 ``type`` and its body.

    Sections other than application properties and data are skipped by their
    size; the application properties (a small map) are decoded.
    """
    pos, end = 0, len(data)
    kind: Optional[str] = None
    body = b""
    while pos < end:
        code = data[pos + 2]
        pos += 3
        if code == 0x75:
            constructor = data[pos]
            if constructor == 0xa0:
                n = data[pos + 1]
                body, pos = data[pos + 2:pos + 2 + n], pos + 2 + n
            else:
                n = _U32.unpack_from(data, pos + 1)[0]
                body, pos = data[pos + 5:pos + 5 + n], pos + 5 + n
        elif code == 0x74:
            properties, pos = decode(data, pos)
            kind = properties.get("x-basic-type")
        else:
            pos = skip(data, pos)
    return kind, body


class StreamReader(protocol.Protocol):
    """Just enough of the stream protocol to subscribe and count what arrives."""

    def __init__(self, stream: str, count: int, on_message: Callable[[int, bytes], None]) -> None:
        self.stream = stream
        self.count = count
        self.on_message = on_message
        self.buffer = b""
        self.correlation = 0
        self.waiting: Dict[int, defer.Deferred[bytes]] = {}
        self.tuned: defer.Deferred[None] = defer.Deferred()
        self.done: defer.Deferred[float] = defer.Deferred()
        self.seen = 0
        self.chunks = 0
        self.started = 0.0

    def send(self, key: int, body: bytes, version: int = 1) -> None:
        frame = _U16.pack(key) + _U16.pack(version) + body
        self.transport.write(_U32.pack(len(frame)) + frame)  # type: ignore[union-attr]

    def request(self, key: int, body: bytes) -> defer.Deferred[bytes]:
        self.correlation += 1
        d: defer.Deferred[bytes] = defer.Deferred()
        self.waiting[self.correlation] = d
        self.send(key, _U32.pack(self.correlation) + body)
        return d

    @staticmethod
    def string(text: str) -> bytes:
        raw = text.encode()
        return _U16.pack(len(raw)) + raw

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        buffer = self.buffer
        pos = 0
        while len(buffer) - pos >= 4:
            size = _U32.unpack_from(buffer, pos)[0]
            if len(buffer) - pos - 4 < size:
                break
            self.frame(buffer[pos + 4:pos + 4 + size])
            pos += 4 + size
        self.buffer = buffer[pos:]

    def frame(self, frame: bytes) -> None:
        key = _U16.unpack_from(frame, 0)[0]
        if key == 0x0008:
            self.deliver(frame)
        elif key == 0x0003:
            self.frame_confirm(frame)
        elif key == 0x0014:  # tune: agree, then open
            self.send(0x0014, frame[4:12])
            self.tuned.callback(None)
        elif key & 0x8000:
            correlation = _U32.unpack_from(frame, 4)[0]
            code = _U16.unpack_from(frame, 8)[0]
            d = self.waiting.pop(correlation, None)
            if d is not None:
                if code != 1 and key != 0x8012:
                    d.errback(RuntimeError(f"response 0x{key:04x} code {code}"))
                else:
                    d.callback(frame[10:])
        elif key == 0x0017:
            self.send(0x0017, b"")

    def deliver(self, frame: bytes) -> None:
        # key, version, subscription id; then the osiris chunk.
        (_, kind, entries, records, _, _, first, crc, length, trailer, _) = _CHUNK.unpack_from(frame, 5)
        start = 5 + _CHUNK.size
        data = frame[start:start + length]
        if zlib.crc32(data) & 0xFFFFFFFF != crc & 0xFFFFFFFF:
            raise ValueError(f"chunk at {first}: CRC mismatch")
        self.send(0x0009, b"\x00" + _U16.pack(1))  # one more chunk, please
        if kind != 0:
            return
        pos, offset, on_message = 0, first, self.on_message
        for _ in range(entries):
            header = _U32.unpack_from(data, pos)[0]
            if header & 0x80000000:
                raise ValueError("sub-entry batches are not in this spike")
            size = header
            on_message(offset, data[pos + 4:pos + 4 + size])
            pos += 4 + size
            offset += 1
        self.seen += records
        self.chunks += 1
        if self.seen >= self.count and not self.done.called:
            self.done.callback(self.count / (time.monotonic() - self.started))

    def frame_confirm(self, frame: bytes) -> None:
        count = _U32.unpack_from(frame, 5)[0]
        self.confirmed += count
        if self.confirmed >= self.count and not self.done.called:
            self.done.callback(self.count / (time.monotonic() - self.started))

    async def open(self) -> None:
        await self.request(0x0011, _U32.pack(1) + self.string("product") + self.string("gradesvc spike"))
        await self.request(0x0012, b"")
        await self.request(0x0013, self.string("PLAIN") + _U32.pack(len(b"\x00guest\x00guest")) + b"\x00guest\x00guest")
        await self.tuned
        await self.request(0x0015, self.string("/"))

    async def publish_batched(self, batch: int) -> float:
        """Publish ``count`` messages, ``batch`` to a frame; fires once all are confirmed."""
        self.confirmed = 0
        await self.open()
        await self.request(0x0001, b"\x00" + _U16.pack(0) + self.string(self.stream))
        self.started = time.monotonic()
        sent = 0
        while sent < self.count:
            n = min(batch, self.count - sent)
            parts = [b"\x00", _U32.pack(n)]
            for i in range(sent, sent + n):
                message = amqp10_write(i)
                parts += (struct.pack(">Q", i), _U32.pack(len(message)), message)
            self.send(0x0002, b"".join(parts))
            sent += n
            if sent % (batch * 20) == 0:
                await task.deferLater(reactor, 0, lambda: None)  # let confirms in
        return await self.done

    async def run(self) -> float:
        await self.open()
        self.started = time.monotonic()
        await self.request(0x0007, b"\x00" + self.string(self.stream) + _U16.pack(1) + _U16.pack(CREDIT) + _U32.pack(0))
        return await self.done


def amqp10_write(i: int) -> bytes:
    """A gradesvc write as an AMQP 1.0 message: application properties (its type) and data."""
    body = json.dumps({"replica": "spike", "id": uuid.uuid4().hex, "at": 1764000000000 + i, "user_id": str(i),
                       "patch": {"postpaid_limit": i, "spp": 2 * i, "shipping_fee": 20, "return_fee": 29}},
                      separators=(",", ":")).encode()
    items = b"\xa1\x0cx-basic-type\xa1\x05write"
    return (b"\x00\x53\x74\xc1" + bytes([len(items) + 1, 2]) + items
            + b"\x00\x53\x75\xb0" + _U32.pack(len(body)) + body)


def publish_batched(stream: str, count: int, batch: int) -> defer.Deferred[float]:
    """``count`` writes over the stream protocol, ``batch`` to a Publish frame (big chunks)."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    connection.channel().queue_declare(stream, durable=True, arguments={"x-queue-type": "stream"})
    connection.close()
    writer = StreamReader(stream, count, lambda offset, message: None)

    async def go() -> float:
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", STREAM_PORT), writer)
        rate = await writer.publish_batched(batch)
        writer.transport.loseConnection()  # type: ignore[union-attr]
        return rate

    return defer.ensureDeferred(go())


async def read_with_stream_protocol(stream: str, count: int) -> float:
    seen = {"size": 0, "last": -1}

    def on_message(offset: int, message: bytes) -> None:
        kind, body = gradesvc_view(message)
        if kind == "write":
            seen["size"] += len(body)
        seen["last"] = offset

    reader = StreamReader(stream, count, on_message)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", STREAM_PORT), reader)
    rate = await reader.run()
    assert seen["last"] == count - 1 and seen["size"] > 100 * count, seen
    reader.transport.loseConnection()  # type: ignore[union-attr]
    print(f"  {reader.chunks:,} chunks, {count / reader.chunks:.1f} messages a chunk", flush=True)
    return rate


def show_one(stream: str) -> None:
    """Print the sections of the first message (the 0.9.1 → 1.0 mapping on this broker)."""
    shown: List[Dict[int, Any]] = []

    def on_message(offset: int, message: bytes) -> None:
        if not shown:
            shown.append(message_sections(message))

    reader = StreamReader(stream, 1, on_message)

    async def go() -> None:
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", STREAM_PORT), reader)
        await reader.run()
        reader.transport.loseConnection()  # type: ignore[union-attr]

    return defer.ensureDeferred(go()).addCallback(lambda _: print("first message's sections:", shown[0]))


async def main() -> None:
    given = os.environ.get("BENCH_STREAM_NAME")
    stream = given or f"spike_{uuid.uuid4().hex[:10]}"
    batch = int(os.environ.get("BENCH_STREAM_PUBLISH_BATCH", "0"))
    if not given and batch:
        rate = await publish_batched(stream, MESSAGES, batch)
        print(f"published {MESSAGES:,} messages over the stream protocol, {batch} a frame: {rate:,.0f} msg/s")
    elif not given:
        publish(stream, MESSAGES)
    try:
        await show_one(stream)
        print(f"{platform.python_implementation()} {platform.python_version()}", flush=True)
        rates: Dict[str, List[float]] = {"pika": [], "stream protocol": []}
        for _ in range(2):  # the second round is the one that counts on PyPy (JIT warm)
            with Measured() as measured:
                rates["pika"].append(await read_with_pika(stream, MESSAGES))
            print(measured.line("pika", MESSAGES), flush=True)
            profile = cProfile.Profile() if "--profile" in sys.argv else None
            if profile is not None:
                profile.enable()
            with Measured() as measured:
                rates["stream protocol"].append(await read_with_stream_protocol(stream, MESSAGES))
            if profile is not None:
                profile.disable()
                pstats.Stats(profile).sort_stats("tottime").print_stats(8)
            print(measured.line("stream protocol", MESSAGES), flush=True)
        pika_rate, stream_rate = rates["pika"][-1], rates["stream protocol"][-1]
        print(f"pika {pika_rate:,.0f} msg/s, stream protocol {stream_rate:,.0f} msg/s: {stream_rate / pika_rate:.1f}x")
    finally:
        if not given and not os.environ.get("BENCH_STREAM_KEEP"):
            delete(stream)
        elif not given:
            print("kept stream", stream)


if __name__ == "__main__":
    task.react(lambda _: defer.ensureDeferred(main()))
