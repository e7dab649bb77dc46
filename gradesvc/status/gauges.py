"""The replica's gauges on ``/metrics``, read from the store and status at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gradesvc.state.checkpoint import Checkpoints
from gradesvc.state.phase import ReplicaStatus
from gradesvc.state.retention import RetentionWatch
from gradesvc.state.store import GradeStore
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


def checkpoint_age(checkpoints: Checkpoints) -> float:
    """Seconds since this process wrote its newest checkpoint, -1 before the first."""
    written = checkpoints.written_at
    return -1.0 if written is None else checkpoints.clock.seconds() - written


def checkpoint_gauges(registry: CollectorRegistry, checkpoints: Checkpoints, watch: RetentionWatch) -> None:
    """Register the gauges of the checkpoints and of retention against them."""
    gauges = CallbackGauges(registry)
    gauges.add("gradesvc_checkpoint_offset", "Stream offset the newest checkpoint reflects (-1: none).",
               lambda: checkpoints.offset)
    gauges.add("gradesvc_checkpoint_seconds", "Seconds the newest checkpoint took to write.",
               lambda: checkpoints.seconds)
    gauges.add("gradesvc_checkpoint_age_seconds", "Seconds since this process wrote its newest checkpoint"
               " (-1: none written yet).", lambda: checkpoint_age(checkpoints))
    gauges.add("gradesvc_retention_margin_offsets",
               "Offsets between the stream's start and the checkpoint's resume point (-1: unknown).",
               lambda: -1 if watch.margin is None else watch.margin)
    gauges.add("gradesvc_retention_margin_intervals",
               "That margin in checkpoint intervals of writes; below 3 retention is too short (-1: unknown).",
               lambda: -1 if watch.intervals is None else watch.intervals)
