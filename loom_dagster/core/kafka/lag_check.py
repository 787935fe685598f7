"""One call per sensor tick (or one-shot check, or ``loom-dagster status``): fetch every target's offsets
once, read the delay of the lagging partitions, advance the windows, evaluate every flow. No Dagster here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain, zip_longest

import msgspec

from loom_dagster.core.kafka.cluster import KafkaCluster, LagTarget
from loom_dagster.core.kafka.delay import DelayFetch, DelayReading, Position, fetch_delays
from loom_dagster.core.kafka.lag_eval import MIN_SAMPLES, DeploymentStart, FlowLag, evaluate_flow
from loom_dagster.core.kafka.lag_window import LagWindows, advance_windows
from loom_dagster.core.kafka.offsets import LagFetch, TargetOffsets, fetch_offsets
from loom_dagster.core.sensor_settings import KafkaLagSettings


class LagReport(msgspec.Struct, frozen=True):
    """A tick: every flow's evaluation, the advanced windows (next cursor), the fetch's cost and the
    delay read's (``None`` when ``read_delay`` is off)."""

    flows: tuple[FlowLag, ...]
    windows: LagWindows
    fetch: LagFetch
    delays: DelayFetch | None = None


def check_lag(
    targets: Sequence[LagTarget],
    settings: KafkaLagSettings,
    windows: LagWindows | None = None,
    *,
    at: float | None = None,
    starts: Mapping[str, DeploymentStart] | None = None,
    count_requests: bool = False,
) -> LagReport:
    """Fetch once for every target, read the lagging partitions' delay, advance the windows (``None``: a
    one-shot check) and evaluate.

    *at* overrides the sample timestamp (tests inject time instead of sleeping; the delay is always
    against the real clock). *starts*: the current deployment of each target (by target name), for the
    ``STARTING`` window and, without a commit, the offset the delay is read from. *count_requests*: count
    the delay readers' broker requests (``DelayFetch.requests``).
    """
    fetch = fetch_offsets(targets, timeout_s=settings.request_timeout_s)
    delays = None
    wanted: dict[str, dict[tuple[str, int], Position]] = {}
    if settings.read_delay:
        wanted = {t.name: delay_positions(fetch.targets[t.name], (starts or {}).get(t.name)) for t in targets}
        delays = fetch_delays(
            _round_robin(targets, fetch, wanted),
            timeout_s=settings.delay_timeout_s,
            max_partitions=settings.delay_max_partitions,
            count_requests=count_requests,
        )
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
                delays=None if delays is None else _readings(delays, target.cluster, wanted[target.name]),
            )
        )
    return LagReport(tuple(flows), advanced, fetch, delays)


def delay_positions(offsets: TargetOffsets, start: DeploymentStart | None) -> dict[tuple[str, int], Position]:
    """Where the oldest unconsumed message of each lagging partition is: the committed offset (the next
    message the group reads) or, without a commit, the offset the current deployment started from.
    Ordered by lag, largest first."""
    found: list[tuple[int, tuple[str, int], Position]] = []
    for part in offsets.partitions:
        if part.error is not None or part.end is None:
            continue
        position = part.committed
        if position is None and start is not None:
            position = start.start_offset(part.topic, part.partition)
        if position is not None and part.end > position:
            found.append(
                (part.end - position, (part.topic, part.partition), (part.topic, part.partition, position))
            )
    found.sort(key=lambda item: (-item[0], item[1]))
    return {key: position for _, key, position in found}


def _round_robin(
    targets: Sequence[LagTarget], fetch: LagFetch, wanted: Mapping[str, Mapping[tuple[str, int], Position]]
) -> list[tuple[KafkaCluster, Position]]:
    """Every wanted position, one flow after the other (each flow's most lagging first), so that a cap
    on the partitions read leaves every flow its most lagging partitions. Unreachable clusters are left
    out (their flows are UNREACHABLE anyway)."""
    rows = [
        [(t.cluster, position) for position in wanted[t.name].values()]
        for t in targets
        if fetch.targets[t.name].unreachable is None
    ]
    return [item for item in chain.from_iterable(zip_longest(*rows)) if item is not None]


def _readings(
    delays: DelayFetch, cluster: KafkaCluster, wanted: Mapping[tuple[str, int], Position]
) -> dict[tuple[str, int], DelayReading]:
    return {key: delays.reading(cluster, position) for key, position in wanted.items()}
