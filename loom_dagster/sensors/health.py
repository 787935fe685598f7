"""Job health sensor (a reconciler): observe every deployed flow, report ``job_running``, restart dead
or hung jobs with exponential backoff and a cap on restarts per window; never restart an undeployed flow."""

import json
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dagster as dg

from loom_dagster.checks import JOB_RUNNING
from loom_dagster.deployments import Deployment
from loom_dagster.graph import LoomAssetGraph
from loom_dagster.launchers import procfs
from loom_dagster.launchers.base import JobReport, JobState
from loom_dagster.resources import LoomDeployResource
from loom_dagster.sensors.settings import JobHealthSettings

RESTART_TAG = "loom/restart"
FLOW_TAG = "loom/flow"


@dataclass
class RestartState:
    """Per-flow restart bookkeeping kept in the sensor cursor."""

    restarts: list[float] = field(default_factory=list)
    consecutive: int = 0
    next_restart_at: float = 0.0
    gave_up: bool = False


@dataclass(frozen=True)
class FlowHealth:
    """What one tick concluded for one flow."""

    flow_name: str
    asset_key: dg.AssetKey
    passed: bool
    severity: dg.AssetCheckSeverity
    description: str
    metadata: dict[str, Any]
    restart_reason: str | None = None


def load_cursor(raw: str | None) -> dict[str, RestartState]:
    """Restart states from a sensor cursor (empty on a first tick or a corrupt cursor)."""
    try:
        data = json.loads(raw) if raw else {}
        return {name: RestartState(**state) for name, state in data.items()}
    except (ValueError, TypeError):
        return {}


def dump_cursor(states: dict[str, RestartState]) -> str:
    """Sensor cursor for restart states."""
    return json.dumps({name: asdict(state) for name, state in states.items()}, sort_keys=True)


def assess(
    deployment: Deployment, report: JobReport, asset_key: dg.AssetKey, starting_grace_s: float
) -> FlowHealth:
    """Health of one deployed flow from the launcher's report and the job's status records."""
    metadata = job_metadata(deployment, report)
    name = deployment.flow_name
    if deployment.stopped_on_purpose:
        return FlowHealth(
            name,
            asset_key,
            False,
            dg.AssetCheckSeverity.WARN,
            f"stopped on purpose by {deployment.stopped_by}; not restarted (materialize to deploy again)",
            metadata,
        )
    if report.state is JobState.HEALTHY:
        return FlowHealth(
            name, asset_key, True, dg.AssetCheckSeverity.ERROR, "running and connected", metadata
        )
    if report.state is JobState.STARTING and time.time() - deployment.job.started_at < starting_grace_s:
        return FlowHealth(name, asset_key, True, dg.AssetCheckSeverity.WARN, "starting", metadata)
    reason = f"{report.state.value}: {report.reason}"
    return FlowHealth(
        name, asset_key, False, dg.AssetCheckSeverity.ERROR, reason, metadata, restart_reason=reason
    )


def job_metadata(deployment: Deployment, report: JobReport) -> dict[str, Any]:
    """Observation metadata: state, uptime, restarts, counts and last write per sink."""
    job = deployment.job
    uptimes = [procfs.uptime_seconds(p.pid) for p in job.processes if procfs.is_alive(p.pid, p.start_ticks)]
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
        "loom/reason": report.reason,
        "loom/pids": ", ".join(str(p.pid) for p in job.processes),
        "loom/alive_processes": dg.MetadataValue.int(report.alive_processes),
        "loom/restarts": dg.MetadataValue.int(deployment.restarts),
        "loom/plan_hash": deployment.plan_hash,
        "loom/records_in": dg.MetadataValue.int(sum(int(s.get("records_in") or 0) for s in statuses)),
        "loom/records_out": dg.MetadataValue.int(sum(int(s.get("records_out") or 0) for s in statuses)),
        "loom/errors": dg.MetadataValue.int(sum(int(s.get("errors") or 0) for s in statuses)),
        "loom/sinks": dg.MetadataValue.json(sinks),
    }
    if uptimes and all(u is not None for u in uptimes):
        metadata["loom/uptime_s"] = dg.MetadataValue.float(round(min(u for u in uptimes if u is not None), 1))
    for sink, info in sinks.items():
        if info["last_write_at"]:
            metadata[f"loom/last_write/{sink}"] = dg.MetadataValue.timestamp(info["last_write_at"])
    return metadata


def plan_restart(
    state: RestartState, settings: JobHealthSettings, now: float, run_in_progress: bool
) -> tuple[bool, str | None]:
    """Whether to restart now; and, when not, why (backoff, cap, a restart run still in progress)."""
    if not settings.restart:
        return False, "automatic restarts are disabled"
    if run_in_progress:
        return False, "a restart run is still queued or running"
    state.restarts = [t for t in state.restarts if now - t < settings.restart_window_s]
    if len(state.restarts) >= settings.max_restarts:
        state.gave_up = True
        return False, (
            f"restart cap reached: {len(state.restarts)} restarts in the last "
            f"{settings.restart_window_s:.0f}s; not restarting again until the window clears"
        )
    state.gave_up = False
    if now < state.next_restart_at:
        return False, f"backing off; next restart in {state.next_restart_at - now:.0f}s"
    return True, None


