"""The replica's gauges on ``/metrics``, read from the store and status at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gradesvc.status import ReplicaStatus
from gradesvc.storage import GradeStore
from svckit.metrics import CallbackGauges


def replica_gauges(registry: CollectorRegistry, store: GradeStore, status: ReplicaStatus) -> None:
    """Register the gauges of one replica."""
    gauges = CallbackGauges(registry)
    gauges.add("gradesvc_users", "Users in the store.", lambda: len(store))
    gauges.add("gradesvc_ready", "1 when ready.", lambda: int(status.ready))
    gauges.add("gradesvc_broker_connected", "1 while connected.", lambda: int(status.connected))
    gauges.add("gradesvc_applied_offset", "Last stream offset applied.", lambda: status.applied_offset)
    gauges.add(
        "gradesvc_replication_lag_seconds",
        "Age of the newest applied stream write when it was applied.",
        lambda: status.lag_seconds,
    )
    gauges.add("gradesvc_bootstrap_rows_loaded", "Snapshot rows loaded at start.",
               lambda: status.snapshot_rows)
    gauges.add("gradesvc_bootstrap_seconds", "Seconds from start to ready (0 until ready).",
               lambda: status.bootstrap_seconds or 0.0)
    gauges.add("gradesvc_retention_gap", "1 when the stream lost offsets this replica needed.",
               lambda: int(status.gap is not None))
    gauges.add("gradesvc_consumer_failures", "Times the stream consumer failed and was restarted.",
               lambda: status.consumer_failures)
