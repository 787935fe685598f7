"""Job health sensor (a reconciler): observe every deployed flow, report ``job_running``, restart dead
or hung jobs with exponential backoff and a cap on restarts per window; never restart an undeployed flow.

Deterministic failures are not restarted at all:

- a job that exited 2 (bad input: import, config, compile, deploy check) fails the check with
  "bad input: restarting won't help: <reason>";
- a flow whose job dies with the same error twice in a row (within ``restart_window_s``) fails it with
  "failed N times with the same error; restarting won't help until the cause is fixed: <error>".
  A *death* is a deployed job found dead with a final error (exit 1), or a restart run (one this
  sensor requested) that failed, e.g. because the relaunched job died before its health gate or a
  pre-launch check refused it. Errors are compared by :func:`error_signature` (first line, digits
  masked). Deaths without an error (SIGKILL) or before the first poll (exit 3: broker unreachable,
  the job's HTTP port taken; often transient) never count, and keep the backoff/cap behaviour.

Both halts hold until a new deployment (a materialization that succeeds) replaces the failed one.
"""

import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
import msgspec

from loom_dagster.checks import JOB_RUNNING, RESTART_TAG
from loom_dagster.defs_state import Lazy
from loom_dagster.deployments import Deployment, DeploymentStore
from loom_dagster.graph import LoomAssetGraph
from loom_dagster.kafka_lag import cluster_for
from loom_dagster.launchers.base import JobReport, JobState, Launcher
from loom_dagster.orphans import FenceTarget, Orphan, OrphanReport, find_orphans
from loom_dagster.redact import redact_text
from loom_dagster.resources import LoomDeployResource
from loom_dagster.runtime.status import EXIT_BAD_INPUT, EXIT_FLOW_FAILED, SinkError, describe_exit_code
from loom_dagster.sensors.check_ops import CheckKind, declared_check_ops
from loom_dagster.sensors.regression import RegressionWatch, Watched
from loom_dagster.sensors.settings import JobHealthSettings

FLOW_TAG = "loom/flow"
SAME_ERROR_LIMIT = 2
"""Deaths in a row with the same error after which restarts stop (until a new deployment)."""
MAX_ERROR_CHARS = 2000
"""Cap of an error text kept in the cursor and shown in a check description."""
_REMEMBERED_DEATHS = 20


class RestartState(msgspec.Struct):
    """Per-flow restart bookkeeping kept in the sensor cursor.

    ``deaths`` are the keys of deaths already counted (``job:<pids>@<start>`` or ``run:<id>``);
    ``same_error_deaths`` counts the last deaths in a row whose ``last_signature`` is equal;
    ``halted`` says why restarts stopped, until the deployment differs from ``halted_deployment``.
    """

    restarts: list[float] = msgspec.field(default_factory=list)
    consecutive: int = 0
    next_restart_at: float = 0.0
    gave_up: bool = False
    deaths: list[str] = msgspec.field(default_factory=list)
    last_signature: str | None = None
    last_error: str | None = None
    last_death_at: float = 0.0
    same_error_deaths: int = 0
    halted: str | None = None
    halted_deployment: str | None = None
    watch: dict[str, Any] = msgspec.field(default_factory=dict)
    """The regression watch of the current deployment (``progress.WatchState``; empty when off)."""


class Death(msgspec.Struct, frozen=True):
    """One failure of a flow's job: where it was seen, its error, and whether it is bad input."""

    key: str
    error: str
    signature: str | None
    bad_input: bool = False


class FlowHealth(msgspec.Struct, frozen=True):
    """What one tick concluded for one flow."""

    flow_name: str
    asset_key: dg.AssetKey
    passed: bool
    severity: dg.AssetCheckSeverity
    description: str
    metadata: dict[str, Any]
    restart_reason: str | None = None
    death: Death | None = None


_STATE_FIELDS = frozenset(f.name for f in msgspec.structs.fields(RestartState))


def load_cursor(raw: str | None) -> dict[str, RestartState]:
    """Restart states from a sensor cursor (empty on a first tick or a corrupt cursor; older cursors
    lacking newer fields get their defaults)."""
    try:
        data = json.loads(raw) if raw else {}
        return {
            name: RestartState(**{k: v for k, v in state.items() if k in _STATE_FIELDS})
            for name, state in data.items()
        }
    except (ValueError, TypeError, AttributeError):
        return {}


def dump_cursor(states: dict[str, RestartState]) -> str:
    """Sensor cursor for restart states."""
    return json.dumps({name: msgspec.structs.asdict(state) for name, state in states.items()}, sort_keys=True)


