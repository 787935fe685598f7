"""The regression watch of the job health sensor (``JobHealthSettings.regression_watch_ticks``, 0: off).

For that many ticks after a deploy, the sensor compares the new version's progress with the previous
version's: the deploy recorded whether the previous version was moving data
(``extra["previous_progress"]``, see ``loom_dagster.core.deploy.progress.previous_progress``). When the new version
stalls -- Burrow ``STALL``/``STOP`` of its group over the watch's own lag windows, ``NO_COMMITS`` with
lag, or no new sink row over 3 ticks while the lag grows -- where the previous one was moving data, the
sensor rolls back ONCE (``FlowDeployer.roll_back_to_previous``: the previous deployment's request under
the flow lock; the restored record carries ``extra["rolled_back_from"]`` and is not watched again until
a new deploy) and reports an ``AssetMaterialization`` of the flow asset with ``loom/rolled_back_from``
(the bad plan hash) and ``loom/rollback_reason``.

Only healthy jobs are judged (a dead or hung job is the restart logic's business). The Kafka offsets of
the watched flows are read in one batch per cluster per tick (``kafka.lag_check.check_lag``, no delay
read), only while some flow is watched. The decisions live in ``loom_dagster.core.deploy.progress`` (no Dagster).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import dagster as dg
import msgspec

from loom_dagster.asset_graph import LoomAssetGraph
from loom_dagster.core.deploy.deployer import FlowDeployer
from loom_dagster.core.deploy.launch_records import JobReport, JobState
from loom_dagster.core.deploy.progress import (
    STALL_TICKS,
    WatchState,
    dead_letter_sinks,
    observe_tick,
    sink_rows,
    watch_eligibility,
    watch_key,
)
from loom_dagster.core.deploy.store import Deployment
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.flows.defs_state import Lazy
from loom_dagster.core.kafka.cluster import LagTarget
from loom_dagster.core.kafka.lag_check import check_lag
from loom_dagster.core.kafka.lag_eval import FlowLag
from loom_dagster.core.kafka.lag_window import LagWindows
from loom_dagster.core.redact import redact_text
from loom_dagster.core.sensor_settings import JobHealthSettings, KafkaLagSettings
from loom_dagster.sensors.lag import deployment_start, kafka_lag_targets, starting_windows
from loom_dagster.translator import LoomMetadataSet

ROLLBACK_BY = "job health sensor (regression watch)"


class HasWatch(Protocol):
    """A per-flow sensor state holding the watch's cursor entry (``health.RestartState``)."""

    watch: dict[str, Any]


class Watched(msgspec.Struct, frozen=True):
    """A flow seen by this tick: its asset key, current deployment and the launcher's report."""

    flow_name: str
    key: dg.AssetKey
    deployment: Deployment
    report: JobReport


