"""Job health sensor (a reconciler): observe every deployed flow, report ``job_running``, restart dead
or hung jobs with exponential backoff and a cap on restarts per window; never restart an undeployed flow.

The policy (the verdict on a job, backoff, cap, halts on bad input or the same error twice) is
``loom_dagster.core.deploy.restart_policy`` (no Dagster); this module reads the launcher's reports and
the sensor's restart runs, and turns the decisions into Dagster events: observations, the ``job_running``
check, restart run requests, log lines, the cursor (``restart_policy.RestartState`` per flow).
"""

import time
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import msgspec

from loom_dagster.asset_check_names import JOB_RUNNING, RESTART_TAG
from loom_dagster.asset_graph import LoomAssetGraph
from loom_dagster.core.deploy.launch_records import JobReport, JobState
from loom_dagster.core.deploy.orphans import FenceTarget, Orphan, OrphanReport, find_orphans
from loom_dagster.core.deploy.regression_watch import WatchedJob
from loom_dagster.core.deploy.restart_policy import (
    MAX_ERROR_CHARS,
    Death,
    JobVerdict,
    RestartState,
    active_sink_error,
    decide,
    dump_cursor,
    judge,
    load_cursor,
    run_death,
)
from loom_dagster.core.deploy.store import Deployment, DeploymentStore
from loom_dagster.core.flows.defs_state import Lazy
from loom_dagster.core.job.failure import clip
from loom_dagster.core.kafka.cluster import cluster_for
from loom_dagster.core.launchers.base import Launcher
from loom_dagster.core.redact import redact_text
from loom_dagster.core.sensor_settings import JobHealthSettings
from loom_dagster.resource import LoomDeployResource
from loom_dagster.sensors.check_ops import CheckKind, declared_check_ops
from loom_dagster.sensors.regression import RegressionWatch

FLOW_TAG = "loom/flow"


class FlowHealth(msgspec.Struct, frozen=True):
    """What one look concluded for one flow: the policy's verdict and the observation's metadata."""

    asset_key: dg.AssetKey
    verdict: JobVerdict
    metadata: dict[str, Any]

    @property
    def severity(self) -> dg.AssetCheckSeverity:
        return dg.AssetCheckSeverity(self.verdict.severity.value)


def assess(
    deployment: Deployment,
    report: JobReport,
    asset_key: dg.AssetKey,
    starting_grace_s: float,
    uptime_s: float | None = None,
) -> FlowHealth:
    """Health of one deployed flow from the launcher's report (and uptime) and the job's status records."""
    metadata = job_metadata(deployment, report, uptime_s)
    return FlowHealth(asset_key, judge(deployment, report, starting_grace_s), metadata)


def job_metadata(deployment: Deployment, report: JobReport, uptime_s: float | None = None) -> dict[str, Any]:
    """Observation metadata: state, uptime (the launcher's), restarts, counts and last write per sink."""
    job = deployment.job
    statuses = report.statuses
    sinks: dict[str, dict[str, Any]] = {}
    for status in statuses:
        for sink, info in (status.get("sinks") or {}).items():
            entry = sinks.setdefault(sink, {"records": 0, "last_write_at": None})
            entry["records"] += int(info.get("records") or 0)
            last = info.get("last_write_at")
            if last and (entry["last_write_at"] is None or last > entry["last_write_at"]):
                entry["last_write_at"] = last
    metadata: dict[str, Any] = {
        "loom/state": report.state.value,
        "loom/reason": redact_text(report.reason),
        "loom/pids": ", ".join(str(p.pid) for p in job.processes),
        "loom/alive_processes": dg.MetadataValue.int(report.alive_processes),
        "loom/restarts": dg.MetadataValue.int(deployment.restarts),
        "loom/plan_hash": deployment.plan_hash,
        "loom/records_in": dg.MetadataValue.int(sum(int(s.get("records_in") or 0) for s in statuses)),
        "loom/records_out": dg.MetadataValue.int(sum(int(s.get("records_out") or 0) for s in statuses)),
        "loom/errors": dg.MetadataValue.int(sum(int(s.get("errors") or 0) for s in statuses)),
        "loom/sinks": dg.MetadataValue.json(sinks),
    }
    if uptime_s is not None:
        metadata["loom/uptime_s"] = dg.MetadataValue.float(round(uptime_s, 1))
    for sink, info in sinks.items():
        if info["last_write_at"]:
            metadata[f"loom/last_write/{sink}"] = dg.MetadataValue.timestamp(info["last_write_at"])
    metadata.update(_failure_metadata(statuses))
    return metadata


