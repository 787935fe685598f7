"""The regression watch of the job health sensor (``JobHealthSettings.regression_watch_ticks``, 0: off):
its Dagster side.

The watch itself (which flows to judge, when a new version stalls, the rollback) is
``loom_dagster.core.deploy.regression_watch.watch_tick`` (no Dagster). Here: the Kafka offsets of the
watched flows, read in one batch per cluster per tick (``kafka.lag_check.check_lag``, no delay read), only
while some flow is judged; and each rollback reported as an ``AssetMaterialization`` of the flow asset with
``loom/rolled_back_from`` (the bad plan hash) and ``loom/rollback_reason``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from loom_dagster.asset_graph import LoomAssetGraph
from loom_dagster.core.deploy.deployer import FlowDeployer
from loom_dagster.core.deploy.progress import STALL_TICKS, WatchState, dead_letter_sinks
from loom_dagster.core.deploy.regression_watch import HasWatch, Rollback, WatchedJob, watch_tick
from loom_dagster.core.flows.defs_state import Lazy
from loom_dagster.core.job.failure import clip
from loom_dagster.core.kafka.cluster import LagTarget
from loom_dagster.core.kafka.lag_check import check_lag
from loom_dagster.core.kafka.lag_eval import FlowLag
from loom_dagster.core.kafka.lag_window import LagWindows
from loom_dagster.core.redact import redact_text
from loom_dagster.core.sensor_settings import JobHealthSettings, KafkaLagSettings
from loom_dagster.sensors.lag import deployment_start, kafka_lag_targets, starting_windows
from loom_dagster.translator import LoomMetadataSet


class RegressionWatch:
    """The watch of one job health sensor: the lag of the flows it judges, the rollbacks' materializations.

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
        self._keys = {node.compiled.flow.name: node.spec.key for node in graph.flows}
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
        self, deployer: FlowDeployer, watched: Sequence[WatchedJob], states: Mapping[str, HasWatch], log: Any
    ) -> list[dg.AssetMaterialization]:
        """Observe every watched flow once; roll back the ones that stall. Updates ``states[*].watch``;
        returns the rollbacks' materializations. Never raises."""
        rollbacks = watch_tick(
            watched,
            states,
            limit=self.settings.regression_watch_ticks,
            dead_letters=self._dead_letters,
            read_lags=self._lags,
            deployer=deployer,
            log=log,
        )
        return [self._materialization(rollback) for rollback in rollbacks]

    def _lags(self, judged: Sequence[WatchedJob], states: Mapping[str, WatchState]) -> dict[str, FlowLag]:
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

    def _materialization(self, rollback: Rollback) -> dg.AssetMaterialization:
        """The materialization of the flow asset that shows a rollback."""
        bad, restored = rollback.bad, rollback.restored
        job = restored.job
        metadata = LoomMetadataSet(
            deployed=True,
            plan_hash=restored.plan_hash,
            config_hash=restored.config_hash,
            rolled_back_from=bad.plan_hash,
            rollback_reason=redact_text(rollback.reason),
            restarts=restored.restarts,
            pids=", ".join(str(p.pid) for p in job.processes),
            host=job.host,
            started_at=dg.MetadataValue.timestamp(job.started_at),
            config_snapshot=", ".join(job.request.config_files),
        )
        return dg.AssetMaterialization(
            asset_key=self._keys[rollback.flow_name],
            description=clip(
                f"rolled back from plan {bad.plan_hash} to plan {restored.plan_hash}: {rollback.stalled}",
                1000,
                keep_tail=False,
            ),
            metadata=dict(metadata),
        )
