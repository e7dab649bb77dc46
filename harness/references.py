"""``python -m harness.references STREAM COUNT FILLER``: publish once as each of COUNT publisher references,
then a FILLER-byte message (filling the segment) and one more (starting the next), and print the references the
broker still knows, as JSON.  Run in a process of its own: it runs a reactor."""

from __future__ import annotations

import json
import sys
from typing import List

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint

import txrabbitstream
from txrabbitstream import amqp10, frames


async def publish_one(client: txrabbitstream.StreamClient, reference: str, stream: str, body: bytes = b"{}") -> None:
    """One message as publisher ``reference`` ('' for none), confirmed."""
    await client.declare_publisher(1, reference, stream)
    confirmed: defer.Deferred[None] = defer.Deferred()
    client.on_confirm = lambda publisher, ids: None if confirmed.called else confirmed.callback(None)
    client.publish(1, [frames.simple_entry(1, amqp10.encode(body, {"x-basic-type": "probe"}))])
    await confirmed
    await client.delete_publisher(1)


async def kept(reactor: object, stream: str, count: int, filler: int) -> List[str]:
    client = await txrabbitstream.connect(TCP4ClientEndpoint(reactor, "127.0.0.1", 5552), "guest", "guest",
                                          clock=reactor)  # type: ignore[arg-type]
    try:
        references = [f"gradesvc-old-{n}" for n in range(count)]
        for reference in references:
            await publish_one(client, reference, stream)
        assert await client.query_publisher_sequence(references[0], stream) == 1  # known until a segment starts
        await publish_one(client, "", stream, b"x" * filler)
        await publish_one(client, "", stream)
        return [r for r in references if await client.query_publisher_sequence(r, stream)]
    finally:
        await client.close()


def main() -> None:
    stream, count, filler = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    task.react(lambda reactor: defer.ensureDeferred(kept(reactor, stream, count, filler)).addCallback(
        lambda found: print(json.dumps(found))))


if __name__ == "__main__":
    main()
