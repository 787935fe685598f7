"""One tick of the regression watch (``loom_dagster.core.deploy.regression_watch.watch_tick``) on hand-made
deployments, reports and lags, with a fake deployer (no broker, no Dagster; the sensor with real jobs is
``tests/integration/test_progress_gate.py``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from loom_dagster.core.deploy.launch_records import JobReport, JobState
from loom_dagster.core.deploy.progress import WatchState
from loom_dagster.core.deploy.regression_watch import ROLLBACK_BY, Rollback, WatchedJob, watch_tick
from loom_dagster.core.deploy.restart_policy import RestartState
from loom_dagster.core.deploy.store import Deployment
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.kafka.lag_eval import FlowLag
from loom_dagster.core.kafka.lag_status import LagStatus

MOVING = {"previous_progress": {"moving": True}}


def _record(flow: str, plan: str, at: float, **extra: object) -> Deployment:
    raw = {
        "flow_name": flow,
        "plan_hash": plan,
        "config_hash": "c",
        "deployed_at": at,
        "extra": extra,
        "job": {
            "flow_name": flow,
            "launcher": "local",
            "host": "h",
            "processes": [{"pid": 7, "start_ticks": 1}],
            "log_path": "",
            "started_at": at,
            "request": {
                "flow_name": flow,
                "import_path": "m:f",
                "config_files": [],
                "environment": "test",
                "plan_hash": plan,
                "config_hash": "c",
            },
        },
    }
    return msgspec.convert(raw, Deployment)


def _watched(deployment: Deployment, rows: int = 0, state: JobState = JobState.HEALTHY) -> WatchedJob:
    statuses = ({"sinks": {"out": {"records": rows}, "dlq": {"records": 1000}}},)
    return WatchedJob(deployment.flow_name, deployment, JobReport(state, "", 1, statuses))


def _lag(status: LagStatus, total: int) -> FlowLag:
    return FlowLag("f", "g", status, f"{status.value} reason", total)


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str) -> None:
        self.lines.append(f"info: {msg}")

    def warning(self, msg: str) -> None:
        self.lines.append(f"warning: {msg}")

    def error(self, msg: str) -> None:
        self.lines.append(f"error: {msg}")


class Deployer:
    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, str, str]] = []

    def roll_back_to_previous(
        self, flow_name: str, reason: str, by: str = "", log: Callable[[str], None] = print
    ) -> Deployment:
        self.calls.append((flow_name, reason, by))
        if self.fail is not None:
            raise DeploymentError(self.fail)
        log("restored")
        return _record(flow_name, "p1", 1.0, rolled_back_from={"plan_hash": "p2"})


def _lags(lags: Mapping[str, FlowLag]) -> Callable[[Sequence[WatchedJob], Mapping[str, WatchState]], Any]:
    def read(judged: Sequence[WatchedJob], states: Mapping[str, WatchState]) -> Mapping[str, FlowLag]:
        for item in judged:
            states[item.flow_name].windows = "w"
        return {name: lag for name, lag in lags.items() if name in {i.flow_name for i in judged}}

    return read


def _tick(
    watched: Sequence[WatchedJob],
    states: dict[str, RestartState],
    lags: Mapping[str, FlowLag] | Callable[..., Any] = {},  # noqa: B006
    deployer: Deployer | None = None,
    limit: int = 5,
) -> tuple[list[Rollback], Log]:
    log = Log()
    read = lags if callable(lags) else _lags(lags)
    rollbacks = watch_tick(
        watched,
        states,
        limit=limit,
        dead_letters={"f": frozenset({"dlq"}), "g": frozenset({"dlq"})},
        read_lags=read,
        deployer=deployer or Deployer(),
        log=log,
    )
    return rollbacks, log


def _watch(states: Mapping[str, RestartState], flow: str) -> WatchState:
    return WatchState.load(states[flow].watch)


def test_a_stalling_new_version_is_rolled_back_once() -> None:
    bad = _record("f", "p2", 2.0, **MOVING)
    states = {"f": RestartState()}
    deployer = Deployer()
    rollbacks, log = _tick([_watched(bad)], states, {"f": _lag(LagStatus.STALL, 50)}, deployer)
    why = "plan p2 stalled where the previous version was moving data: Kafka lag STALL: STALL reason"
    assert [(r.flow_name, r.bad.plan_hash, r.restored.plan_hash, r.stalled, r.reason) for r in rollbacks] == [
        ("f", "p2", "p1", "Kafka lag STALL: STALL reason", why)
    ]
    assert deployer.calls == [("f", why, ROLLBACK_BY)]
    assert log.lines == [f"warning: regression watch: rolling flow 'f' back: {why}", "info: restored"]
    watch = _watch(states, "f")
    assert watch.done == "rolled back to plan p1" and watch.ticks == 1 and watch.windows == "w"
    # the watch of that deployment is over: no second rollback
    rollbacks, _ = _tick([_watched(bad)], states, {"f": _lag(LagStatus.STALL, 50)}, deployer)
    assert rollbacks == [] and len(deployer.calls) == 1


def test_a_failed_rollback_ends_the_watch_and_is_logged_redacted() -> None:
    states = {"f": RestartState()}
    deployer = Deployer(fail="previous version unhealthy: postgresql://u:hunter2@db/x")
    rollbacks, log = _tick(
        [_watched(_record("f", "p2", 2.0, **MOVING))], states, {"f": _lag(LagStatus.STOP, 5)}, deployer
    )
    assert rollbacks == []
    done = _watch(states, "f").done
    assert done is not None and done.startswith("rollback failed: ") and "hunter2" not in done
    assert log.lines[-1] == f"error: regression watch: {done}"


def test_the_watch_passes_after_its_ticks_without_a_stall() -> None:
    states = {"f": RestartState()}
    deployment = _record("f", "p2", 2.0, **MOVING)
    for rows in (1, 2):
        rollbacks, log = _tick([_watched(deployment, rows)], states, {"f": _lag(LagStatus.OK, 0)}, limit=3)
        assert rollbacks == [] and log.lines == []
    _, log = _tick([_watched(deployment, 3)], states, {"f": _lag(LagStatus.OK, 0)}, limit=3)
    assert log.lines == ["info: regression watch of flow 'f' over: passed: no stall in 3 tick(s)"]
    assert _watch(states, "f").done == "passed: no stall in 3 tick(s)"


def test_only_eligible_healthy_jobs_are_judged() -> None:
    states = {name: RestartState() for name in ("f", "g")}
    seen: list[list[str]] = []

    def read(judged: Sequence[WatchedJob], _: Mapping[str, WatchState]) -> Mapping[str, FlowLag]:
        seen.append([item.flow_name for item in judged])
        return {}

    not_moving = _watched(_record("f", "p2", 2.0))  # no previous version moving data
    hung = _watched(_record("g", "p2", 2.0, **MOVING), state=JobState.HUNG)  # the restart policy's business
    _tick([not_moving, hung], states, read)
    assert seen == []  # nothing judged: no Kafka read
    assert _watch(states, "f").done == "not watched: no previous version to compare with"
    assert _watch(states, "g").done is None and _watch(states, "g").ticks == 0


def test_a_new_deployment_starts_a_new_watch() -> None:
    states = {"f": RestartState(watch=WatchState(deployment="p1@1.000", ticks=4, done="passed").dump())}
    _tick([_watched(_record("f", "p2", 2.0, **MOVING))], states, {"f": _lag(LagStatus.OK, 0)})
    watch = _watch(states, "f")
    assert watch.deployment == "p2@2.000" and watch.ticks == 1 and watch.done is None


def test_a_broken_lag_read_judges_by_sink_rows_alone() -> None:
    def broken(*_: object) -> Mapping[str, FlowLag]:
        raise OSError("broker down: sasl password=hunter2")

    states = {"f": RestartState()}
    rollbacks, log = _tick([_watched(_record("f", "p2", 2.0, **MOVING), rows=3)], states, broken)
    assert rollbacks == [] and len(log.lines) == 1
    assert log.lines[0].startswith("warning: regression watch: Kafka offsets not read: broker down")
    assert "hunter2" not in log.lines[0]
    assert _watch(states, "f").ticks == 1 and _watch(states, "f").rows == [3]  # the dead letters not counted
