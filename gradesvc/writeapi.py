"""The write port: ``POST /set``.

A write is validated, stamped with the replica's hybrid logical clock, published
to the stream, and applied locally only after the broker confirmed it; then the
client gets ``200 {"Result":"OK"}`` and reads its write back at once.
"""

from __future__ import annotations

from twisted.web import resource
from twisted.web.iweb import IRequest

from gradesvc.broker import BrokerService, BrokerUnavailable
from gradesvc.hlc import HybridLogicalClock
from gradesvc.messages import InvalidWrite, WriteMessage, parse_write
from gradesvc.replication import write_properties
from gradesvc.status import ReplicaStatus
from gradesvc.storage import GradeStore
from svckit.jsonweb import HTTPError, JSONResource, JSONRoot, JSONResponse, read_json_object
from svckit.metrics import Registry

MAX_BODY = 64 * 1024


class SetResource(JSONResource):
    """``POST /set``: a partial, merged, replicated write."""

    def __init__(
        self,
        store: GradeStore,
        hlc: HybridLogicalClock,
        replica_id: str,
        broker: BrokerService,
        status: ReplicaStatus,
        registry: Registry,
    ) -> None:
        super().__init__()
        self.store = store
        self.hlc = hlc
        self.replica_id = replica_id
        self.broker = broker
        self.status = status
        self._writes = registry.counter(
            "gradesvc_writes_total", "POST /set requests by outcome.", ("outcome",)
        )

    async def render_POST(self, request: IRequest) -> JSONResponse:
        """Validate, publish with confirm, apply, answer."""
        try:
            try:
                write = parse_write(read_json_object(request, MAX_BODY))
            except InvalidWrite as e:
                raise HTTPError(400, str(e))
            if not self.status.ready:
                raise HTTPError(
                    503,
                    f"replica not ready (phase {self.status.phase},"
                    f" broker {'up' if self.status.connected else 'down'})",
                    {"Retry-After": "1"},
                )
            message = WriteMessage(self.replica_id, self.hlc.now(), write)
            try:
                await self.broker.publish(message.encode(), write_properties(message))
            except BrokerUnavailable as e:
                raise HTTPError(503, str(e), {"Retry-After": "1"})
        except HTTPError as e:
            self._writes.inc(outcome=str(e.code))
            raise
        self.store.apply_patch(write.user_id, write.patch, message.timestamp, self.replica_id)
        self._writes.inc(outcome="200")
        return JSONResponse({"Result": "OK"})


def write_root(set_resource: resource.Resource) -> resource.Resource:
    """The resource tree behind authentication: just ``/set``."""
    root = JSONRoot()
    root.putChild(b"set", set_resource)
    return root
