"""The restart policy of ``loom_dagster.core.deploy.restart_policy`` on hand-made reports and deployments
(no broker, no Dagster; the sensor with real jobs is ``tests/integration/test_job_health.py``,
``test_hung_job_restart.py`` and ``test_sink_errors.py``)."""

from __future__ import annotations

import doctest
from typing import Any

import msgspec
import pytest

from loom_dagster.core.deploy import restart_policy
from loom_dagster.core.deploy.launch_records import JobReport, JobState
from loom_dagster.core.deploy.restart_policy import (
    MAX_ERROR_CHARS,
    Death,
    JobVerdict,
    RestartState,
    Severity,
    count_death,
    decide,
    deployment_key,
    dump_cursor,
    error_signature,
    halt_reason,
    job_death,
    judge,
    load_cursor,
    plan_restart,
    record_restart,
    reset_backoff_when_stable,
    run_death,
    update_halt,
)
from loom_dagster.core.deploy.store import Deployment
from loom_dagster.core.job.failure import clip
from loom_dagster.core.job.status import EXIT_BAD_INPUT, EXIT_FLOW_FAILED, EXIT_STARTUP_FAILED
from loom_dagster.core.sensor_settings import JobHealthSettings

NO_BACKOFF = JobHealthSettings(backoff_initial_s=0.0, backoff_max_s=0.0, max_restarts=10)
TABLE_GONE = "failed at run time: sink 'rows' failed to write: OperationalError: no such table: rows"


def _deployment(pids: tuple[int, ...] = (4242,), started_at: float = 1000.0, **fields: Any) -> Deployment:
    raw = {
        "flow_name": "f",
        "plan_hash": "p1",
        "config_hash": "c",
        "deployed_at": started_at,
        "job": {
            "flow_name": "f",
            "launcher": "local",
            "host": "h",
            "processes": [{"pid": pid, "start_ticks": 1} for pid in pids],
            "log_path": "",
            "started_at": started_at,
            "request": {
                "flow_name": "f",
                "import_path": "m:f",
                "config_files": [],
                "environment": "test",
                "plan_hash": "p1",
                "config_hash": "c",
            },
        },
        **fields,
    }
    return msgspec.convert(raw, Deployment)


def _failed(code: int, error: str | None = None) -> dict[str, Any]:
    return {"state": "failed", "exit_code": code, "error": error}


def _dead(
    *statuses: dict[str, Any], reason: str = "no process left", self_healing: bool = False
) -> JobReport:
    return JobReport(JobState.DEAD, reason, 0, tuple(statuses), self_healing=self_healing)


class FakeRuns:
    """Restart runs as the sensor would read them: counts the reads."""

    def __init__(self, in_progress: bool = False, failed: Death | None = None) -> None:
        self.running, self.failed = in_progress, failed
        self.reads: list[str] = []

    def in_progress(self) -> bool:
        self.reads.append("in_progress")
        return self.running

    def last_failed(self, since: float) -> Death | None:
        self.reads.append(f"last_failed>{since:g}")
        return self.failed


def test_the_docstring_examples_run() -> None:
    assert doctest.testmod(restart_policy).failed == 0


# ----------------------------------------------------------------------------- the verdict


def test_verdicts_of_the_report_states() -> None:
    deployment = _deployment()
    healthy = judge(deployment, JobReport(JobState.HEALTHY, "ok", 1), 60, now=1001)
    assert (healthy.passed, healthy.severity, healthy.description) == (
        True,
        Severity.ERROR,
        "running and connected",
    )
    assert healthy.running_since == 1000.0 and healthy.restart_reason is None
    assert healthy.launch == deployment_key(deployment) == "4242@1000.000"

    starting = JobReport(JobState.STARTING, "not polled yet", 1)
    within = judge(deployment, starting, 60, now=1059)
    assert (within.passed, within.severity, within.description) == (True, Severity.WARN, "starting")
    assert within.running_since is None
    late = judge(deployment, starting, 60, now=1060)  # the grace is over: restart it
    assert not late.passed and late.restart_reason == "starting: not polled yet"

    hung = judge(deployment, JobReport(JobState.HUNG, "no heartbeat for 90s", 1), 60, now=2000)
    assert hung.restart_reason == hung.description == "hung: no heartbeat for 90s"
    assert hung.severity is Severity.ERROR and hung.death is None

    killed = judge(deployment, _dead(reason="died without a final status"), 60, now=2000)
    assert killed.restart_reason == "dead: died without a final status" and killed.death is None


