"""Streams on the shared RabbitMQ: a name per test, declared small, read back, deleted."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, List, Tuple

import pika

BROKER_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def unique_stream() -> str:
    """A stream name no other test or run uses."""
    return f"test_grades_{uuid.uuid4().hex[:12]}"


def delete_stream(name: str, url: str = BROKER_URL) -> None:
    """Delete a test stream (every run on the machine shares the broker)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_delete(name)
    finally:
        connection.close()


def read_stream(name: str, count: int, url: str = BROKER_URL, timeout: float = 10.0) -> List[Tuple[int, Any, bytes]]:
    """Read the first ``count`` messages of a stream: (offset, properties, body)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    out: List[Tuple[int, Any, bytes]] = []
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=100)
        deadline = time.monotonic() + timeout
        for method, properties, body in channel.consume(
            name, arguments={"x-stream-offset": "first"}, inactivity_timeout=0.5
        ):
            if method is not None:
                out.append((properties.headers["x-stream-offset"], properties, body))
                channel.basic_ack(method.delivery_tag)
            if len(out) >= count or time.monotonic() > deadline:
                break
        channel.cancel()
    finally:
        connection.close()
    return out


def tiny_stream(stream: str, max_bytes: int, segment: int) -> None:
    """Declare ``stream`` with small retention and segments, to make retention happen in a test."""
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    connection.channel().queue_declare(stream, durable=True, arguments={
        "x-queue-type": "stream", "x-max-length-bytes": max_bytes,
        "x-stream-max-segment-size-bytes": segment,
    })
    connection.close()


def publisher_references_kept(stream: str, count: int, segment_filler: int = 60_000) -> List[str]:
    """Publish once as each of ``count`` publisher references, fill the segment and start the next one, and
    return the references the broker still knows (a stream-protocol client, in a process of its own)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "harness.references", stream, str(count), str(segment_filler)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    kept: List[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return kept