def assess(
    deployment: Deployment,
    report: JobReport,
    asset_key: dg.AssetKey,
    starting_grace_s: float,
    uptime_s: float | None = None,
) -> FlowHealth:
    """Health of one deployed flow from the launcher's report (and uptime) and the job's status records."""
    metadata = job_metadata(deployment, report, uptime_s)
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
    death = job_death(deployment, report) if report.state is JobState.DEAD else None
    if death is not None and death.bad_input:
        reason = f"bad input: restarting won't help: {death.error}"
        return FlowHealth(name, asset_key, False, dg.AssetCheckSeverity.ERROR, reason, metadata, death=death)
    reason = f"{report.state.value}: {_headline(report)}"
    if report.self_healing:  # the platform restarts it (Kubernetes): report, relaunch nothing
        reason += "; the platform restarts it, not this sensor"
        return FlowHealth(name, asset_key, False, dg.AssetCheckSeverity.ERROR, reason, metadata, death=death)
    return FlowHealth(
        name,
        asset_key,
        False,
        dg.AssetCheckSeverity.ERROR,
        reason,
        metadata,
        restart_reason=reason,
        death=death,
    )


def _headline(report: JobReport) -> str:
    """The job's failure in one phrase: the sink that could not write, else the launcher's reason."""
    sink_error = active_sink_error(report.statuses)
    if sink_error is None:
        return report.reason
    codes = sorted({int(s["exit_code"]) for s in report.statuses if s.get("exit_code") is not None})
    exited = "; ".join(f"the job exited {code} ({describe_exit_code(code)})" for code in codes)
    return f"{sink_error.summary()} (last at {_clock(sink_error.at)})" + (f"; {exited}" if exited else "")


def active_sink_error(statuses: Sequence[Mapping[str, Any]]) -> SinkError | None:
    """The most recent sink error of the job's processes that no later write to that sink cleared."""
    errors = [SinkError.from_dict(status.get("sink_error")) for status in statuses]
    active = [error for error in errors if error is not None and error.active]
    return max(active, key=lambda error: error.at, default=None)


def job_death(deployment: Deployment, report: JobReport) -> Death | None:
    """The death of a dead job, from its processes' final records (``None`` if none has one)."""
    failed = [s for s in report.statuses if s.get("state") == "failed" and s.get("exit_code") is not None]
    if not failed:
        return None
    status = next((s for s in failed if s.get("exit_code") == EXIT_BAD_INPUT), failed[0])
    code = int(status["exit_code"])
    error = _clip(redact_text(str(status.get("error") or describe_exit_code(code))), MAX_ERROR_CHARS)
    signature = error_signature(error) if code == EXIT_FLOW_FAILED else None
    return Death(f"job:{deployment_key(deployment)}", error, signature, bad_input=code == EXIT_BAD_INPUT)


def deployment_key(deployment: Deployment) -> str:
    """Identity of one launch of a flow's job (a restart or a new deployment changes it)."""
    pids = ",".join(str(p.pid) for p in deployment.job.processes)
    return f"{pids}@{deployment.job.started_at:.3f}"


_CUT = re.compile(r" \(while: | \| |\n|\[SQL: |\[parameters: ")
_PHASE = re.compile(r"^(?:failed at run time|failed before its first poll|failed while draining after \w+): ")
_EXIT = re.compile(r"\bexit(?:ed with code)? (-?\d+)(?: \([^)]*\))?: ")


def error_signature(text: str) -> str:
    """What two failures must share to count as "the same error": the first line of the error (no
    ``(while: ...)`` context, SQL or parameters), without the run phase, digits masked.

    Example:
        >>> error_signature("failed at run time: sink 'rows' failed to write: OperationalError: "
        ...                 "no such table: rows (while: ...) | [parameters: [('i0', 0)]]")
        "sink 'rows' failed to write: OperationalError: no such table: rows"
    """
    head = _CUT.split(text.strip(), maxsplit=1)[0]
    head = _PHASE.sub("", head.strip())
    head = re.sub(r"\d+", "#", head)
    return re.sub(r"\s+", " ", head).strip().rstrip(").;: ")[:300]


def run_death(run_id: str, message: str) -> Death:
    """The death a failed restart run stands for: the relaunched job's final error when the message
    carries one (``exit N: <error>``), else the run's own error (e.g. a pre-launch check)."""
    text = _clip(redact_text(message), MAX_ERROR_CHARS)
    found = _EXIT.search(text)
    if found is None:
        return Death(f"run:{run_id}", text, error_signature(text))
    code = int(found.group(1))
    error = text[found.end() :]
    signature = error_signature(error) if code == EXIT_FLOW_FAILED else None
    return Death(f"run:{run_id}", text, signature, bad_input=code == EXIT_BAD_INPUT)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


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
        metadata["loom/error"] = dg.MetadataValue.text(_clip(text, MAX_ERROR_CHARS))
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


