"""Kafka lag of every Kafka-sourced flow as the ``kafka_lag`` asset check: a sensor evaluates it over a
window of samples (kept in its cursor) each tick, and a ``multi_asset_check`` runs a one-shot evaluation
from the UI. Both report against the same declared check; Mongo-sourced flows get none.

Right after a deploy, loom has not committed yet (it commits after the first table flush): both read
the flow's current deployment through the ``loom`` resource (``LoomDeployResource``) and report a
partition without commits as ``STARTING`` (passes; lag = end - the offset the job started from, from
``extra["start_offsets"]``) within ``kafka_lag.starting_window_s`` of the deployment's start, then
``NO_COMMITS``. ``read_deployments=False`` builds them without the resource (and without STARTING).

Each sensor tick also gives every flow its end-to-end delay over the chained flows of the code location
(``loom_dagster.core.kafka.end_to_end``, from the same tick's delays: ``loom/end_to_end_delay_s``,
``loom/end_to_end_path``, ``loom/end_to_end_complete``), unless ``kafka_lag.end_to_end`` is off. The
one-shot check, which may run for a subset of the flows, does not.

No ``from __future__ import annotations`` here: Dagster checks the ``context`` annotation at runtime.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import dagster as dg

from loom_dagster.asset_check_names import KAFKA_LAG
from loom_dagster.asset_graph import FlowNode, LoomAssetGraph
from loom_dagster.core.deploy.store import Deployment, DeploymentStore
from loom_dagster.core.flows.defs_state import Lazy
from loom_dagster.core.kafka.cluster import LagTarget, lag_target
from loom_dagster.core.kafka.delay import DelayFetch
from loom_dagster.core.kafka.end_to_end import EndToEndDelay, EndToEndTopology, Rule, topic_delays
from loom_dagster.core.kafka.lag_check import check_lag
from loom_dagster.core.kafka.lag_eval import DeploymentStart, FlowLag, starting_window_s
from loom_dagster.core.kafka.lag_status import LagSeverity
from loom_dagster.core.kafka.lag_window import LagWindows
from loom_dagster.core.kafka.offsets import LagFetch
from loom_dagster.core.sensor_settings import KafkaLagSettings
from loom_dagster.resource import LoomDeployResource
from loom_dagster.sensors.check_ops import CheckKind, declared_check_ops

CHECKS_NAME = "loom_kafka_lag_checks"
MAX_TABLE_ROWS = 500
_DESCRIPTION = (
    "Consumer lag of the flow's group on its source topics, Burrow-style over a window of samples, "
    "and its delay (age of the oldest unconsumed message, max_delay_s): "
    "OK / STARTING (fresh deployment, no commit yet: passes) / WARN (falling behind, or total lag >= "
    "warn_lag, or a delay >= warn_delay_s) / ERR (total lag >= error_lag, or a delay >= error_delay_s) / "
    "STALL / STOP / REWIND / NO_COMMITS / MISSING_TOPIC / UNAVAILABLE / UNREACHABLE."
)


def kafka_lag_flows(graph: LoomAssetGraph) -> list[tuple[dg.AssetKey, str]]:
    """The flow asset key and consumer group of every Kafka-sourced flow, from its records alone
    (no plan, no credentials): what the checks are declared with at load."""
    return [
        (node.spec.key, flow.consumer_group)
        for node in graph.flows
        for flow in [node.compiled.flow]
        if flow.source_kind == "kafka" and flow.consumer_group and flow.source_topics
    ]


def end_to_end_topology(graph: LoomAssetGraph) -> EndToEndTopology:
    """The flow graph of *graph* for the end-to-end delay, from the flows' records alone."""
    return EndToEndTopology.from_flows(
        (node.spec.key.to_user_string(), node.compiled.flow) for node in graph.flows
    )


def end_to_end_delays(
    topology: EndToEndTopology, flows: Sequence[FlowLag], settings: KafkaLagSettings
) -> dict[str, EndToEndDelay]:
    """Every flow's end-to-end delay from one tick's evaluations (flow key -> delay); nothing when
    ``end_to_end`` or ``read_delay`` is off."""
    if not (settings.end_to_end and settings.read_delay):
        return {}
    rule: Rule = "sum" if settings.end_to_end_rule == "sum" else "max"
    return topology.compute({flow.name: topic_delays(flow) for flow in flows}, rule=rule)


