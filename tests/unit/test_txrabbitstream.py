"""txrabbitstream in memory: frames and chunks built and parsed under hypothesis, the connection on a
StringTransport against a scripted broker (handshake, requests, publishing, subscriptions, heartbeats)."""

from __future__ import annotations

import struct
import zlib
from typing import Any, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, error, task
from twisted.internet.testing import StringTransport

from txrabbitstream import amqp10, frames
from txrabbitstream.chunk import COMPRESSION_GZIP, USER, ChunkError, build_chunk, parse_chunk
from txrabbitstream.frames import FrameError, FrameReader, Reader
from txrabbitstream.protocol import ConnectionClosedByBroker, ProtocolError, StreamClient, StreamError

records = st.binary(min_size=0, max_size=300)
entries = st.lists(st.lists(records, min_size=1, max_size=20), min_size=1, max_size=30)


# --- chunks ------------------------------------------------------------------------

@given(entries=entries, first=st.integers(0, 2**40), gzip=st.booleans(), filter_size=st.sampled_from([0, 16]))
def test_every_record_of_every_entry_comes_back_in_order(entries: List[List[bytes]], first: int, gzip: bool,
                                                        filter_size: int) -> None:
    compression = COMPRESSION_GZIP if gzip else 0
    chunk = parse_chunk(build_chunk(first, entries, compression=compression, filter_size=filter_size,
                                    trailer=b"tracking"))
    flat = [r for entry in entries for r in entry]
    assert chunk.kind == USER and chunk.first_offset == first and chunk.records == flat
    assert chunk.record_count == len(flat) and chunk.next_offset == first + len(flat)


@given(entries=entries, cut=st.integers(1, 10_000))
def test_a_truncated_chunk_is_refused_whole(entries: List[List[bytes]], cut: int) -> None:
    data = build_chunk(7, entries)
    with pytest.raises(ChunkError):
        parse_chunk(data[:max(0, len(data) - cut)])


@given(entries=entries, flip=st.integers(0, 10_000))
def test_a_flipped_data_byte_fails_the_crc(entries: List[List[bytes]], flip: int) -> None:
    data = bytearray(build_chunk(7, entries))
    position = 48 + flip % (len(data) - 48)
    data[position] ^= 0x01
    with pytest.raises(ChunkError, match="CRC"):
        parse_chunk(bytes(data))


def test_records_that_do_not_add_up_are_refused() -> None:
    data = bytearray(build_chunk(0, [[b"a"], [b"b", b"c"]]))
    struct.pack_into(">I", data, 4, 4)  # the header claims 4 records; there are 3
    with pytest.raises(ChunkError, match="holds 3 records"):
        parse_chunk(bytes(data))
    bad = bytearray(build_chunk(0, [[b"x", b"y"]]))
    bad[48] = 0x80 | (3 << 4)  # lz4: not read here; the CRC is over the data, so fix it
    struct.pack_into(">I", bad, 32, zlib.crc32(bytes(bad[48:])))
    with pytest.raises(ChunkError, match="lz4"):
        parse_chunk(bytes(bad))


def test_tracking_chunks_occupy_offsets_but_hold_no_records() -> None:
    chunk = parse_chunk(build_chunk(10, [[b"\x00\x03abc" + b"\x00" * 16]], kind=2))
    assert chunk.kind == 2 and chunk.records == [] and chunk.next_offset == 11


# --- frames ----------------------------------------------------------------------------

@given(messages=st.lists(records, min_size=1, max_size=50), splits=st.lists(st.integers(1, 64), max_size=40))
def test_frames_survive_any_split_of_the_byte_stream(messages: List[bytes], splits: List[int]) -> None:
    wire = b"".join(frames.command(frames.HEARTBEAT, m) for m in messages)
    reader, got, position = FrameReader(), [], 0
    for size in splits + [len(wire)]:
        got += reader.feed(wire[position:position + size])
        position += size
    assert [f[4:] for f in got] == messages and reader.pending == 0


def test_a_frame_over_the_agreed_size_or_without_a_key_is_refused() -> None:
    with pytest.raises(FrameError, match="over the 100 agreed"):
        FrameReader(100).feed(struct.pack(">I", 101))
    with pytest.raises(FrameError, match="no key"):
        FrameReader().feed(struct.pack(">I", 2) + b"ab")
    with pytest.raises(FrameError):
        Reader(b"\x00\x01", 0).u32()


