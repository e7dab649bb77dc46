"""The write port: ``POST /set``.

A write is validated, stamped with the replica's hybrid logical clock, published
to the stream, and applied locally only after the broker confirmed it; then the
client gets ``200 {"Result":"OK"}`` and reads its write back at once.  Every
path of this port needs the admin's credentials, checked before the body is
read; only ``/set`` exists.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry
from twisted.web import server

from gradesvc.broker import BrokerUnavailable, Publisher
from gradesvc.hlc import HybridLogicalClock
from gradesvc.messages import InvalidWrite, WriteMessage, parse_write, write_properties
from gradesvc.status import ReplicaStatus
from gradesvc.storage import GradeStore
from svckit.responses import HTTPError, JSONResponse, unavailable
from svckit.web import Guard, Route, Router, read_json

MAX_BODY = 64 * 1024


class WriteAPI:
    """``POST /set``: a partial, merged, replicated write."""

    def __init__(
        self,
        store: GradeStore,
        hlc: HybridLogicalClock,
        replica_id: str,
        broker: Publisher,
        status: ReplicaStatus,
        wall: Callable[[], float],
    ) -> None:
        self.store = store
        self.hlc = hlc
        self.replica_id = replica_id
        self.broker = broker
        self.status = status
        self.wall = wall

    async def set(self, request: server.Request) -> JSONResponse:
        """Validate, publish with confirm, apply, answer."""
        try:
            write = parse_write(read_json(request))
        except InvalidWrite as e:
            raise HTTPError(400, str(e)) from None
        if not self.status.ready:
            raise self.status.not_ready()
        message = WriteMessage(self.replica_id, self.hlc.now(), write)
        try:
            await self.broker.publish(message.encode(), write_properties(message, self.wall()))
        except BrokerUnavailable as e:
            raise unavailable(str(e)) from None
        self.store.apply_patch(write.user_id, write.patch, message.timestamp, self.replica_id)
        return JSONResponse({"Result": "OK"})


def write_router(api: WriteAPI, guard: Guard, registry: CollectorRegistry) -> Router:
    """The write port: ``/set`` behind ``guard``, for every path."""
    return Router(
        {b"/set": Route("set", {b"POST": api.set}, max_body=MAX_BODY)},
        registry=registry,
        prefix="gradesvc_write",
        guard=guard,
        max_body=MAX_BODY,
    )