def _failure_metadata(statuses: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The last sink error (sink, when, count, full text) and each exited process's final error."""
    metadata: dict[str, Any] = {}
    sink_error = active_sink_error(statuses)
    if sink_error is not None:
        metadata["loom/sink_error/sink"] = sink_error.sink
        metadata["loom/sink_error/at"] = dg.MetadataValue.timestamp(sink_error.at)
        metadata["loom/sink_error/count"] = dg.MetadataValue.int(sink_error.count)
        metadata["loom/sink_error"] = dg.MetadataValue.md(f"```\n{redact_text(sink_error.error)}\n```")
    exits = [s for s in statuses if s.get("exit_code") is not None and s.get("error")]
    if exits:
        metadata["loom/exit_code"] = dg.MetadataValue.int(int(exits[0]["exit_code"]))
        text = "\n".join(redact_text(str(s["error"])) for s in exits)
        metadata["loom/error"] = dg.MetadataValue.text(clip(text, MAX_ERROR_CHARS, keep_tail=False))
    return metadata


def build_job_health_sensor(
    graph: LoomAssetGraph,
    settings: JobHealthSettings,
    *,
    name: str = "loom_job_health",
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
) -> dg.SensorDefinition:
    """The reconciler: observations + ``job_running`` for every deployed flow, restarts with backoff.

    Example:
        >>> from loom_dagster.core.sensor_settings import JobHealthSettings
        >>> sensor = build_job_health_sensor(graph, JobHealthSettings(interval_s=5))  # doctest: +SKIP
    """
    flow_keys = {node.compiled.flow.name: node.spec.key for node in graph.flows}
    fences = Lazy(lambda: fence_targets(graph))  # compiles the plans (credentials) on the first tick
    watch = RegressionWatch(graph, settings) if settings.regression_watch_ticks > 0 else None

    @dg.sensor(
        name=name,
        minimum_interval_seconds=settings.interval_s,
        default_status=default_status,
        # asset_selection, not target: a target builds an anonymous asset job over every flow at load
        # (~0.17 s at 200 flows); run requests go to the implicit asset job either way
        asset_selection=list(flow_keys.values()) if flow_keys else None,
        description="Watches deployed loom jobs: alive, heartbeating, connected. Restarts dead or hung "
        "jobs by re-materializing the flow, with exponential backoff and a cap per window.",
    )
    def _sensor(context: dg.SensorEvaluationContext, loom: LoomDeployResource) -> dg.SensorResult:
        deployer = loom.deployer()
        states = load_cursor(context.cursor)
        now = time.time()
        events: list[Any] = []
        requests: list[dg.RunRequest] = []
        watched: list[WatchedJob] = []
        records = deployer.store.current_many(flow_keys)
        orphans = tick_orphans(deployer.store, records, fences(), context.log, deployer.launcher)
        # one read of where the jobs run serves every report (the watch below may redeploy: outside)
        with deployer.launcher.observation():
            for flow_name, key in flow_keys.items():
                if orphans.of(flow_name):  # another job consumes the group: report it, restart nothing
                    events.append(orphan_evaluation(key, orphans.of(flow_name), deployer.store.root))
                    continue
                deployment = records[flow_name]
                launcher = deployer.launcher_for(deployment) if deployment is not None else None
                if deployment is None or launcher is None or not launcher.owns(deployment.job):
                    continue
                report = launcher.report(deployment.job)
                if report.state is JobState.HEALTHY and not deployment.stopped_on_purpose:
                    deployer.observer.running(deployment)  # OpenLineage RUNNING, once per period
                health = assess(
                    deployment, report, key, loom.health_timeout_s, _uptime(launcher, deployment, report)
                )
                state = states.setdefault(flow_name, RestartState())
                if watch is not None:
                    watched.append(WatchedJob(flow_name, deployment, report))
                verdict = health.verdict
                decision = decide(
                    state, verdict, settings, now, DagsterRestartRuns(context.instance, flow_name)
                )
                if decision.restart and verdict.restart_reason is not None:
                    requests.append(
                        dg.RunRequest(
                            run_key=f"loom-restart-{flow_name}-{int(now * 1000)}",
                            asset_selection=[key],
                            tags={
                                RESTART_TAG: "true",
                                FLOW_TAG: flow_name,
                                "loom/restart_reason": verdict.restart_reason[:200],
                            },
                        )
                    )
                    context.log.info(f"restarting flow {flow_name!r}: {verdict.restart_reason}")
                events.append(dg.AssetObservation(asset_key=key, metadata=health.metadata))
                events.append(
                    dg.AssetCheckEvaluation(
                        asset_key=key,
                        check_name=JOB_RUNNING,
                        passed=verdict.passed,
                        severity=dg.AssetCheckSeverity(decision.severity.value),
                        description=decision.description,
                        metadata=_check_metadata(report, health, state, decision.description),
                    )
                )
        if watch is not None:  # after a deploy: roll back once a new version that stalls
            events.extend(watch.tick(deployer, watched, states, context.log))
        return dg.SensorResult(run_requests=requests, asset_events=events, cursor=dump_cursor(states))

    return _sensor


class DagsterRestartRuns:
    """The restart runs of one flow (``restart_policy.RestartRuns``), read from the Dagster instance."""

    def __init__(self, instance: dg.DagsterInstance, flow_name: str) -> None:
        self.instance = instance
        self.flow_name = flow_name

    def in_progress(self) -> bool:
        return restart_in_progress(self.instance, self.flow_name)

    def last_failed(self, since: float) -> Death | None:
        return last_failed_restart(self.instance, self.flow_name, since)


def _check_metadata(
    report: JobReport, health: FlowHealth, state: RestartState, detail: str
) -> dict[str, Any]:
    """``job_running`` metadata: state, detail, and the failure's sink / error / streak when failing."""
    metadata: dict[str, Any] = {"loom/state": report.state.value, "loom/detail": detail}
    if health.verdict.passed:
        return metadata
    for name in ("loom/sink_error/sink", "loom/sink_error", "loom/exit_code", "loom/error"):
        if name in health.metadata:
            metadata[name] = health.metadata[name]
    if state.same_error_deaths:
        metadata["loom/same_error_deaths"] = dg.MetadataValue.int(state.same_error_deaths)
    if state.halted is not None:
        metadata["loom/restarts_halted"] = dg.MetadataValue.text(state.halted)
    return metadata


def last_failed_restart(instance: dg.DagsterInstance, flow_name: str, since: float) -> Death | None:
    """The newest restart run of the flow, if it failed after ``since``: as a death with its error."""
    records = instance.get_run_records(
        filters=dg.RunsFilter(
            tags={RESTART_TAG: "true", FLOW_TAG: flow_name},
            statuses=[dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.SUCCESS],
        ),
        limit=1,
    )
    if not records or records[0].dagster_run.status != dg.DagsterRunStatus.FAILURE:
        return None
    record = records[0]
    if (record.end_time or record.create_timestamp.timestamp()) <= since:
        return None
    return run_death(record.dagster_run.run_id, run_failure_text(instance, record.dagster_run.run_id))


def run_failure_text(instance: dg.DagsterInstance, run_id: str) -> str:
    """The error messages of a failed run's failed steps, innermost cause first (Dagster's own
    "Error occurred while executing op" wrapper last), else the run's failure reason."""
    texts: list[str] = []
    for entry in instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_FAILURE}):
        event = entry.dagster_event
        error = event.step_failure_data.error if event is not None else None
        chain = []
        while error is not None:
            chain.append(error.message.strip())
            error = error.cause
        for text in reversed(chain):
            body = text.split(": ", 1)[-1]
            if not any(body in seen for seen in texts):  # dg.Failure repeating its cause
                texts.append(text)
    if not texts:
        run = instance.get_run_by_id(run_id)
        failure = run.tags.get("dagster/failure_reason") if run is not None else None
        texts.append(failure or "the restart run failed")
    return "\n".join(texts)