def lazy_lag_targets(
    graph: LoomAssetGraph, settings: KafkaLagSettings
) -> Lazy[tuple[list[tuple[dg.AssetKey, LagTarget]], dict[str, tuple[str, float]]]]:
    """The lag targets (with their clusters' connection settings) and starting windows, resolved on
    first use in the process that ticks (it compiles the plans the state-backed load skipped) and
    kept for its lifetime; restricted to the flows declared at load."""
    declared = {key for key, _ in kafka_lag_flows(graph)}

    def resolve() -> tuple[list[tuple[dg.AssetKey, LagTarget]], dict[str, tuple[str, float]]]:
        pairs = [(k, t) for k, t in kafka_lag_targets(graph) if k in declared]
        return pairs, starting_windows(graph, settings, pairs)

    return Lazy(resolve)


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


def buffer_max_age_s(node: FlowNode) -> float:
    """The largest ``buffer_max_age_s`` of the flow's table sinks (0 without tables)."""
    ages = [
        float(getattr(getattr(sink.config, "buffer_policy", None), "max_age_s", 0.0) or 0.0)
        for sink in node.compiled.plan.terminal_storage_sinks.values()
    ]
    return max(ages, default=0.0)


def starting_windows(
    graph: LoomAssetGraph,
    settings: KafkaLagSettings,
    pairs: Sequence[tuple[dg.AssetKey, LagTarget]] | None = None,
) -> dict[str, tuple[str, float]]:
    """Target name (flow asset key) -> (flow name, starting window in seconds) of every Kafka flow
    (of *pairs*, default ``kafka_lag_targets(graph)``)."""
    names = {target.name for _, target in (kafka_lag_targets(graph) if pairs is None else pairs)}
    return {
        node.spec.key.to_user_string(): (
            node.compiled.flow.name,
            starting_window_s(buffer_max_age_s(node), settings.interval_s),
        )
        for node in graph.flows
        if node.spec.key.to_user_string() in names
    }


def deployment_start(deployment: Deployment | None, window_s: float) -> DeploymentStart | None:
    """The start of a flow's current deployment (``None`` if never deployed or stopped on purpose).

    It starts at the later of its record time and its job's launch, so a health-sensor restart (same
    record, new job) opens a new window.
    """
    if deployment is None or deployment.stopped_on_purpose:
        return None
    started = max(deployment.deployed_at, deployment.job.started_at)
    return DeploymentStart.from_record(started, deployment.extra or {}, window_s)


def deployment_starts(
    store: DeploymentStore, windows: Mapping[str, tuple[str, float]], names: Sequence[str]
) -> dict[str, DeploymentStart]:
    """The deployment start of each target in *names* that has a current deployment in *store*."""
    out = {}
    for name in names:
        flow_name, window_s = windows[name]
        try:
            current = store.current(flow_name)
        except (OSError, ValueError, KeyError, TypeError):  # unreadable record: plain NO_COMMITS rules
            continue
        start = deployment_start(current, window_s)
        if start is not None:
            out[name] = start
    return out