def count_death(state: RestartState, death: Death, now: float, window_s: float) -> bool:
    """Count ``death`` once (by key); extend or restart the same-error streak. True if it was new."""
    if death.key in state.deaths:
        return False
    state.deaths = [*state.deaths, death.key][-_REMEMBERED_DEATHS:]
    recent = now - state.last_death_at < window_s
    if death.signature is not None and death.signature == state.last_signature and recent:
        state.same_error_deaths += 1
    else:
        state.same_error_deaths = 1 if death.signature is not None else 0
    state.last_signature = death.signature
    state.last_error = death.error
    state.last_death_at = now
    return True


def halt_reason(state: RestartState, death: Death | None) -> str | None:
    """Why restarting cannot help (bad input, the same error again), or ``None``."""
    if death is not None and death.bad_input:
        return f"bad input: restarting won't help: {death.error}"
    if state.same_error_deaths >= SAME_ERROR_LIMIT:
        return (
            f"failed {state.same_error_deaths} times with the same error; restarting won't help until "
            f"the cause is fixed: {state.last_error}"
        )
    return None


def update_halt(state: RestartState, deployment: str, death: Death | None) -> None:
    """Clear a halt when the deployment changed since; halt when the latest death says so."""
    if state.halted is not None and state.halted_deployment != deployment:
        state.halted = state.halted_deployment = state.last_signature = state.last_error = None
        state.same_error_deaths = 0
    reason = halt_reason(state, death)
    if reason is not None and state.halted is None:
        state.halted, state.halted_deployment = reason, deployment


def reset_backoff_when_stable(
    state: RestartState, settings: JobHealthSettings, now: float, job_started_at: float
) -> bool:
    """Start the backoff over once the running job has been healthy for ``backoff_reset_after_s``.

    One healthy tick is not enough: a job that dies seconds after each start would otherwise be
    restarted at the initial backoff every time, until the cap.
    """
    if now - job_started_at < settings.backoff_reset_after_s:
        return False
    state.consecutive = 0
    state.gave_up = False
    return True


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
        watched: list[Watched] = []
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
                    watched.append(Watched(flow_name, key, deployment, report))
                description = health.description
                if health.passed and report.state is JobState.HEALTHY:
                    reset_backoff_when_stable(state, settings, now, deployment.job.started_at)
                in_progress = False
                if health.death is not None or health.restart_reason is not None:
                    in_progress = restart_in_progress(context.instance, flow_name)
                    latest = _observe_deaths(
                        context.instance, flow_name, state, health, now, settings, in_progress
                    )
                    update_halt(state, deployment_key(deployment), latest)
                elif state.halted is not None:
                    update_halt(state, deployment_key(deployment), None)
                if health.restart_reason is not None and state.halted is not None:
                    description = state.halted
                elif health.restart_reason is not None:
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
                        metadata=_check_metadata(report, health, state, description),
                    )
                )
        if watch is not None:  # after a deploy: roll back once a new version that stalls
            events.extend(watch.tick(deployer, watched, states, context.log))
        return dg.SensorResult(run_requests=requests, asset_events=events, cursor=dump_cursor(states))

    return _sensor


def _observe_deaths(
    instance: dg.DagsterInstance,
    flow_name: str,
    state: RestartState,
    health: FlowHealth,
    now: float,
    settings: JobHealthSettings,
    in_progress: bool,
) -> Death | None:
    """Count this tick's deaths (the dead job, then a restart run that failed since); the latest."""
    latest = None
    if health.death is not None:
        count_death(state, health.death, now, settings.restart_window_s)
        latest = health.death
    failed = None if in_progress else last_failed_restart(instance, flow_name, state.last_death_at)
    if failed is not None and count_death(state, failed, now, settings.restart_window_s):
        latest = failed
    return latest


def _check_metadata(
    report: JobReport, health: FlowHealth, state: RestartState, detail: str
) -> dict[str, Any]:
    """``job_running`` metadata: state, detail, and the failure's sink / error / streak when failing."""
    metadata: dict[str, Any] = {"loom/state": report.state.value, "loom/detail": detail}
    if health.passed:
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
        passed=health.passed,
        severity=health.severity,
        description=health.description,
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
        description=_clip(description, MAX_ERROR_CHARS),
        metadata=metadata,
    )
