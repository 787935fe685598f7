"""Restart policy of the job health sensor (a reconciler), no Dagster here: from what the launcher reports
of a deployed flow's job, a verdict (``judge``); from the verdict and the flow's restart bookkeeping
(``RestartState``, kept in the sensor cursor), whether to restart the job now, and why not (``decide``).

Dead or hung jobs are restarted with exponential backoff (``backoff_initial_s * 2**n``, capped at
``backoff_max_s``) and a cap of ``max_restarts`` per ``restart_window_s``; the backoff starts over once
a job stayed healthy ``backoff_reset_after_s``. An undeployed flow, a job stopped on purpose and a job
the platform restarts itself (Kubernetes) are never restarted.

Deterministic failures are not restarted at all:

- a job that exited 2 (bad input: import, config, compile, deploy check) fails the check with
  "bad input: restarting won't help: <reason>";
- a flow whose job dies with the same error twice in a row (within ``restart_window_s``) fails it with
  "failed N times with the same error; restarting won't help until the cause is fixed: <error>".
  A *death* is a deployed job found dead with a final error (exit 1), or a restart run (one the
  sensor requested) that failed, e.g. because the relaunched job died before its health gate or a
  pre-launch check refused it. Errors are compared by :func:`error_signature` (first line, digits
  masked). Deaths without an error (SIGKILL) or before the first poll (exit 3: broker unreachable,
  the job's HTTP port taken; often transient) never count, and keep the backoff/cap behaviour.

Both halts hold until a new deployment (a materialization that succeeds) replaces the failed one.

The sensor (``loom_dagster.sensors.health``) reads the reports and its restart runs, and turns the
decisions into Dagster events: the ``job_running`` check, run requests, log lines, its cursor.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import Any, Protocol

import msgspec

from loom_dagster.core.deploy.launch_records import JobReport, JobState
from loom_dagster.core.deploy.store import Deployment
from loom_dagster.core.job.failure import clip
from loom_dagster.core.job.status import EXIT_BAD_INPUT, EXIT_FLOW_FAILED, SinkError, describe_exit_code
from loom_dagster.core.redact import redact_text
from loom_dagster.core.sensor_settings import JobHealthSettings

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


class Severity(StrEnum):
    """Severity of a ``job_running`` verdict (maps to Dagster's ``AssetCheckSeverity``)."""

    WARN = "WARN"
    ERROR = "ERROR"


class JobVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """What one look at a deployed flow's job concluded (see ``judge``).

    ``launch``: the identity of the job's launch (``deployment_key``); ``restart_reason``: set when the
    sensor should restart the job (subject to ``decide``); ``death``: the job's death, if it died with a
    final record; ``running_since``: the job's start when it runs and is connected (the backoff starts
    over once it stayed so long enough).
    """

    passed: bool
    severity: Severity
    description: str
    launch: str
    restart_reason: str | None = None
    death: Death | None = None
    running_since: float | None = None


class Decision(msgspec.Struct, frozen=True):
    """What the sensor does for one flow this tick: request a restart run or not, and the ``job_running``
    check's description and severity (ERROR once the restart cap gave up)."""

    restart: bool
    description: str
    severity: Severity


class RestartRuns(Protocol):
    """The restart runs the sensor requested for one flow (the sensor reads them from Dagster)."""

    def in_progress(self) -> bool:
        """Whether a restart run of the flow is queued or running."""
        ...

    def last_failed(self, since: float) -> Death | None:
        """The newest restart run of the flow, if it failed after *since*: as a death with its error."""
        ...


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


# ----------------------------------------------------------------------------- the verdict


def judge(
    deployment: Deployment, report: JobReport, starting_grace_s: float, now: float | None = None
) -> JobVerdict:
    """The health of one deployed flow's job from the launcher's report and the job's status records:
    stopped on purpose, running, starting (within *starting_grace_s* of its start), bad input (never
    restarted), restarted by the platform, or dead/hung (restart it)."""
    launch = deployment_key(deployment)
    if deployment.stopped_on_purpose:
        return JobVerdict(
            passed=False,
            severity=Severity.WARN,
            description=f"stopped on purpose by {deployment.stopped_by}; not restarted (materialize to "
            "deploy again)",
            launch=launch,
        )
    if report.state is JobState.HEALTHY:
        return JobVerdict(
            passed=True,
            severity=Severity.ERROR,
            description="running and connected",
            launch=launch,
            running_since=deployment.job.started_at,
        )
    now = time.time() if now is None else now
    if report.state is JobState.STARTING and now - deployment.job.started_at < starting_grace_s:
        return JobVerdict(passed=True, severity=Severity.WARN, description="starting", launch=launch)
    death = job_death(deployment, report) if report.state is JobState.DEAD else None
    if death is not None and death.bad_input:
        reason = f"bad input: restarting won't help: {death.error}"
        return JobVerdict(
            passed=False, severity=Severity.ERROR, description=reason, launch=launch, death=death
        )
    reason = f"{report.state.value}: {_headline(report)}"
    if report.self_healing:  # the platform restarts it (Kubernetes): report, relaunch nothing
        reason += "; the platform restarts it, not this sensor"
        return JobVerdict(
            passed=False, severity=Severity.ERROR, description=reason, launch=launch, death=death
        )
    return JobVerdict(
        passed=False,
        severity=Severity.ERROR,
        description=reason,
        launch=launch,
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


def _clock(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


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
    error = clip_error(str(status.get("error") or describe_exit_code(code)))
    signature = error_signature(error) if code == EXIT_FLOW_FAILED else None
    return Death(f"job:{deployment_key(deployment)}", error, signature, bad_input=code == EXIT_BAD_INPUT)


def deployment_key(deployment: Deployment) -> str:
    """Identity of one launch of a flow's job (a restart or a new deployment changes it)."""
    pids = ",".join(str(p.pid) for p in deployment.job.processes)
    return f"{pids}@{deployment.job.started_at:.3f}"


def clip_error(text: str) -> str:
    """*text* redacted, then cut to ``MAX_ERROR_CHARS`` (its head and ``...``)."""
    return clip(redact_text(text), MAX_ERROR_CHARS, keep_tail=False)


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
    text = clip_error(message)
    found = _EXIT.search(text)
    if found is None:
        return Death(f"run:{run_id}", text, error_signature(text))
    code = int(found.group(1))
    error = text[found.end() :]
    signature = error_signature(error) if code == EXIT_FLOW_FAILED else None
    return Death(f"run:{run_id}", text, signature, bad_input=code == EXIT_BAD_INPUT)


# ----------------------------------------------------------------------------- the decision


def decide(
    state: RestartState,
    verdict: JobVerdict,
    settings: JobHealthSettings,
    now: float,
    runs: RestartRuns | None = None,
) -> Decision:
    """This tick's decision for one flow from its *verdict*; updates *state* (backoff, deaths, halt).

    The restart runs (*runs*; ``None``: none known) are read only when the job failed: one in progress
    blocks a new restart, and one that failed since the last death counts as a death.

    Example:
        >>> from loom_dagster.core.sensor_settings import JobHealthSettings
        >>> settings, state = JobHealthSettings(backoff_initial_s=10), RestartState()
        >>> dead = JobVerdict(passed=False, severity=Severity.ERROR, description="dead: exited 9",
        ...                   launch="4242@0.000", restart_reason="dead: exited 9")
        >>> decide(state, dead, settings, now=100.0).description
        'dead: exited 9; restart requested (#1 in window)'
        >>> decide(state, dead, settings, now=105.0).description
        'dead: exited 9; backing off; next restart in 5s'
    """
    description = verdict.description
    if verdict.passed and verdict.running_since is not None:
        reset_backoff_when_stable(state, settings, now, verdict.running_since)
    in_progress = False
    if verdict.death is not None or verdict.restart_reason is not None:
        in_progress = runs is not None and runs.in_progress()
        last_failed = None if in_progress or runs is None else runs.last_failed
        latest = observe_deaths(state, verdict.death, now, settings.restart_window_s, last_failed)
        update_halt(state, verdict.launch, latest)
    elif state.halted is not None:
        update_halt(state, verdict.launch, None)
    restart = False
    if verdict.restart_reason is not None and state.halted is not None:
        description = state.halted
    elif verdict.restart_reason is not None:
        restart, why_not = plan_restart(state, settings, now, in_progress)
        if restart:
            record_restart(state, settings, now)
            description += f"; restart requested (#{len(state.restarts)} in window)"
        elif why_not:
            description += f"; {why_not}"
    return Decision(restart, description, Severity.ERROR if state.gave_up else verdict.severity)


def observe_deaths(
    state: RestartState,
    death: Death | None,
    now: float,
    window_s: float,
    last_failed: Callable[[float], Death | None] | None = None,
) -> Death | None:
    """Count this tick's deaths (the dead job's, then a restart run's that failed since the last death,
    from *last_failed*); the latest one, or ``None``."""
    latest = None
    if death is not None:
        count_death(state, death, now, window_s)
        latest = death
    failed = None if last_failed is None else last_failed(state.last_death_at)
    if failed is not None and count_death(state, failed, now, window_s):
        latest = failed
    return latest


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