def build_kafka_lag_checks(
    graph: LoomAssetGraph, settings: KafkaLagSettings, *, read_deployments: bool = True
) -> list[dg.AssetChecksDefinition]:
    """The ``kafka_lag`` check on every Kafka-sourced flow; running it does a one-shot evaluation.

    With *read_deployments* (default) it needs the ``loom`` resource, to tell ``STARTING`` from
    ``NO_COMMITS`` right after a deploy. (``build_loom_defs`` declares it with ``job_running`` in
    shared ops: ``kafka_lag_check_kind``.)
    """
    kind = kafka_lag_check_kind(graph, settings, read_deployments=read_deployments)
    if kind is None:
        return []

    def _kafka_lag_checks(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        yield from kind.evaluate(context, None)

    def _kafka_lag_checks_deployed(
        context: dg.AssetCheckExecutionContext, loom: LoomDeployResource
    ) -> Iterator[dg.AssetCheckResult]:
        yield from kind.evaluate(context, loom)

    return declared_check_ops(
        CHECKS_NAME,
        kind.specs,
        _kafka_lag_checks_deployed if read_deployments else _kafka_lag_checks,
        description="One-shot Kafka lag of loom flows (no window: thresholds and clear statuses only).",
    )


def kafka_lag_check_kind(
    graph: LoomAssetGraph, settings: KafkaLagSettings, *, read_deployments: bool = True
) -> CheckKind | None:
    """The ``kafka_lag`` checks of every Kafka-sourced flow and their one-shot evaluation, which reads
    the deployments through the ``loom`` resource it is given (with *read_deployments*); ``None``:
    no Kafka-sourced flow."""
    specs = [
        dg.AssetCheckSpec(KAFKA_LAG, asset=key, description=f"{_DESCRIPTION} Group `{group}`.")
        for key, group in kafka_lag_flows(graph)
    ]
    if not specs:
        return None
    resolved = lazy_lag_targets(graph, settings)

    def run(
        context: dg.AssetCheckExecutionContext, loom: LoomDeployResource | None
    ) -> Iterator[dg.AssetCheckResult]:
        store = loom.deployer().store if read_deployments and loom is not None else None
        pairs, windows = resolved()
        selected = context.selected_asset_check_keys
        chosen = [(k, t) for k, t in pairs if dg.AssetCheckKey(k, KAFKA_LAG) in selected]
        names = [t.name for _, t in chosen]
        starts = deployment_starts(store, windows, names) if store is not None else None
        report = check_lag([t for _, t in chosen], settings, starts=starts)
        common = fetch_metadata(report.fetch, report.delays)
        for (key, _), flow in zip(chosen, report.flows, strict=True):
            yield dg.AssetCheckResult(
                asset_key=key,
                check_name=KAFKA_LAG,
                passed=flow.passed,
                severity=_severity(flow),
                metadata=lag_metadata(flow, report.fetch, common, (starts or {}).get(flow.name)),
                description=flow.reason,
            )

    return CheckKind(KAFKA_LAG, specs, run)


def build_kafka_lag_sensor(
    graph: LoomAssetGraph,
    settings: KafkaLagSettings,
    *,
    name: str = "loom_kafka_lag",
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
    read_deployments: bool = True,
) -> dg.SensorDefinition:
    """A sensor that fetches every flow's offsets in one batch per cluster each tick, keeps a window of
    samples per partition in its cursor and reports ``kafka_lag`` check evaluations (runless).

    With *read_deployments* (default) it needs the ``loom`` resource: each tick reads every flow's
    current deployment record (start time, start offsets) for the ``STARTING`` window.
    """
    declared = kafka_lag_flows(graph)
    resolved = lazy_lag_targets(graph, settings)
    topology = Lazy(lambda: end_to_end_topology(graph))  # built on the first tick, not at load

    def tick(
        context: dg.SensorEvaluationContext, store: DeploymentStore | None
    ) -> dg.SensorResult | dg.SkipReason:
        if not declared:
            return dg.SkipReason("no Kafka-sourced loom flow")
        pairs, windows = resolved()
        targets = [t for _, t in pairs]
        names = [t.name for t in targets]
        starts = deployment_starts(store, windows, names) if store is not None else None
        report = check_lag(targets, settings, LagWindows.from_cursor(context.cursor), starts=starts)
        common = fetch_metadata(report.fetch, report.delays)
        chained = end_to_end_delays(topology(), report.flows, settings)
        events = [
            lag_evaluation(
                key,
                flow,
                report.fetch,
                common,
                start=(starts or {}).get(flow.name),
                end_to_end=chained.get(flow.name),
            )
            for (key, _), flow in zip(pairs, report.flows, strict=True)
        ]
        delays = report.delays
        read = (
            f"; delay of {delays.read}/{delays.asked} lagging partition(s) read in {delays.seconds:.2f} s"
            if delays is not None
            else ""
        )
        context.log.info(
            f"kafka lag: {len(events)} flow(s), {report.fetch.requests} broker request(s), "
            f"{report.fetch.seconds:.2f} s{read}"
        )
        return dg.SensorResult(asset_events=events, cursor=report.windows.to_cursor())

    decorate = dg.sensor(
        name=name,
        minimum_interval_seconds=settings.interval_s,
        default_status=default_status,
        description="Kafka consumer lag of loom flows, evaluated over a window (reports the kafka_lag check).",
    )
    if not read_deployments:

        def _kafka_lag_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
            return tick(context, None)

        return decorate(_kafka_lag_sensor)

    def _kafka_lag_sensor_deployed(
        context: dg.SensorEvaluationContext, loom: LoomDeployResource
    ) -> dg.SensorResult | dg.SkipReason:
        return tick(context, loom.deployer().store if declared else None)

    return decorate(_kafka_lag_sensor_deployed)


def lag_evaluation(
    key: dg.AssetKey,
    flow: FlowLag,
    fetch: LagFetch,
    common: dict[str, Any] | None = None,
    start: DeploymentStart | None = None,
    end_to_end: EndToEndDelay | None = None,
) -> dg.AssetCheckEvaluation:
    """A runless ``kafka_lag`` check evaluation for one flow."""
    metadata = lag_metadata(flow, fetch, common, start)
    if end_to_end is not None:
        metadata.update(end_to_end_metadata(end_to_end))
    return dg.AssetCheckEvaluation(
        asset_key=key,
        check_name=KAFKA_LAG,
        passed=flow.passed,
        severity=_severity(flow),
        metadata=metadata,
        description=flow.reason,
    )


END_TO_END_DELAY_KEY = "loom/end_to_end_delay_s"
END_TO_END_PATH_KEY = "loom/end_to_end_path"
END_TO_END_COMPLETE_KEY = "loom/end_to_end_complete"


def end_to_end_metadata(found: EndToEndDelay) -> dict[str, Any]:
    """The flow's end-to-end delay (null: no hop known), its path, whether every hop of its lineage
    was known (else the delay is a lower bound) and, if not, which flows were not; the rule used."""
    metadata: dict[str, Any] = {
        END_TO_END_DELAY_KEY: (
            round(found.delay_s, 2) if found.delay_s is not None else dg.MetadataValue.null()
        ),
        END_TO_END_PATH_KEY: dg.MetadataValue.text(found.path_text()),
        END_TO_END_COMPLETE_KEY: found.complete,
        "loom/end_to_end_rule": found.rule,
    }
    if found.unknown_count:
        more = (
            f" (+{found.unknown_count - len(found.unknown)} more)"
            if found.unknown_count > len(found.unknown)
            else ""
        )
        metadata["loom/end_to_end_unknown"] = dg.MetadataValue.text(", ".join(found.unknown) + more)
    return metadata


def fetch_metadata(fetch: LagFetch, delays: DelayFetch | None = None) -> dict[str, Any]:
    """Metadata shared by every flow of one fetch: its broker requests (the whole batch) and duration,
    and the delay read's (partitions asked and read, seconds)."""
    common: dict[str, Any] = {
        "broker_requests": fetch.requests,
        "broker_requests_by_api": dg.MetadataValue.json(fetch.by_api()),
        "fetch_seconds": round(fetch.seconds, 3),
    }
    if delays is not None:
        common["delay_read_seconds"] = round(delays.seconds, 3)
        common["delay_partitions_asked"] = delays.asked
        common["delay_partitions_read"] = delays.read
        if delays.requests:
            common["delay_broker_requests"] = delays.requests
    return common


def lag_metadata(
    flow: FlowLag,
    fetch: LagFetch,
    common: dict[str, Any] | None = None,
    start: DeploymentStart | None = None,
) -> dict[str, Any]:
    """Check metadata: status, reason, totals, the delay (``max_delay_s``: the oldest unconsumed message's
    age over the flow's partitions; null when no lagging partition could be read), time-lag estimate,
    the request cost, a partition table (with each partition's ``delay_s``) and (with *start*) the
    deployment's start time and starting window."""
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
    if flow.delay_read:
        metadata["max_delay_s"] = (
            round(flow.max_delay_s, 2) if flow.max_delay_s is not None else dg.MetadataValue.null()
        )
        metadata["delay_unknown_partitions"] = flow.delay_unknown
        notes = [p.delay_note for p in flow.partitions if p.delay_s is None and p.delay_note]
        if notes:
            metadata["delay_unknown_reason"] = dg.MetadataValue.text(notes[0])
    if start is not None:
        metadata["deployment_started_at"] = dg.MetadataValue.timestamp(start.started_at)
        metadata["starting_window_s"] = round(start.window_s, 1)
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
                "delay_s": -1.0 if p.delay_s is None else round(p.delay_s, 2),
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
        dg.TableColumn(
            "lag", "int", description="end - committed; without a commit, end - start offset (-1: unknown)"
        ),
        dg.TableColumn("status", "string"),
        dg.TableColumn("time_lag_s", "float", description="estimate: lag / consumption rate (-1: none)"),
        dg.TableColumn(
            "delay_s",
            "float",
            description="age of the oldest unconsumed message, 0 without lag (-1: unknown or not read)",
        ),
        dg.TableColumn("reason", "string"),
    ]
)


def _or_minus_one(value: int | None) -> int:
    return -1 if value is None else value


def _severity(flow: FlowLag) -> dg.AssetCheckSeverity:
    return dg.AssetCheckSeverity.WARN if flow.severity is LagSeverity.WARN else dg.AssetCheckSeverity.ERROR
