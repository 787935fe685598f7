"""Kafka consumer lag for many loom flows at once, evaluated Burrow-style over a window of samples.

A facade: the code lives in the ``loom_dagster.kafka`` package (one module per concern, see its
docstring); the public names are re-exported here so that ``from loom_dagster.kafka_lag import ...``
keeps working. No Dagster here: ``loom_dagster.sensors.lag`` turns the results into asset check
evaluations.
"""

from __future__ import annotations

from loom_dagster.kafka.cluster import KafkaCluster, LagTarget, cluster_for, lag_target, record_target
from loom_dagster.kafka.delay import DelayFetch, DelayReading, fetch_delays
from loom_dagster.kafka.lag_check import LagReport, check_lag
from loom_dagster.kafka.lag_eval import (
    MIN_SAMPLES,
    STARTING_MARGIN_S,
    DeploymentStart,
    FlowLag,
    PartitionLag,
    evaluate_flow,
    evaluate_window,
    starting_window_s,
)
from loom_dagster.kafka.lag_status import LagSeverity, LagStatus, worst
from loom_dagster.kafka.lag_window import (
    CURSOR_COMPRESS_ABOVE,
    CURSOR_VERSION,
    LagSample,
    LagWindows,
    PartitionWindow,
    advance_windows,
)
from loom_dagster.kafka.offsets import ClusterFetch, LagFetch, PartitionOffsets, TargetOffsets, fetch_offsets
from loom_dagster.kafka.snapshot import OffsetSnapshot, OffsetSnapshotError, snapshot_offsets

__all__ = [
    "CURSOR_COMPRESS_ABOVE",
    "CURSOR_VERSION",
    "MIN_SAMPLES",
    "STARTING_MARGIN_S",
    "ClusterFetch",
    "DelayFetch",
    "DelayReading",
    "DeploymentStart",
    "FlowLag",
    "KafkaCluster",
    "LagFetch",
    "LagReport",
    "LagSample",
    "LagSeverity",
    "LagStatus",
    "LagTarget",
    "LagWindows",
    "OffsetSnapshot",
    "OffsetSnapshotError",
    "PartitionLag",
    "PartitionOffsets",
    "PartitionWindow",
    "TargetOffsets",
    "advance_windows",
    "check_lag",
    "cluster_for",
    "evaluate_flow",
    "evaluate_window",
    "fetch_delays",
    "fetch_offsets",
    "lag_target",
    "record_target",
    "snapshot_offsets",
    "starting_window_s",
    "worst",
]