def test_stopped_on_purpose_is_a_warning_and_never_restarted() -> None:
    stopped = _deployment(stopped_at=1500.0, stopped_by="alice")
    verdict = judge(stopped, _dead(_failed(EXIT_FLOW_FAILED, TABLE_GONE)), 60, now=2000)
    assert not verdict.passed and verdict.severity is Severity.WARN
    assert verdict.restart_reason is None and verdict.death is None
    assert verdict.description.startswith("stopped on purpose by alice; not restarted")


def test_bad_input_is_reported_not_restarted() -> None:
    verdict = judge(_deployment(), _dead(_failed(EXIT_BAD_INPUT, "cannot import m:f")), 60, now=2000)
    assert not verdict.passed and verdict.restart_reason is None
    assert verdict.description == "bad input: restarting won't help: cannot import m:f"
    assert verdict.death is not None and verdict.death.bad_input and verdict.death.signature is None


def test_a_self_healing_platform_restarts_the_job_not_the_sensor() -> None:
    report = _dead(_failed(EXIT_FLOW_FAILED, TABLE_GONE), reason="pod crashed", self_healing=True)
    verdict = judge(_deployment(), report, 60, now=2000)
    assert verdict.restart_reason is None and verdict.death is not None  # the death still counts
    assert verdict.description == "dead: pod crashed; the platform restarts it, not this sensor"


def test_an_active_sink_error_is_the_headline() -> None:
    sink_error = {"sink": "rows", "at": 1500.0, "error": "no such table: rows\n[SQL: INSERT]", "count": 3}
    report = _dead({"state": "failed", "exit_code": 1, "error": TABLE_GONE, "sink_error": sink_error})
    verdict = judge(_deployment(), report, 60, now=2000)
    assert verdict.description.startswith("dead: sink 'rows' failed to write (3 times): no such table: rows")
    assert verdict.description.endswith("; the job exited 1 (the flow failed at run time)")
    recovered = {**sink_error, "recovered_at": 1600.0}  # a later write cleared it: the launcher's reason
    report = _dead({"state": "failed", "exit_code": 1, "sink_error": recovered}, reason="exited 1")
    assert judge(_deployment(), report, 60, now=2000).description == "dead: exited 1"


def test_job_death_from_the_final_records() -> None:
    deployment = _deployment(pids=(7, 8))
    assert job_death(deployment, _dead({"state": "failed", "exit_code": None})) is None
    assert job_death(deployment, _dead({"state": "running", "exit_code": 1})) is None
    death = job_death(deployment, _dead(_failed(EXIT_FLOW_FAILED, TABLE_GONE)))
    assert death == Death(
        "job:7,8@1000.000",
        TABLE_GONE,
        "sink 'rows' failed to write: OperationalError: no such table: rows",
    )
    # one process exited 2 (bad input), another 1: the bad input wins
    death = job_death(
        deployment, _dead(_failed(EXIT_FLOW_FAILED, TABLE_GONE), _failed(EXIT_BAD_INPUT, "bad yaml"))
    )
    assert death is not None and death.bad_input and death.error == "bad yaml"
    # exit 3 (before the first poll: broker down, port taken) has no signature: it never halts
    death = job_death(deployment, _dead(_failed(EXIT_STARTUP_FAILED)))
    assert death is not None and death.signature is None and not death.bad_input
    assert (
        death.error == "the flow failed before its first successful poll"
    )  # no error: the exit code's meaning


def test_a_death_error_is_redacted_then_clipped() -> None:
    error = "failed at run time: postgresql://app:hunter2@db/x refused " + "y" * 5000
    death = job_death(_deployment(), _dead(_failed(EXIT_FLOW_FAILED, error)))
    assert death is not None and "hunter2" not in death.error and "app:***@db" in death.error
    assert len(death.error) == MAX_ERROR_CHARS and death.error.endswith("y...")
    text = run_death("r1", error).error
    assert "hunter2" not in text and len(text) == MAX_ERROR_CHARS and text.endswith("...")


# ----------------------------------------------------------------------------- signatures and deaths


