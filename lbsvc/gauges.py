"""The gateway's gauges on ``/metrics``, read from its parts at scrape time."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry

from lbsvc.backends.pool import BackendPool
from lbsvc.limits.buckets import Buckets
from lbsvc.limits.livegateways import LiveGateways
from lbsvc.limits.redisbuckets import RedisBucketStore
from lbsvc.users.store import UserStore
from svckit.metrics import CallbackGauges
from svckit.readiness import Readiness


def gateway_gauges(registry: CollectorRegistry, users: UserStore, buckets: Buckets, pool: BackendPool,
                   readiness: Readiness, clock: Any) -> CallbackGauges:
    """Register the gauges of users, buckets, backends and readiness; the gauges, for more."""
    gauges = CallbackGauges(registry)
    gauges.add("lbsvc_users", "Users known.", lambda: len(users))
    gauges.add("lbsvc_user_changes_applied", "Position in the user change log up to which this process has"
               " applied every change (all gateways reach the same).", lambda: users.applied)
    gauges.add("lbsvc_buckets_refilling", "Token buckets that are not full.", lambda: buckets.refilling)
    gauges.add("lbsvc_backend_up", "1 when a backend is in rotation.",
               lambda: {(b.name,): int(b.healthy) for b in pool.backends}, ["backend"])
    gauges.add("lbsvc_backend_ejected", "1 while a passive failure keeps a backend out.",
               lambda: {(b.name,): int(b.ejected_until > clock.seconds()) for b in pool.backends}, ["backend"])
    gauges.add("lbsvc_backends_panic", "1 while under the panic threshold: all backends in rotation.",
               lambda: int(pool.panicking))
    gauges.add("lbsvc_backend_in_flight", "Requests in flight per backend.",
               lambda: {(b.name,): b.in_flight for b in pool.backends}, ["backend"])
    gauges.add("lbsvc_ready", "1 when ready.", lambda: int(readiness.ready))
    return gauges


def limits_gauges(gauges: CallbackGauges, live: LiveGateways, multiplied: Callable[[], int]) -> None:
    """The gauges of how the cluster's limits are kept."""
    gauges.add("lbsvc_limits_per_process", "1 while other live gateways keep their own memory buckets for"
               " the same users (the cluster may admit lbsvc_gateways_live times a limit).", multiplied)
    gauges.add("lbsvc_gateways_live", "Live gateway processes: on the Redis heartbeat with Redis buckets (the N"
               " of the local fallback's shares), on the user database's with memory buckets.",
               lambda: live.count)


def redis_gauges(gauges: CallbackGauges, store: RedisBucketStore) -> None:
    """The gauges of the Redis bucket store."""
    gauges.add("lbsvc_bucket_store_up", "1 while Redis decides the buckets, 0 while the fallback does.",
               lambda: int(store.up))
    gauges.add("lbsvc_bucket_store_mode", "1 for who decides the buckets now: redis, local_share or deny.",
               lambda: {(m,): int(store.mode == m) for m in ("redis", "local_share", "deny")}, ["mode"])
