"""Kafka lag of every Kafka-sourced flow as the ``kafka_lag`` asset check: a sensor evaluates it over a
window of samples (kept in its cursor) each tick, and a ``multi_asset_check`` runs a one-shot evaluation
from the UI. Both report against the same declared check; Mongo-sourced flows get none.

No ``from __future__ import annotations`` here: Dagster checks the ``context`` annotation at runtime.
"""

from collections.abc import Iterator
from typing import Any

import dagster as dg

from loom_dagster.checks import KAFKA_LAG
from loom_dagster.graph import FlowNode, LoomAssetGraph
from loom_dagster.kafka_lag import (
    FlowLag,
    LagFetch,
    LagSeverity,
    LagTarget,
    LagWindows,
    check_lag,
    lag_target,
)
from loom_dagster.sensors.settings import KafkaLagSettings

CHECKS_NAME = "loom_kafka_lag_checks"
MAX_TABLE_ROWS = 500
_DESCRIPTION = (
    "Consumer lag of the flow's group on its source topics, Burrow-style over a window of samples: "
    "OK / WARN (falling behind, or total lag >= warn_lag) / ERR (total lag >= error_lag) / STALL / STOP / "
    "REWIND / NO_COMMITS / MISSING_TOPIC / UNAVAILABLE / UNREACHABLE."
)


def kafka_lag_targets(graph: LoomAssetGraph) -> list[tuple[dg.AssetKey, LagTarget]]:
    """The flow asset key and lag target of every Kafka-sourced flow of *graph*."""
    out = []
    for node in graph.flows:
        settings = getattr(node.compiled.plan.source, "settings", None)
        target = (
            lag_target(node.spec.key.to_user_string(), node.compiled.flow, settings, idle_tail(node))
            if settings
            else None
        )
        if target is not None:
            out.append((node.spec.key, target))
    return out


def idle_tail(node: FlowNode) -> int:
    """The most rows the flow's table buffers can hold back (largest ``buffer_max_records`` x workers)."""
    sizes = [
        int(getattr(getattr(sink.config, "buffer_policy", None), "max_records", 0) or 0)
        for sink in node.compiled.plan.terminal_storage_sinks.values()
    ]
    spec = node.compiled.spec
    return max(sizes, default=0) * spec.processes * spec.workers_per_process