def restart_in_progress(instance: dg.DagsterInstance, flow_name: str) -> bool:
    """Whether a restart run for the flow is queued or running."""
    unfinished = [
        dg.DagsterRunStatus.QUEUED,
        dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED,
    ]
    runs = instance.get_runs(
        filters=dg.RunsFilter(tags={RESTART_TAG: "true", FLOW_TAG: flow_name}, statuses=unfinished), limit=1
    )
    return bool(runs)


def build_job_health_checks(graph: LoomAssetGraph) -> list[dg.AssetChecksDefinition]:
    """Declares ``job_running`` on every flow asset; executing it reports the job's state now.
    (``build_loom_defs`` declares it with ``kafka_lag`` in shared ops: ``job_running_check_kind``.)"""
    kind = job_running_check_kind(graph)
    if kind is None:
        return []
    return declared_check_ops("loom_job_running_checks", kind.specs, kind.evaluate)


def job_running_check_kind(graph: LoomAssetGraph) -> CheckKind | None:
    """The ``job_running`` checks of every flow asset and their one-shot evaluation (``None``: no flow)."""
    keys = {node.compiled.flow.name: node.spec.key for node in graph.flows}
    if not keys:
        return None
    specs = [
        dg.AssetCheckSpec(
            JOB_RUNNING,
            asset=key,
            description="The deployed Bytewax job is alive, heartbeating and connected to its source.",
        )
        for key in keys.values()
    ]

    def _checks(context: dg.AssetCheckExecutionContext, loom: LoomDeployResource) -> Any:
        deployer = loom.deployer()
        selected = context.selected_asset_check_keys
        for flow_name, key in keys.items():
            if dg.AssetCheckKey(key, JOB_RUNNING) not in selected:
                continue
            yield one_shot_result(deployer, flow_name, key, loom.health_timeout_s)

    return CheckKind(JOB_RUNNING, specs, _checks)


