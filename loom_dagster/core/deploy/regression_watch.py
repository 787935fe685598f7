"""One tick of the regression watch of the job health sensor (``JobHealthSettings.regression_watch_ticks``,
0: off), no Dagster here.

For that many ticks after a deploy, the watch compares the new version's progress with the previous
version's: the deploy recorded whether the previous version was moving data
(``extra["previous_progress"]``, see ``loom_dagster.core.deploy.progress.previous_progress``). When the new
version stalls -- Burrow ``STALL``/``STOP`` of its group over the watch's own lag windows, ``NO_COMMITS``
with lag, or no new sink row over 3 ticks while the lag grows -- where the previous one was moving data,
it rolls back ONCE (``FlowDeployer.roll_back_to_previous``: the previous deployment's request under the
flow lock; the restored record carries ``extra["rolled_back_from"]`` and is not watched again until a
new deploy).

Only healthy jobs are judged (a dead or hung job is the restart policy's business,
``loom_dagster.core.deploy.restart_policy``). The per-tick rules (``watch_eligibility``, ``WatchState``,
``observe_tick``) are in ``loom_dagster.core.deploy.progress``; ``watch_tick`` applies them to the flows a
tick saw. The sensor (``loom_dagster.sensors.regression``) reads the lag and reports each rollback as an
``AssetMaterialization`` of the flow asset.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import msgspec

from loom_dagster.core.deploy.launch_records import JobReport, JobState
from loom_dagster.core.deploy.progress import (
    WatchState,
    observe_tick,
    sink_rows,
    watch_eligibility,
    watch_key,
)
from loom_dagster.core.deploy.store import Deployment
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.kafka.lag_eval import FlowLag
from loom_dagster.core.redact import redact_text

ROLLBACK_BY = "job health sensor (regression watch)"


class HasWatch(Protocol):
    """A per-flow sensor state holding the watch's cursor entry (``restart_policy.RestartState``)."""

    watch: dict[str, Any]


class WatchedJob(msgspec.Struct, frozen=True):
    """A flow seen by this tick: its current deployment and the launcher's report."""

    flow_name: str
    deployment: Deployment
    report: JobReport


class Rollback(msgspec.Struct, frozen=True):
    """A rollback the watch did: from the *bad* deployment to the *restored* one; *stalled*: how the bad
    one stalled (``observe_tick``); *reason*: the rollback's reason (``rollback_reason``)."""

    flow_name: str
    bad: Deployment
    restored: Deployment
    stalled: str
    reason: str


class WatchLog(Protocol):
    """Where the watch says what it does (a logger: Dagster's ``context.log``, ``logging.Logger``)."""

    def info(self, msg: str) -> None: ...

    def warning(self, msg: str) -> None: ...

    def error(self, msg: str) -> None: ...


class RollsBack(Protocol):
    """The deployer's rollback (``FlowDeployer.roll_back_to_previous``)."""

    def roll_back_to_previous(
        self, flow_name: str, reason: str, by: str = ..., log: Callable[[str], None] = ...
    ) -> Deployment: ...


ReadLags = Callable[[Sequence[WatchedJob], Mapping[str, WatchState]], Mapping[str, FlowLag]]
"""The Kafka lag of the judged flows over their watch windows (the reader keeps each flow's windows in
its ``WatchState.windows``); may raise."""


def watch_tick(
    watched: Sequence[WatchedJob],
    states: Mapping[str, HasWatch],
    *,
    limit: int,
    dead_letters: Mapping[str, frozenset[str]],
    read_lags: ReadLags,
    deployer: RollsBack,
    log: WatchLog,
) -> list[Rollback]:
    """Observe every watched flow once (at most *limit* ticks per deployment); roll back the ones that
    stall. Updates ``states[*].watch``; returns the rollbacks done. Never raises on a lag read or a
    rollback that fails (the failure ends the watch and is logged).

    Example:
        >>> rollbacks = watch_tick(watched, states, limit=20, dead_letters={}, read_lags=read_lags,
        ...                        deployer=deployer, log=logging.getLogger("watch"))  # doctest: +SKIP
    """
    current: dict[str, WatchState] = {}
    judged: list[WatchedJob] = []
    for item in watched:
        state = WatchState.load(states[item.flow_name].watch)
        key = watch_key(item.deployment)
        if state.deployment != key:
            state = WatchState(deployment=key)
        current[item.flow_name] = state
        if state.done is not None:
            continue
        why_not = watch_eligibility(item.deployment)
        if why_not is not None:
            state.done = f"not watched: {why_not}"
        elif state.ticks >= limit:
            _passed(item, state, log)
        elif item.report.state is JobState.HEALTHY:
            judged.append(item)
    rollbacks: list[Rollback] = []
    try:
        lags = read_lags(judged, current) if judged else {}
    except Exception as exc:  # a broken read must not stop health reporting
        log.warning(f"regression watch: Kafka offsets not read: {redact_text(str(exc))}")
        lags = {}
    for item in judged:
        state = current[item.flow_name]
        rows = sum(sink_rows(item.report.statuses, dead_letters.get(item.flow_name, frozenset())).values())
        reason = observe_tick(state, lags.get(item.flow_name), rows)
        if reason is not None:
            rollback = roll_back(deployer, item, reason, state, log)
            if rollback is not None:
                rollbacks.append(rollback)
        elif state.ticks >= limit:
            _passed(item, state, log)
    for name, state in current.items():
        states[name].watch = state.dump()
    return rollbacks


def _passed(item: WatchedJob, state: WatchState, log: WatchLog) -> None:
    state.done = f"passed: no stall in {state.ticks} tick(s)"
    log.info(f"regression watch of flow {item.flow_name!r} over: {state.done}")


def roll_back(
    deployer: RollsBack, item: WatchedJob, stalled: str, state: WatchState, log: WatchLog
) -> Rollback | None:
    """Roll *item* back once (its watch is over either way); ``None`` if the rollback failed."""
    bad = item.deployment
    why = rollback_reason(bad, stalled)
    log.warning(f"regression watch: rolling flow {item.flow_name!r} back: {why}")
    try:
        restored = deployer.roll_back_to_previous(item.flow_name, why, by=ROLLBACK_BY, log=log.info)
    except DeploymentError as exc:
        state.done = f"rollback failed: {redact_text(str(exc))}"
        log.error(f"regression watch: {state.done}")
        return None
    state.done = f"rolled back to plan {restored.plan_hash}"
    return Rollback(item.flow_name, bad, restored, stalled, why)


def rollback_reason(bad: Deployment, stalled: str) -> str:
    """Why the watch rolls *bad* back (kept in the restored record and shown by the sensor)."""
    return f"plan {bad.plan_hash} stalled where the previous version was moving data: {stalled}"
