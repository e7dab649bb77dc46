"""The bucket store ``--buckets`` chooses, with the heartbeat and reports that go with it.

``memory``: this process's own buckets (:class:`MemoryBucketStore`); the
user database's heartbeat counts the other gateways, and a gateway that sees
some says its limits are per process (:class:`PerProcessLimits`).
``redis://...``: one budget in Redis over one link, its tokens leased in
blocks and spent locally (:class:`LeasedBucketStore`), or with
``--lease-length 0`` decided in Redis request by request
(:class:`RedisBucketStore`); Redis's own heartbeat counts the processes whose shares the ``local``
fallback hands out.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import attrs
from prometheus_client import CollectorRegistry

from lbsvc.limits.buckets import Buckets, IBucketStore, MemoryBucketStore
from lbsvc.limits.leases import LEASE_LENGTH, LeasedBucketStore
from lbsvc.limits.livegateways import DatabaseHeartbeat, LiveGateways, RedisHeartbeat
from lbsvc.limits.memorylimits import PerProcessLimits
from lbsvc.limits.redisbuckets import RedisBucketStore
from lbsvc.limits.redislink import RedisLink
from lbsvc.users.database import IUserDatabase


@attrs.define
class Limits:
    """Who decides the buckets, and what the cluster looks like to this process."""

    store: IBucketStore
    live: LiveGateways
    """The heartbeat: how many gateway processes share these users."""
    report: Callable[[], Dict[str, Any]]
    """``/ready``'s and ``/status``'s ``limits``."""
    multiplied: Callable[[], int]
    """1 while other gateways keep their own memory buckets for the same users."""
    redis_up: Callable[[], Optional[bool]]
    """Whether Redis decides now (None without Redis)."""
    link: Optional[RedisLink] = None
    """The Redis connection (a service to start), or None."""


def choose_limits(buckets_option: str, fallback: str, redis_timeout: float, buckets: Buckets,
                  database: IUserDatabase, registry: CollectorRegistry, reactor: Any,
                  lease_length: float = LEASE_LENGTH) -> Limits:
    """The limits ``--buckets`` names (``memory`` or a Redis URL), with blocks leased for ``lease_length``
    seconds (0: Redis decides every request)."""
    if buckets_option == "memory":
        per_process = PerProcessLimits()
        live = LiveGateways(DatabaseHeartbeat(database, reactor), reactor, on_count=per_process.counted)
        return Limits(MemoryBucketStore(buckets), live, per_process.report,
                      lambda: int(per_process.multiplied), lambda: None)
    link = RedisLink(reactor, buckets_option)
    store: RedisBucketStore
    if lease_length:
        store = LeasedBucketStore(link.address.describe(), buckets, fallback, redis_timeout, reactor, registry,
                                  link, lease_length)
    else:
        store = RedisBucketStore(link.address.describe(), buckets, fallback, redis_timeout, reactor, registry, link)
    live = LiveGateways(RedisHeartbeat(link), reactor, on_count=store.share.set_live)

    def report() -> Dict[str, Any]:
        body: Dict[str, Any] = {"buckets": "redis", "mode": store.mode, "gateways": live.count}
        if isinstance(store, LeasedBucketStore):
            body["leases"] = store.lease_report()
        if link.refusal is not None:
            body["refused"] = link.refusal
        return body

    return Limits(store, live, report, lambda: 0, lambda: store.up, link)