def one_shot_result(deployer: Any, flow_name: str, key: dg.AssetKey, grace_s: float) -> dg.AssetCheckResult:
    """``job_running`` evaluated now, for a flow (not deployed / other host / its health)."""
    deployment = deployer.store.current(flow_name)
    if deployment is None:
        return dg.AssetCheckResult(
            asset_key=key,
            check_name=JOB_RUNNING,
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description="never deployed on this host; materialize the flow to deploy it",
        )
    launcher = deployer.launcher_for(deployment)
    if not launcher.owns(deployment.job):
        return dg.AssetCheckResult(
            asset_key=key,
            check_name=JOB_RUNNING,
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"deployed on host {deployment.host!r}; health can only be read there",
        )
    report = launcher.report(deployment.job)
    health = assess(deployment, report, key, grace_s, _uptime(launcher, deployment, report))
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=JOB_RUNNING,
        passed=health.verdict.passed,
        severity=health.severity,
        description=health.verdict.description,
        metadata=health.metadata,
    )


def _uptime(launcher: Launcher, deployment: Deployment, report: JobReport) -> float | None:
    """The job's uptime when any process runs (the launcher reads it where the job lives)."""
    return launcher.uptime(deployment.job) if report.alive_processes > 0 else None


# --------------------------------------------------------------------------- orphan jobs

ORPHAN_TIMEOUT_S = 5.0
"""Bound of the one fence describe per cluster per tick."""


def fence_targets(graph: LoomAssetGraph) -> list[FenceTarget]:
    """The fence of every Kafka-sourced flow of *graph* (cluster from its consumer settings)."""
    targets = []
    for node in graph.flows:
        flow = node.compiled.flow
        settings = getattr(node.compiled.plan.source, "settings", None)
        if flow.source_kind == "kafka" and flow.consumer_group and settings is not None:
            targets.append(FenceTarget(flow.name, flow.consumer_group, cluster_for(settings)))
    return targets


def tick_orphans(
    store: DeploymentStore,
    records: Mapping[str, Deployment | None],
    targets: Sequence[FenceTarget],
    log: Any,
    launcher: Launcher | None = None,
) -> OrphanReport:
    """This tick's orphans of the graph's flows, whose current *records* the tick has read (fence
    holders + the processes *launcher* sees); never raises."""
    try:
        report = find_orphans(
            store, records=records, targets=targets, timeout_s=ORPHAN_TIMEOUT_S, launcher=launcher
        )
    except Exception as exc:  # a broken probe must not stop health reporting
        log.warning(f"orphan job check failed: {redact_text(str(exc))}")
        return OrphanReport()
    for reason in report.unreachable:
        log.warning(f"fence holders not read (orphan jobs found from this host's processes only): {reason}")
    return report


def orphan_evaluation(key: dg.AssetKey, orphans: Sequence[Orphan], state_dir: Any) -> dg.AssetCheckEvaluation:
    """``job_running`` failing (ERROR) because a job with no deployment record here consumes the group."""
    description = "; ".join(o.describe(state_dir) for o in orphans)
    metadata: dict[str, Any] = {
        "loom/state": "orphan",
        "loom/detail": description,
        "loom/orphans": dg.MetadataValue.json(
            [
                {
                    "host": o.host,
                    "pid": o.pid,
                    "group": o.consumer_group,
                    "found_by": o.found_by,
                    "run_id": o.run_id,
                }
                for o in orphans
            ]
        ),
    }
    return dg.AssetCheckEvaluation(
        asset_key=key,
        check_name=JOB_RUNNING,
        passed=False,
        severity=dg.AssetCheckSeverity.ERROR,
        description=clip(description, MAX_ERROR_CHARS, keep_tail=False),
        metadata=metadata,
    )