def test_error_signature_ignores_phase_context_parameters_and_numbers() -> None:
    first = (
        "failed at run time: sink 'readings_sql' failed to write: OperationalError: no such table: readings "
        "(while: (sqlite3.OperationalError) no such table: readings | [SQL: INSERT ...] | "
        "[parameters: [('i0', 0), ('i1', 1)]])"
    )
    second = first.replace("'i0', 0", "'i7', 7").replace("failed at run time", "failed before its first poll")
    assert error_signature(first) == error_signature(second)
    assert (
        error_signature(first)
        == "sink 'readings_sql' failed to write: OperationalError: no such table: readings"
    )
    assert error_signature("no such table: a") != error_signature("no such table: b")


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("timeout after 30s on partition 4", "timeout after 120s on partition 11", True),
        ("failed while draining after SIGTERM: boom", "failed at run time: boom", True),
        ("boom\nTraceback line 1", "boom\nTraceback line 2", True),
        ("  boom.  ", "boom", True),
        ("boom", "bang", False),
        ("sink 'a' failed to write: x", "sink 'b' failed to write: x", False),
    ],
)
def test_error_signatures_group_failures(first: str, second: str, same: bool) -> None:
    assert (error_signature(first) == error_signature(second)) is same


def test_error_signature_is_capped() -> None:
    assert len(error_signature("x" * 1000)) == 300


def test_run_death_reads_the_relaunched_jobs_exit_code() -> None:
    gate = (
        "DeploymentError: the new version of flow 'readings' failed its health gate and was stopped: the job "
        "exited during start-up: process 0 (pid 4242) is not running (failed, exit 1: failed at run time: "
        "sink 'readings_sql' failed to write: IntegrityError: readings are frozen (while: ...)).\nlog tail"
    )
    death = run_death("r1", gate)
    assert death.key == "run:r1" and not death.bad_input
    assert death.signature == "sink 'readings_sql' failed to write: IntegrityError: readings are frozen"
    assert run_death("r2", gate.replace("exit 1:", "exit 3:")).signature is None  # may be transient
    assert run_death("r3", gate.replace("exit 1:", "exit 2:")).bad_input
    refused = run_death("r4", "SinkTablesError: flow 'readings': 1 problem(s) with the tables")
    assert refused.signature == "SinkTablesError: flow 'readings': # problem(s) with the tables"


def test_same_error_twice_halts_until_a_new_deployment() -> None:
    state = RestartState()
    error = "sink 'x' failed to write: no such table: t"
    assert count_death(state, Death("job:1@1.0", error, error_signature(error)), now=100, window_s=3600)
    assert not count_death(state, Death("job:1@1.0", error, error_signature(error)), now=101, window_s=3600)
    update_halt(state, "1@1.0", None)
    assert state.halted is None and state.same_error_deaths == 1
    count_death(state, Death("run:r1", error, error_signature(error)), now=110, window_s=3600)
    update_halt(state, "1@1.0", None)
    assert state.halted == (
        "failed 2 times with the same error; restarting won't help until the cause is fixed: " + error
    )
    restored = load_cursor(dump_cursor({"f": state}))["f"]
    assert restored == state
    update_halt(restored, "1@1.0", None)  # same deployment: still halted
    assert restored.halted is not None
    update_halt(restored, "2@9.0", None)  # a new deployment clears it
    assert restored.halted is None and restored.same_error_deaths == 0


def test_streak_needs_equal_errors_within_the_window_and_an_error_at_all() -> None:
    state = RestartState()
    count_death(state, Death("job:a", "no such table: t", "no such table: t"), now=0, window_s=100)
    count_death(state, Death("job:b", "other", "other"), now=10, window_s=100)
    assert state.same_error_deaths == 1
    count_death(state, Death("job:c", "other", "other"), now=200, window_s=100)  # window passed
    assert state.same_error_deaths == 1
    count_death(state, Death("job:d", "killed", None), now=210, window_s=100)  # SIGKILL: no error
    count_death(state, Death("job:e", "killed", None), now=220, window_s=100)
    assert state.same_error_deaths == 0
    update_halt(state, "e", Death("job:e", "cannot load config", None, bad_input=True))
    assert state.halted == "bad input: restarting won't help: cannot load config"


def test_halt_reason() -> None:
    state = RestartState(same_error_deaths=1, last_error="boom")
    assert halt_reason(state, None) is None
    assert halt_reason(state, Death("job:1", "bad yaml", None, bad_input=True)) == (
        "bad input: restarting won't help: bad yaml"
    )
    state.same_error_deaths = 3
    assert halt_reason(state, None) == (
        "failed 3 times with the same error; restarting won't help until the cause is fixed: boom"
    )


def test_only_the_last_deaths_are_remembered() -> None:
    state = RestartState()
    for i in range(25):
        assert count_death(state, Death(f"run:{i}", "e", None), now=i, window_s=100)
    assert len(state.deaths) == 20 and state.deaths[0] == "run:5"


# ----------------------------------------------------------------------------- backoff and cap