class RegressionWatch:
    """The watch of one job health sensor: which flows to watch this tick, their lag, the rollback.

    Example:
        >>> watch = RegressionWatch(graph, JobHealthSettings(regression_watch_ticks=20))  # doctest: +SKIP
        >>> events = watch.tick(deployer, watched, states, context.log)  # doctest: +SKIP
    """

    def __init__(self, graph: LoomAssetGraph, settings: JobHealthSettings) -> None:
        self.settings = settings
        self.lag_settings = KafkaLagSettings(
            interval_s=settings.interval_s,
            window=max(STALL_TICKS, min(settings.regression_watch_ticks, 10)),
            read_delay=False,
            warn_lag=sys.maxsize,
            error_lag=sys.maxsize,
        )
        self._dead_letters = {
            node.compiled.flow.name: dead_letter_sinks(node.compiled) for node in graph.flows
        }
        self._targets = Lazy(lambda: self._resolve(graph))  # compiles the plans (credentials) when first used

    def _resolve(self, graph: LoomAssetGraph) -> dict[str, tuple[LagTarget, float]]:
        """Flow name -> (lag target, starting window) of every Kafka-sourced flow."""
        pairs = kafka_lag_targets(graph)
        windows = starting_windows(graph, self.lag_settings, pairs)
        return {windows[t.name][0]: (t, windows[t.name][1]) for _, t in pairs if t.name in windows}

    def tick(
        self, deployer: FlowDeployer, watched: Sequence[Watched], states: Mapping[str, HasWatch], log: Any
    ) -> list[dg.AssetMaterialization]:
        """Observe every watched flow once; roll back the ones that stall. Updates ``states[*].watch``;
        returns the rollbacks' materializations. Never raises."""
        limit = self.settings.regression_watch_ticks
        current: dict[str, WatchState] = {}
        judged: list[Watched] = []
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
                state.done = f"passed: no stall in {state.ticks} tick(s)"
                log.info(f"regression watch of flow {item.flow_name!r} over: {state.done}")
            elif item.report.state is JobState.HEALTHY:
                judged.append(item)
        events: list[dg.AssetMaterialization] = []
        try:
            lags = self._lags(judged, current)
        except Exception as exc:  # a broken read must not stop health reporting
            log.warning(f"regression watch: Kafka offsets not read: {redact_text(str(exc))}")
            lags = {}
        for item in judged:
            state = current[item.flow_name]
            rows = sum(
                sink_rows(item.report.statuses, self._dead_letters.get(item.flow_name, frozenset())).values()
            )
            reason = observe_tick(state, lags.get(item.flow_name), rows)
            if reason is not None:
                events.extend(self._roll_back(deployer, item, reason, state, log))
            elif state.ticks >= limit:
                state.done = f"passed: no stall in {state.ticks} tick(s)"
                log.info(f"regression watch of flow {item.flow_name!r} over: {state.done}")
        for name, state in current.items():
            states[name].watch = state.dump()
        return events

    def _lags(self, judged: Sequence[Watched], states: Mapping[str, WatchState]) -> dict[str, FlowLag]:
        """The lag of every judged Kafka-sourced flow over its watch windows (one batched fetch)."""
        if not judged:
            return {}
        targets = self._targets()
        known = [(item, *targets[item.flow_name]) for item in judged if item.flow_name in targets]
        if not known:
            return {}
        windows = LagWindows(
            {
                t.name: LagWindows.from_cursor(states[item.flow_name].windows).for_target(t.name)
                for item, t, _ in known
            }
        )
        starts = {}
        for item, target, window_s in known:
            start = deployment_start(item.deployment, window_s)
            if start is not None:
                starts[target.name] = start
        report = check_lag([t for _, t, _ in known], self.lag_settings, windows, starts=starts)
        out = {}
        for (item, target, _), flow in zip(known, report.flows, strict=True):
            states[item.flow_name].windows = LagWindows(
                {target.name: report.windows.for_target(target.name)}
            ).to_cursor()
            out[item.flow_name] = flow
        return out

    def _roll_back(
        self, deployer: FlowDeployer, item: Watched, reason: str, state: WatchState, log: Any
    ) -> list[dg.AssetMaterialization]:
        """Roll *item* back once; the materialization that shows it (none if the rollback failed)."""
        bad = item.deployment
        why = f"plan {bad.plan_hash} stalled where the previous version was moving data: {reason}"
        log.warning(f"regression watch: rolling flow {item.flow_name!r} back: {why}")
        try:
            restored = deployer.roll_back_to_previous(item.flow_name, why, by=ROLLBACK_BY, log=log.info)
        except DeploymentError as exc:
            state.done = f"rollback failed: {redact_text(str(exc))}"
            log.error(f"regression watch: {state.done}")
            return []
        state.done = f"rolled back to plan {restored.plan_hash}"
        job = restored.job
        metadata = LoomMetadataSet(
            deployed=True,
            plan_hash=restored.plan_hash,
            config_hash=restored.config_hash,
            rolled_back_from=bad.plan_hash,
            rollback_reason=redact_text(why),
            restarts=restored.restarts,
            pids=", ".join(str(p.pid) for p in job.processes),
            host=job.host,
            started_at=dg.MetadataValue.timestamp(job.started_at),
            config_snapshot=", ".join(job.request.config_files),
        )
        return [
            dg.AssetMaterialization(
                asset_key=item.key,
                description=_clip(
                    f"rolled back from plan {bad.plan_hash} to plan {restored.plan_hash}: {reason}"
                ),
                metadata=dict(metadata),
            )
        ]


def _clip(text: str, limit: int = 1000) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