@given(batch=st.lists(st.lists(records, min_size=1, max_size=5), min_size=1, max_size=40),
       frame_max=st.integers(600, 5000))
def test_publishes_are_packed_in_order_within_the_frame_size(batch: List[List[bytes]], frame_max: int) -> None:
    built = [frames.sub_entry(i + 1, m) if len(m) > 1 else frames.simple_entry(i + 1, m[0])
             for i, m in enumerate(batch)]
    if any(len(e) + frames.PUBLISH_OVERHEAD > frame_max for e in built):
        with pytest.raises(FrameError):
            frames.pack_publishes(1, built, frame_max)
        return
    packed = frames.pack_publishes(1, built, frame_max)
    seen: List[bytes] = []
    for frame in packed:
        assert len(frame) <= frame_max
        reader = Reader(frame, 8)
        assert reader.u8() == 1
        for _ in range(reader.u32()):
            publishing_id = reader.u64()
            header = reader.u32()
            if header & 0x80000000:
                reader.position -= 4
                reader.u8()
                count, _size, size = reader.u16(), reader.u32(), reader.u32()
                body = Reader(reader.raw(size))
                seen.append(b"|".join(body.raw(body.u32()) for _ in range(count)))
            else:
                seen.append(reader.raw(header))
            assert publishing_id == len(seen)
    assert seen == [b"|".join(m) for m in batch]


# --- AMQP 1.0 ---------------------------------------------------------------------------

@given(body=st.binary(max_size=600), properties=st.dictionaries(st.text(max_size=20), st.text(max_size=300),
                                                                max_size=5))
def test_messages_round_trip(body: bytes, properties: dict) -> None:
    assert amqp10.decode(amqp10.encode(body, properties)) == (properties, body)


def test_a_091_publishers_message_is_read_for_its_type_and_body() -> None:
    # As RabbitMQ 3.10 stores a pika publish: header, properties, application properties, data.
    header = b"\x00\x53\x70\xc0\x02\x01\x41"
    props = b"\x00\x53\x73\xc0\x0d\x03\xa1\x03m-1\x40\xa3\x04json"
    app = b"\x00\x53\x74\xc1\x16\x02\xa1\x0cx-basic-type\xa1\x05write"
    assert amqp10.decode(header + props + app + amqp10.data(b"{}")) == ({"x-basic-type": "write"}, b"{}")
    with pytest.raises(amqp10.MessageError):
        amqp10.decode(b"\x00\x53\x75\xa0\x09abc")


# --- the connection ------------------------------------------------------------------------

class Broker:
    """The broker's side of one connection: what the client wrote, and answers."""

    def __init__(self, **options: Any) -> None:
        self.clock = task.Clock()
        self.client = StreamClient("guest", "secret", "/v", clock=self.clock, **options)
        self.transport = StringTransport()
        self.reader = FrameReader()
        self.client.makeConnection(self.transport)

    def sent(self) -> List[Tuple[int, Reader]]:
        got = self.reader.feed(self.transport.value())
        self.transport.clear()
        return [(frames.head(f)[0], Reader(f, 4)) for f in got]

    def answer(self, key: int, correlation: int, code: int = frames.OK, rest: bytes = b"") -> None:
        self.client.dataReceived(frames.request(key | frames.RESPONSE, correlation, struct.pack(">H", code) + rest))

    def open(self, frame_max: int = 1 << 20, heartbeat: int = 60) -> None:
        (key, r), = self.sent()
        assert key == frames.PEER_PROPERTIES
        self.answer(key, r.u32(), rest=frames.properties({"version": "3.10.8"}))
        (key, r), = self.sent()
        assert key == frames.SASL_HANDSHAKE
        self.answer(key, r.u32(), rest=struct.pack(">I", 1) + frames.string("PLAIN"))
        (key, r), = self.sent()
        correlation = r.u32()
        assert key == frames.SASL_AUTHENTICATE and r.string() == "PLAIN" and r.bytes_() == b"\x00guest\x00secret"
        self.answer(key, correlation)
        self.client.dataReceived(frames.tune(frame_max, heartbeat))
        (key, r), (key2, r2) = self.sent()
        assert key == frames.TUNE
        assert key2 == frames.OPEN and r2.u32() and r2.string() == "/v"
        self.answer(frames.OPEN, 4, rest=frames.properties({}))