def test_backoff_doubles_and_the_cap_stops_restarts() -> None:
    settings = JobHealthSettings(backoff_initial_s=10, backoff_max_s=35, max_restarts=3, restart_window_s=100)
    state = RestartState()
    assert plan_restart(state, settings, now=0, run_in_progress=False) == (True, None)
    record_restart(state, settings, now=0)
    ok, why = plan_restart(state, settings, now=5, run_in_progress=False)
    assert not ok and why == "backing off; next restart in 5s"
    assert plan_restart(state, settings, now=10, run_in_progress=False)[0]
    record_restart(state, settings, now=10)
    assert state.next_restart_at == 30  # 10 * 2
    record_restart(state, settings, now=30)
    assert state.next_restart_at == 30 + 35  # capped at backoff_max_s
    ok, why = plan_restart(state, settings, now=70, run_in_progress=False)
    assert not ok and why is not None and why.startswith("restart cap reached: 3 restarts")
    assert state.gave_up
    ok, _ = plan_restart(state, settings, now=135, run_in_progress=False)  # window cleared
    assert ok and not state.gave_up
    assert plan_restart(state, settings, now=135, run_in_progress=True) == (
        False,
        "a restart run is still queued or running",
    )


def test_the_backoff_schedule() -> None:
    settings = JobHealthSettings(backoff_initial_s=10, backoff_max_s=600, max_restarts=100)
    state = RestartState()
    delays = []
    for _ in range(8):
        record_restart(state, settings, now=0)
        delays.append(state.next_restart_at)
    assert delays == [10, 20, 40, 80, 160, 320, 600, 600]


def test_restarts_can_be_disabled() -> None:
    settings = JobHealthSettings(restart=False)
    assert plan_restart(RestartState(), settings, 0, False) == (False, "automatic restarts are disabled")


def test_the_backoff_starts_over_only_after_a_stable_run() -> None:
    settings = JobHealthSettings(backoff_reset_after_s=600)
    state = RestartState(consecutive=4, gave_up=True)
    assert not reset_backoff_when_stable(state, settings, now=1599, job_started_at=1000)
    assert state.consecutive == 4 and state.gave_up
    assert reset_backoff_when_stable(state, settings, now=1600, job_started_at=1000)
    assert state.consecutive == 0 and not state.gave_up


# ----------------------------------------------------------------------------- the decision


def _verdict(deployment: Deployment, report: JobReport, now: float = 5000.0) -> JobVerdict:
    return judge(deployment, report, 60, now=now)


def test_a_dead_job_is_restarted_then_backs_off() -> None:
    settings = JobHealthSettings(backoff_initial_s=10, backoff_max_s=600)
    state = RestartState()
    verdict = _verdict(_deployment(), _dead(reason="killed by signal 9"))
    first = decide(state, verdict, settings, now=5000.0)
    assert first.restart and first.severity is Severity.ERROR
    assert first.description == "dead: killed by signal 9; restart requested (#1 in window)"
    again = decide(state, verdict, settings, now=5004.0)
    assert not again.restart and again.description.endswith("; backing off; next restart in 6s")
    third = decide(state, verdict, settings, now=5010.0)
    assert third.restart and third.description.endswith("(#2 in window)") and state.next_restart_at == 5030


def test_a_healthy_job_is_not_restarted_and_resets_the_backoff_once_stable() -> None:
    settings = JobHealthSettings(backoff_reset_after_s=600)
    state = RestartState(consecutive=3, restarts=[4000.0])
    runs = FakeRuns()
    healthy = _verdict(_deployment(started_at=1000.0), JobReport(JobState.HEALTHY, "ok", 1))
    decision = decide(state, healthy, settings, now=1200.0, runs=runs)
    assert decision == restart_policy.Decision(False, "running and connected", Severity.ERROR)
    assert state.consecutive == 3 and runs.reads == []  # a healthy job reads no restart run
    decide(state, healthy, settings, now=1600.0, runs=runs)
    assert state.consecutive == 0


def test_a_starting_job_does_not_reset_the_backoff() -> None:
    state = RestartState(consecutive=3)
    starting = _verdict(_deployment(started_at=1000.0), JobReport(JobState.STARTING, "", 1), now=1001)
    decide(state, starting, JobHealthSettings(backoff_reset_after_s=0), now=9000.0)
    assert state.consecutive == 3


