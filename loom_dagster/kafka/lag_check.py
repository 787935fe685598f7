"""One call per sensor tick (or one-shot check, or ``loom-dagster status``): fetch every target's offsets
once, advance the windows, evaluate every flow. No Dagster here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loom_dagster.kafka.cluster import LagTarget
from loom_dagster.kafka.lag_eval import MIN_SAMPLES, DeploymentStart, FlowLag, evaluate_flow
from loom_dagster.kafka.lag_window import LagWindows, advance_windows
from loom_dagster.kafka.offsets import LagFetch, fetch_offsets
from loom_dagster.settings import KafkaLagSettings


@dataclass(frozen=True)
class LagReport:
    """A tick: every flow's evaluation, the advanced windows (next cursor) and the fetch's cost."""

    flows: tuple[FlowLag, ...]
    windows: LagWindows
    fetch: LagFetch


def check_lag(
    targets: Sequence[LagTarget],
    settings: KafkaLagSettings,
    windows: LagWindows | None = None,
    *,
    at: float | None = None,
    starts: Mapping[str, DeploymentStart] | None = None,
) -> LagReport:
    """Fetch once for every target, advance the windows (``None``: a one-shot check) and evaluate.

    *at* overrides the sample timestamp (tests inject time instead of sleeping). *starts*: the current
    deployment of each target (by target name), for the ``STARTING`` window.
    """
    fetch = fetch_offsets(targets, timeout_s=settings.request_timeout_s)
    advanced = advance_windows(
        windows or LagWindows(),
        fetch,
        size=settings.window,
        at=at,
        max_age_s=max(1, settings.window) * settings.interval_s * 3.0,
    )
    flows = []
    for target in targets:
        offsets = fetch.targets[target.name]
        now = at if at is not None else offsets.taken_at
        flows.append(
            evaluate_flow(
                offsets,
                advanced.for_target(target.name),
                settings,
                now=now,
                min_samples=min(MIN_SAMPLES, max(2, settings.window)),
                start=(starts or {}).get(target.name),
            )
        )
    return LagReport(tuple(flows), advanced, fetch)
