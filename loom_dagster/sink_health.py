"""Sink health (facade): the public names of ``loom_dagster.sinks``' targets, readers and freshness,
kept importable from their former home. New code imports from the ``loom_dagster.sinks`` modules."""

from loom_dagster.sinks.connections import (
    DEFAULT_TIMEOUT_S,
    clickhouse_server_url,
    local_delta_log,
    sync_sqlalchemy_url,
)
from loom_dagster.sinks.delta_log import DeltaCommit, latest_delta_version, parse_delta_commit
from loom_dagster.sinks.freshness import (
    FreshnessStatus,
    FreshnessVerdict,
    Severity,
    SourceLag,
    evaluate_freshness,
)
from loom_dagster.sinks.read import read_sink, read_sinks
from loom_dagster.sinks.read_clickhouse import read_clickhouse
from loom_dagster.sinks.read_delta import MAX_COMMITS_PER_READ, read_delta
from loom_dagster.sinks.read_sql import read_sql
from loom_dagster.sinks.reading import ReadStatus, SinkReading, as_int, failed, to_epoch
from loom_dagster.sinks.targets import (
    FlowSinks,
    SinkTarget,
    declared_sink_targets,
    scrub,
    sink_targets,
    target_for,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MAX_COMMITS_PER_READ",
    "DeltaCommit",
    "FlowSinks",
    "FreshnessStatus",
    "FreshnessVerdict",
    "ReadStatus",
    "Severity",
    "SinkReading",
    "SinkTarget",
    "SourceLag",
    "as_int",
    "clickhouse_server_url",
    "declared_sink_targets",
    "evaluate_freshness",
    "failed",
    "latest_delta_version",
    "local_delta_log",
    "parse_delta_commit",
    "read_clickhouse",
    "read_delta",
    "read_sink",
    "read_sinks",
    "read_sql",
    "scrub",
    "sink_targets",
    "sync_sqlalchemy_url",
    "target_for",
    "to_epoch",
]
