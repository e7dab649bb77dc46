"""The write port: ``POST /set``, one write or an array of them.

A write is validated, published to the stream with a publisher confirm, and
answered only once this replica has consumed and applied its own message:
``200 {"Result":"OK"}`` with ``X-Stream-Offset``, the offset the stream gave
it.  The write is then in the stream before any write published after the
answer, so real-time order holds across replicas whatever their clocks, and
the client reads it back at once here (and anywhere with ``min_offset``).

A body that is a JSON array (1 to 10,000 objects, at most
:data:`MAX_BATCH_BODY` bytes; any other body at most :data:`MAX_BODY`,
decided by its first byte before the rest is read) is validated element by
element, the first bad one refusing the whole array with its index; a good
array is published as one message, so it is applied in one step everywhere.

A write whose stream is deleted under it is answered 503 "not written",
never "durable": the stream that took it is gone.

Every path of this port needs the admin's credentials, checked before the
body is read; only ``/set`` exists.
"""

from __future__ import annotations

import uuid
from typing import Callable

from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.web import server

from gradesvc.state.phase import ReplicaStatus
from gradesvc.stream.link import BrokerUnavailable, IBroker, StreamDeleted
from gradesvc.stream.messages import InvalidWrite, batch_of, outgoing, parse_writes
from gradesvc.stream.progress import StreamProgress
from svckit.responses import HTTPError, JSONResponse, unavailable
from svckit.web import Guard, Route, Router, read_json_value

MAX_BODY = 64 * 1024
MAX_BATCH_BODY = 1_000_000
"""A bulk ``/set``'s body: it travels as one message, which must fit one stream-protocol frame (1 MiB)."""
WRITE_TIMEOUT = 5.0
NOT_WRITTEN = "not written: the stream was deleted under the write; send it again"


class WriteAPI:
    """``POST /set``: a partial, merged, replicated write (or an array of them)."""

    def __init__(
        self,
        replica_id: str,
        broker: IBroker,
        status: ReplicaStatus,
        progress: StreamProgress,
        wall: Callable[[], float],
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self.replica_id = replica_id
        self.broker = broker
        self.status = status
        self.progress = progress
        self.wall = wall
        self.write_timeout = write_timeout

    async def set(self, request: server.Request) -> JSONResponse:
        """Validate, publish with confirm, wait until applied here, answer."""
        try:
            writes = parse_writes(read_json_value(request))
        except InvalidWrite as e:
            raise HTTPError(400, str(e)) from None
        if not self.status.ready:
            raise self.status.not_ready()
        message = batch_of(self.replica_id, uuid.uuid4().hex, int(self.wall() * 1000), writes)
        applied = self.progress.expect_write(message.message_id)
        try:
            await self.broker.publish(outgoing(message))
        except StreamDeleted:
            self.progress.forget_write(applied)
            raise unavailable(NOT_WRITTEN) from None
        except BrokerUnavailable as e:
            self.progress.forget_write(applied)
            raise unavailable(str(e)) from None
        except BaseException:
            self.progress.forget_write(applied)
            raise
        try:
            offset = await self.progress.own_write(applied, self.write_timeout)
        except StreamDeleted:
            raise unavailable(NOT_WRITTEN) from None
        except defer.TimeoutError:
            raise unavailable(
                f"the write is durable in the stream but not yet applied on this replica"
                f" (waited {self.write_timeout:g}s); it will be applied everywhere"
            ) from None
        return JSONResponse({"Result": "OK"}, headers={"X-Stream-Offset": str(offset)})


def write_router(api: WriteAPI, guard: Guard, registry: CollectorRegistry) -> Router:
    """The write port: ``/set`` behind ``guard``, for every path."""
    return Router(
        {b"/set": Route("set", {b"POST": api.set}, max_body=MAX_BODY, max_array_body=MAX_BATCH_BODY)},
        registry=registry,
        prefix="gradesvc_write",
        guard=guard,
        max_body=MAX_BODY,
    )