def record_restart(state: RestartState, settings: JobHealthSettings, now: float) -> None:
    """Book one restart: the next one waits ``initial * 2**consecutive`` seconds, capped."""
    state.restarts.append(now)
    delay = min(settings.backoff_max_s, settings.backoff_initial_s * (2**state.consecutive))
    state.consecutive += 1
    state.next_restart_at = now + delay


def build_job_health_sensor(
    graph: LoomAssetGraph,
    settings: JobHealthSettings,
    *,
    name: str = "loom_job_health",
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
) -> dg.SensorDefinition:
    """The reconciler: observations + ``job_running`` for every deployed flow, restarts with backoff.

    Example:
        >>> from loom_dagster.sensors.settings import JobHealthSettings
        >>> sensor = build_job_health_sensor(graph, JobHealthSettings(interval_s=5))  # doctest: +SKIP
    """
    flow_keys = {node.compiled.flow.name: node.spec.key for node in graph.flows}

    @dg.sensor(
        name=name,
        minimum_interval_seconds=settings.interval_s,
        default_status=default_status,
        target=dg.AssetSelection.assets(*flow_keys.values()) if flow_keys else None,
        description="Watches deployed loom jobs: alive, heartbeating, connected. Restarts dead or hung "
        "jobs by re-materializing the flow, with exponential backoff and a cap per window.",
    )
    def _sensor(context: dg.SensorEvaluationContext, loom: LoomDeployResource) -> dg.SensorResult:
        deployer = loom.deployer()
        states = load_cursor(context.cursor)
        now = time.time()
        events: list[Any] = []
        requests: list[dg.RunRequest] = []
        for flow_name, key in flow_keys.items():
            deployment = deployer.store.current(flow_name)
            if deployment is None or deployment.host != socket.gethostname():
                continue
            report = deployer.launcher.report(deployment.job)
            health = assess(deployment, report, key, loom.health_timeout_s)
            state = states.setdefault(flow_name, RestartState())
            description = health.description
            if health.passed and report.state is JobState.HEALTHY:
                state.consecutive = 0
                state.gave_up = False
            if health.restart_reason is not None:
                in_progress = restart_in_progress(context.instance, flow_name)
                restart, why_not = plan_restart(state, settings, now, in_progress)
                if restart:
                    request = dg.RunRequest(
                        run_key=f"loom-restart-{flow_name}-{int(now * 1000)}",
                        asset_selection=[key],
                        tags={
                            RESTART_TAG: "true",
                            FLOW_TAG: flow_name,
                            "loom/restart_reason": health.restart_reason[:200],
                        },
                    )
                    requests.append(request)
                    record_restart(state, settings, now)
                    description += f"; restart requested (#{len(state.restarts)} in window)"
                    context.log.info(f"restarting flow {flow_name!r}: {health.restart_reason}")
                elif why_not:
                    description += f"; {why_not}"
            events.append(dg.AssetObservation(asset_key=key, metadata=health.metadata))
            events.append(
                dg.AssetCheckEvaluation(
                    asset_key=key,
                    check_name=JOB_RUNNING,
                    passed=health.passed,
                    severity=dg.AssetCheckSeverity.ERROR if state.gave_up else health.severity,
                    description=description,
                    metadata={"loom/state": report.state.value, "loom/detail": description},
                )
            )
        return dg.SensorResult(run_requests=requests, asset_events=events, cursor=dump_cursor(states))

    return _sensor


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


def build_job_health_checks(graph: LoomAssetGraph) -> dg.AssetChecksDefinition | None:
    """Declares ``job_running`` on every flow asset; executing it reports the job's state now."""
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

    @dg.multi_asset_check(specs=specs, name="loom_job_running_checks", can_subset=True)
    def _checks(context: dg.AssetCheckExecutionContext, loom: LoomDeployResource) -> Any:
        deployer = loom.deployer()
        selected = context.selected_asset_check_keys
        for flow_name, key in keys.items():
            if dg.AssetCheckKey(key, JOB_RUNNING) not in selected:
                continue
            yield one_shot_result(deployer, flow_name, key, loom.health_timeout_s)

    return _checks


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
    if deployment.host != socket.gethostname():
        return dg.AssetCheckResult(
            asset_key=key,
            check_name=JOB_RUNNING,
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"deployed on host {deployment.host!r}; health can only be read there",
        )
    health = assess(deployment, deployer.launcher.report(deployment.job), key, grace_s)
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=JOB_RUNNING,
        passed=health.passed,
        severity=health.severity,
        description=health.description,
        metadata=health.metadata,
    )


def flow_names(graph: LoomAssetGraph) -> Sequence[str]:
    """Names of the graph's flows."""
    return [node.compiled.flow.name for node in graph.flows]
