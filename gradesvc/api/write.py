"""The write port: ``POST /set``.

A write is validated, published to the stream with a publisher confirm, and
answered only once this replica has consumed and applied its own message:
``200 {"Result":"OK"}`` with ``X-Stream-Offset``, the offset the stream gave
it.  The write is then in the stream before any write published after the
answer, so real-time order holds across replicas whatever their clocks, and
the client reads it back at once here (and anywhere with ``min_offset``).

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
from gradesvc.stream.broker import BrokerUnavailable, Publisher
from gradesvc.stream.messages import InvalidWrite, WriteMessage, parse_write, write_properties
from gradesvc.stream.progress import StreamProgress
from svckit.responses import HTTPError, JSONResponse, unavailable
from svckit.web import Guard, Route, Router, read_json

MAX_BODY = 64 * 1024
WRITE_TIMEOUT = 5.0


class WriteAPI:
    """``POST /set``: a partial, merged, replicated write."""

    def __init__(
        self,
        replica_id: str,
        broker: Publisher,
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
            write = parse_write(read_json(request))
        except InvalidWrite as e:
            raise HTTPError(400, str(e)) from None
        if not self.status.ready:
            raise self.status.not_ready()
        message = WriteMessage(self.replica_id, uuid.uuid4().hex, int(self.wall() * 1000), write)
        applied = self.progress.expect_write(message.message_id)
        try:
            await self.broker.publish(message.encode(), write_properties(message))
        except BrokerUnavailable as e:
            self.progress.forget_write(applied)
            raise unavailable(str(e)) from None
        except BaseException:
            self.progress.forget_write(applied)
            raise
        try:
            offset = await self.progress.own_write(applied, self.write_timeout)
        except defer.TimeoutError:
            raise unavailable(
                f"the write is durable in the stream but not yet applied on this replica"
                f" (waited {self.write_timeout:g}s); it will be applied everywhere"
            ) from None
        return JSONResponse({"Result": "OK"}, headers={"X-Stream-Offset": str(offset)})


def write_router(api: WriteAPI, guard: Guard, registry: CollectorRegistry) -> Router:
    """The write port: ``/set`` behind ``guard``, for every path."""
    return Router(
        {b"/set": Route("set", {b"POST": api.set}, max_body=MAX_BODY)},
        registry=registry,
        prefix="gradesvc_write",
        guard=guard,
        max_body=MAX_BODY,
    )