def build_kafka_lag_checks(graph: LoomAssetGraph, settings: KafkaLagSettings) -> dg.AssetChecksDefinition:
    """The ``kafka_lag`` check on every Kafka-sourced flow; running it does a one-shot evaluation."""
    pairs = kafka_lag_targets(graph)
    specs = [
        dg.AssetCheckSpec(KAFKA_LAG, asset=key, description=f"{_DESCRIPTION} Group `{target.group}`.")
        for key, target in pairs
    ]

    @dg.multi_asset_check(
        specs=specs,
        can_subset=True,
        name=CHECKS_NAME,
        description="One-shot Kafka lag of loom flows (no window: thresholds and clear statuses only).",
    )
    def _kafka_lag_checks(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        selected = context.selected_asset_check_keys
        chosen = [(k, t) for k, t in pairs if dg.AssetCheckKey(k, KAFKA_LAG) in selected]
        report = check_lag([t for _, t in chosen], settings)
        common = fetch_metadata(report.fetch)
        for (key, _), flow in zip(chosen, report.flows, strict=True):
            yield dg.AssetCheckResult(
                asset_key=key,
                check_name=KAFKA_LAG,
                passed=flow.passed,
                severity=_severity(flow),
                metadata=lag_metadata(flow, report.fetch, common),
                description=flow.reason,
            )

    return _kafka_lag_checks


def build_kafka_lag_sensor(
    graph: LoomAssetGraph,
    settings: KafkaLagSettings,
    *,
    name: str = "loom_kafka_lag",
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
) -> dg.SensorDefinition:
    """A sensor that fetches every flow's offsets in one batch per cluster each tick, keeps a window of
    samples per partition in its cursor and reports ``kafka_lag`` check evaluations (runless)."""
    pairs = kafka_lag_targets(graph)
    targets = [t for _, t in pairs]

    @dg.sensor(
        name=name,
        minimum_interval_seconds=settings.interval_s,
        default_status=default_status,
        description="Kafka consumer lag of loom flows, evaluated over a window (reports the kafka_lag check).",
    )
    def _kafka_lag_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        if not targets:
            return dg.SkipReason("no Kafka-sourced loom flow")
        report = check_lag(targets, settings, LagWindows.from_cursor(context.cursor))
        events = [
            lag_evaluation(key, flow, report.fetch)
            for (key, _), flow in zip(pairs, report.flows, strict=True)
        ]
        context.log.info(
            f"kafka lag: {len(events)} flow(s), {report.fetch.requests} broker request(s), "
            f"{report.fetch.seconds:.2f} s"
        )
        return dg.SensorResult(asset_events=events, cursor=report.windows.to_cursor())

    return _kafka_lag_sensor


def lag_evaluation(
    key: dg.AssetKey, flow: FlowLag, fetch: LagFetch, common: dict[str, Any] | None = None
) -> dg.AssetCheckEvaluation:
    """A runless ``kafka_lag`` check evaluation for one flow."""
    return dg.AssetCheckEvaluation(
        asset_key=key,
        check_name=KAFKA_LAG,
        passed=flow.passed,
        severity=_severity(flow),
        metadata=lag_metadata(flow, fetch, common),
        description=flow.reason,
    )


def fetch_metadata(fetch: LagFetch) -> dict[str, Any]:
    """Metadata shared by every flow of one fetch: its broker requests (the whole batch) and duration."""
    return {
        "broker_requests": fetch.requests,
        "broker_requests_by_api": dg.MetadataValue.json(fetch.by_api()),
        "fetch_seconds": round(fetch.seconds, 3),
    }


def lag_metadata(flow: FlowLag, fetch: LagFetch, common: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check metadata: status, reason, totals, time-lag estimate, the request cost and a partition table."""
    metadata: dict[str, Any] = {
        "status": flow.status.value,
        "reason": dg.MetadataValue.text(flow.reason),
        "consumer_group": flow.group,
        "total_lag": flow.total_lag,
        "partitions_by_status": dg.MetadataValue.text(
            ", ".join(f"{k}: {v}" for k, v in sorted(flow.counts().items()))
        ),
        **(common if common is not None else fetch_metadata(fetch)),
    }
    optional = {
        "time_lag_s_estimate": flow.time_lag_s,
        "stalled_for_s": flow.stalled_for_s,
        "consume_rate_msg_s": flow.consume_rate,
        "produce_rate_msg_s": flow.produce_rate,
    }
    metadata.update({k: round(v, 2) for k, v in optional.items() if v is not None})
    if flow.missing_topics:
        metadata["missing_topics"] = ", ".join(flow.missing_topics)
    if flow.partitions:
        metadata["partitions"] = _partition_table(flow)
    return metadata


def _partition_table(flow: FlowLag) -> dg.MetadataValue:
    """Per-partition end, committed, lag and status (``-1``: unknown); capped at ``MAX_TABLE_ROWS``."""
    rows = sorted(flow.partitions, key=lambda p: (-p.status.rank, -(p.lag or 0), p.topic, p.partition))
    records = [
        dg.TableRecord(
            {
                "topic": p.topic,
                "partition": p.partition,
                "end": _or_minus_one(p.end),
                "committed": _or_minus_one(p.committed),
                "lag": _or_minus_one(p.lag),
                "status": p.status.value,
                "time_lag_s": -1.0 if p.time_lag_s is None else round(p.time_lag_s, 2),
                "reason": p.reason,
            }
        )
        for p in rows[:MAX_TABLE_ROWS]
    ]
    return dg.MetadataValue.table(records=records, schema=_TABLE_SCHEMA)


_TABLE_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("topic", "string"),
        dg.TableColumn("partition", "int"),
        dg.TableColumn("end", "int", description="end offset (-1: unknown)"),
        dg.TableColumn("committed", "int", description="group's committed offset (-1: none)"),
        dg.TableColumn("lag", "int", description="end - committed (-1: unknown)"),
        dg.TableColumn("status", "string"),
        dg.TableColumn("time_lag_s", "float", description="estimate: lag / consumption rate (-1: none)"),
        dg.TableColumn("reason", "string"),
    ]
)


def _or_minus_one(value: int | None) -> int:
    return -1 if value is None else value


def _severity(flow: FlowLag) -> dg.AssetCheckSeverity:
    return dg.AssetCheckSeverity.WARN if flow.severity is LagSeverity.WARN else dg.AssetCheckSeverity.ERROR