def test_the_handshake_agrees_on_the_smaller_limits_and_opens_the_vhost() -> None:
    b = Broker(frame_max=65536, heartbeat=10)
    assert not b.client.ready.called
    b.open(frame_max=1 << 20, heartbeat=60)
    assert b.client.ready.called and (b.client.frame_max, b.client.heartbeat) == (65536, 10)
    chunks: List[Any] = []
    defer.ensureDeferred(b.client.subscribe(0, "s", chunks.append))
    (key, r), = b.sent()
    b.answer(key, r.u32())
    big = build_chunk(0, [[b"x" * 60_000] * 3])  # a chunk (and so a Deliver) over the agreed 64 KiB
    b.client.dataReceived(frames.command(frames.DELIVER, b"\x00" + big))
    assert [len(c.records) for c in chunks] == [3] and not b.transport.disconnecting
    assert b.client.server_properties == {"version": "3.10.8"}


def test_a_refused_login_fails_ready_and_drops_the_connection() -> None:
    b = Broker()
    (key, r), = b.sent()
    b.answer(key, r.u32(), rest=frames.properties({}))
    (key, r), = b.sent()
    b.answer(key, r.u32(), rest=struct.pack(">I", 1) + frames.string("PLAIN"))
    (key, r), = b.sent()
    b.answer(key, r.u32(), frames.AUTHENTICATION_FAILURE)
    failure = b.client.ready
    assert isinstance(failure.result.value, StreamError) and "authentication failure" in str(failure.result.value)
    failure.addErrback(lambda _: None)
    assert b.transport.disconnecting


def test_requests_are_answered_by_correlation_and_errors_are_stream_errors() -> None:
    b = Broker()
    b.open()
    created = defer.ensureDeferred(b.client.create("s", {"max-age": "1h"}))
    again = defer.ensureDeferred(b.client.create("s"))
    sequence = defer.ensureDeferred(b.client.query_publisher_sequence("ref", "s"))
    gone = defer.ensureDeferred(b.client.delete("t"))
    (k1, r1), (k2, r2), (k3, r3), (k4, r4) = b.sent()
    assert (k1, r1.u32(), r1.string(), r1.properties()) == (frames.CREATE, r1.data and 5, "s", {"max-age": "1h"})
    b.answer(k3, r3.u32(), rest=struct.pack(">Q", 41))  # answers in any order
    b.answer(k2, r2.u32(), frames.STREAM_ALREADY_EXISTS)
    b.answer(k1, 5)
    b.answer(k4, r4.u32(), frames.STREAM_DOES_NOT_EXIST)
    assert created.result is True and again.result is False and sequence.result == 41
    assert isinstance(gone.result.value, StreamError) and gone.result.value.code == frames.STREAM_DOES_NOT_EXIST
    gone.addErrback(lambda _: None)


def test_metadata_names_leaders_and_replicas() -> None:
    b = Broker()
    b.open()
    asked = defer.ensureDeferred(b.client.metadata(["s", "missing"]))
    (_key, r), = b.sent()
    correlation = r.u32()
    brokers = struct.pack(">I", 2) + struct.pack(">H", 0) + frames.string("n1") + struct.pack(">I", 5552) \
        + struct.pack(">H", 1) + frames.string("n2") + struct.pack(">I", 5553)
    streams = struct.pack(">I", 2) + frames.string("s") + struct.pack(">HH", frames.OK, 1) + struct.pack(">IH", 1, 0) \
        + frames.string("missing") + struct.pack(">HH", frames.STREAM_DOES_NOT_EXIST, 0) + struct.pack(">I", 0)
    b.client.dataReceived(frames.request(frames.METADATA | frames.RESPONSE, correlation, brokers + streams))
    found = asked.result
    assert found["s"].leader.port == 5553 and [n.host for n in found["s"].replicas] == ["n1"]
    assert found["missing"].leader is None


def test_confirms_and_errors_come_as_lists_of_ids() -> None:
    b = Broker()
    b.open(frame_max=200)
    confirmed: List[Tuple[int, List[int]]] = []
    refused: List[Tuple[int, List[Tuple[int, int]]]] = []
    b.client.on_confirm = lambda p, ids: confirmed.append((p, ids))
    b.client.on_publish_error = lambda p, errors: refused.append((p, errors))
    assert b.client.publish(3, [frames.simple_entry(n, b"x" * 60) for n in range(1, 5)]) == 2  # 200-byte frames
    assert [k for k, _ in b.sent()] == [frames.PUBLISH, frames.PUBLISH]
    b.client.dataReceived(frames.command(frames.PUBLISH_CONFIRM, b"\x03" + struct.pack(">IQQ", 2, 1, 2)))
    b.client.dataReceived(frames.command(frames.PUBLISH_ERROR, b"\x03" + struct.pack(">IQH", 1, 3, 0x12)))
    assert confirmed == [(3, [1, 2])] and refused == [(3, [(3, 0x12)])]