def test_the_cap_turns_the_check_to_error_even_for_a_warning() -> None:
    settings = JobHealthSettings(max_restarts=1, backoff_initial_s=0)
    state = RestartState()
    dead = _verdict(_deployment(), _dead())
    assert decide(state, dead, settings, now=5000.0).restart
    capped = decide(state, dead, settings, now=5001.0)
    assert not capped.restart and "restart cap reached: 1 restarts in the last 3600s" in capped.description
    stopped = _verdict(_deployment(stopped_at=1.0, stopped_by="bob"), _dead())
    assert decide(state, stopped, settings, now=5002.0).severity is Severity.ERROR  # gave_up stays set


def test_a_restart_run_in_progress_blocks_a_new_one_and_is_not_read_as_failed() -> None:
    runs = FakeRuns(in_progress=True, failed=Death("run:r1", TABLE_GONE, error_signature(TABLE_GONE)))
    decision = decide(RestartState(), _verdict(_deployment(), _dead()), NO_BACKOFF, now=5000.0, runs=runs)
    assert not decision.restart
    assert decision.description.endswith("; a restart run is still queued or running")
    assert runs.reads == ["in_progress"]


def test_the_same_error_from_the_job_then_its_restart_run_halts_restarts() -> None:
    state = RestartState()
    deployment = _deployment()
    dead = _verdict(deployment, _dead(_failed(EXIT_FLOW_FAILED, TABLE_GONE)))
    first = decide(state, dead, NO_BACKOFF, now=5000.0, runs=FakeRuns())
    assert first.restart and state.same_error_deaths == 1 and state.halted is None
    # the restart run failed with the same error (its relaunched job died before its health gate)
    failed = run_death("r1", f"health gate: process 0 (failed, exit 1: {TABLE_GONE})")
    runs = FakeRuns(failed=failed)
    second = decide(state, dead, NO_BACKOFF, now=5010.0, runs=runs)
    assert runs.reads == ["in_progress", "last_failed>5000"]
    assert not second.restart and state.same_error_deaths == 2
    assert (
        second.description
        == state.halted
        == (
            "failed 2 times with the same error; restarting won't help until the cause is fixed: "
            + failed.error
        )
    )
    # still halted on the next ticks, until a new deployment
    assert not decide(state, dead, NO_BACKOFF, now=5020.0, runs=FakeRuns(failed=failed)).restart
    redeployed = _verdict(_deployment(pids=(99,), started_at=6000.0), JobReport(JobState.HEALTHY, "ok", 1))
    assert decide(state, redeployed, NO_BACKOFF, now=6010.0).description == "running and connected"
    assert state.halted is None and state.same_error_deaths == 0


def test_a_new_deployment_failing_with_bad_input_halts_at_once() -> None:
    state = RestartState()
    bad = _verdict(_deployment(), _dead(_failed(EXIT_BAD_INPUT, "config: unknown key 'x'")))
    decision = decide(state, bad, NO_BACKOFF, now=5000.0, runs=FakeRuns())
    assert not decision.restart and state.restarts == []
    assert decision.description == "bad input: restarting won't help: config: unknown key 'x'"
    assert state.halted == decision.description and state.halted_deployment == "4242@1000.000"


def test_deaths_without_an_error_never_halt() -> None:
    state = RestartState()
    settings = JobHealthSettings(backoff_initial_s=0, max_restarts=100)
    for i in range(5):
        report = _dead(_failed(EXIT_STARTUP_FAILED, "broker unreachable"))
        decision = decide(state, _verdict(_deployment(pids=(i,)), report), settings, now=5000.0 + i)
        assert decision.restart
    assert state.halted is None and state.same_error_deaths == 0 and len(state.deaths) == 5


def test_the_decision_survives_the_cursor() -> None:
    state = RestartState()
    decide(state, _verdict(_deployment(), _dead(_failed(1, TABLE_GONE))), NO_BACKOFF, now=5000.0)
    assert load_cursor(dump_cursor({"f": state})) == {"f": state}


def test_a_corrupt_or_old_cursor_still_loads() -> None:
    assert load_cursor(None) == {} and load_cursor("") == {}
    assert load_cursor("not json") == {} and load_cursor("[1]") == {} and load_cursor('{"f": 3}') == {}
    old = '{"f": {"restarts": [1.0], "consecutive": 1, "next_restart_at": 5.0, "gave_up": false, "gone": 1}}'
    state = load_cursor(old)["f"]
    assert state.restarts == [1.0] and state.same_error_deaths == 0 and state.halted is None


def test_clip_without_tail_keeps_the_head_and_an_ellipsis() -> None:
    assert clip("abcdef", 6, keep_tail=False) == "abcdef"
    assert clip("abcdefg", 6, keep_tail=False) == "abc..."
    assert clip("abcdefg", 6) != "abc..."  # the default keeps head and tail
