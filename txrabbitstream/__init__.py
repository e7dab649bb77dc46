"""A Twisted client of RabbitMQ's stream protocol (port 5552; 5551 over TLS).

Imports nothing of the project it was written for: Twisted, attrs and the
standard library only.  :mod:`~txrabbitstream.frames` builds and cuts frames,
:mod:`~txrabbitstream.chunk` reads osiris chunks (single records and sub-entry
batches, CRC-checked), :mod:`~txrabbitstream.amqp10` makes and reads the AMQP
1.0 messages a stream stores, :mod:`~txrabbitstream.protocol` is the
connection (:class:`StreamClient`), and :func:`connect` opens one over any
Twisted client endpoint.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import endpoints
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from txrabbitstream.chunk import Chunk, ChunkError
from txrabbitstream.protocol import (
    Broker,
    ConnectionClosedByBroker,
    ProtocolError,
    StreamClient,
    StreamError,
    StreamMetadata,
)

__all__ = ["Broker", "Chunk", "ChunkError", "ConnectionClosedByBroker", "ProtocolError", "StreamClient",
           "StreamError", "StreamMetadata", "connect"]


async def connect(endpoint: IStreamClientEndpoint, username: str, password: str, vhost: str = "/", *,
                  clock: IReactorTime, **options: Any) -> StreamClient:
    """A :class:`StreamClient` over ``endpoint``, once its virtual host is open."""
    client = StreamClient(username, password, vhost, clock=clock, **options)
    await endpoints.connectProtocol(endpoint, client)
    return await client.ready