def test_a_subscription_gets_chunks_and_grants_credit_itself() -> None:
    b = Broker()
    b.open()
    chunks: List[Any] = []
    subscribed = defer.ensureDeferred(b.client.subscribe(2, "s", chunks.append, offset=10, credit=3))
    (key, r), = b.sent()
    correlation = r.u32()
    assert (key, r.u8(), r.string(), r.u16(), r.u64(), r.u16()) == (frames.SUBSCRIBE, 2, "s", frames.OFFSET_AT, 10, 3)
    b.answer(key, correlation)
    assert subscribed.called
    b.client.dataReceived(frames.command(frames.DELIVER, b"\x02" + build_chunk(8, [[b"a"], [b"b", b"c"]])))
    b.client.dataReceived(frames.command(frames.DELIVER, b"\x09" + build_chunk(8, [[b"not ours"]])))
    assert [c.records for c in chunks] == [[b"a", b"b", b"c"]]
    b.client.credit(2, 1)
    (key, r), = b.sent()
    assert (key, r.u8(), r.u16()) == (frames.CREDIT, 2, 1)


def test_a_corrupt_chunk_closes_the_connection_and_fails_what_waits(logged_errors: Any) -> None:
    b = Broker()
    b.open()
    defer.ensureDeferred(b.client.subscribe(0, "s", lambda c: pytest.fail("a corrupt chunk was handed out"),
                                            offset=0))
    (key, r), = b.sent()
    b.answer(key, r.u32())
    waiting = defer.ensureDeferred(b.client.delete("s"))
    chunk = bytearray(build_chunk(0, [[b"abc"]]))
    chunk[-1] ^= 0xFF
    b.client.dataReceived(frames.command(frames.DELIVER, b"\x00" + bytes(chunk)))
    assert b.transport.disconnecting or b.transport.disconnected
    b.client.connectionLost(error.ConnectionDone())  # type: ignore[arg-type]
    assert isinstance(waiting.result.value, ProtocolError)
    waiting.addErrback(lambda _: None)
    assert isinstance(b.client.lost.result, ProtocolError)
    assert len(logged_errors.flush()) == 1


def test_heartbeats_are_sent_and_a_silent_broker_is_dropped(logged_errors: Any) -> None:
    b = Broker(heartbeat=5)
    b.open(heartbeat=5)
    b.clock.advance(5)
    assert [k for k, _ in b.sent()] == [frames.HEARTBEAT]
    b.client.dataReceived(frames.heartbeat())
    b.clock.advance(5)
    assert [k for k, _ in b.sent()] == [frames.HEARTBEAT] and not b.transport.disconnecting
    b.clock.advance(10)
    assert b.transport.disconnecting or b.transport.disconnected
    logged_errors.flush()


def test_the_broker_closing_is_answered_and_its_reason_kept() -> None:
    b = Broker()
    b.open()
    b.client.dataReceived(frames.request(frames.CLOSE, 9, struct.pack(">H", 0x0F) + frames.string("shutdown")))
    (key, r), = b.sent()
    assert key == frames.CLOSE | frames.RESPONSE and r.u32() == 9 and r.u16() == frames.OK
    b.client.connectionLost(error.ConnectionDone())  # type: ignore[arg-type]
    lost = b.client.lost.result
    assert isinstance(lost, ConnectionClosedByBroker) and lost.reason == "shutdown"


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 200))
def test_a_response_cut_short_is_a_protocol_error_never_a_wrong_value(cut: int, logged_errors: Any) -> None:
    b = Broker()
    b.open()
    asked = defer.ensureDeferred(b.client.query_publisher_sequence("ref", "s"))
    (key, r), = b.sent()
    whole = struct.pack(">HHIHQ", key | frames.RESPONSE, 1, r.u32(), frames.OK, 77)
    part = whole[:min(cut, len(whole) - 1)] if cut < len(whole) else whole
    b.client.dataReceived(struct.pack(">I", len(part)) + part)
    if part == whole:
        assert asked.result == 77
    else:
        assert b.transport.disconnecting or b.transport.disconnected  # the connection is dropped
        assert not asked.called
        [event] = logged_errors.flush()
        assert "closing the connection" in event["log_format"]
