"""Burrow-style evaluation of lag windows: per partition (``evaluate_window``), per flow
(``evaluate_flow``: worst partition, then the total-lag thresholds), with loom's ``STARTING`` window
after a deployment (``DeploymentStart``). See ``LagStatus`` for the statuses.

**Delay** (``delay_s`` per partition, ``max_delay_s`` per flow): how old the oldest unconsumed message
is, now - the timestamp of the message at the committed offset, read each tick for the lagging partitions
by ``loom_dagster.core.kafka.delay`` (one consumer per cluster, bounded in time and partitions; a partition it
did not read is unknown, ``None``, never 0). A partition without lag has delay 0. ``warn_delay_s`` /
``error_delay_s`` turn a delay at least that old into WARN / ERR, naming the partition.

**Time lag estimate** (``time_lag_s``): ``lag / consumption rate`` (committed-offset progress per second
over the window), from the window alone. It is ``None`` when the consumer made no progress in the window
(then ``stalled_for_s`` says for how long it has not moved). No Dagster here.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import msgspec

from loom_dagster.core.kafka.delay import DelayReading
from loom_dagster.core.kafka.lag_status import LagSeverity, LagStatus, worst
from loom_dagster.core.kafka.lag_window import LagSample, PartitionWindow
from loom_dagster.core.kafka.offsets import PartitionOffsets, TargetOffsets
from loom_dagster.core.sensor_settings import KafkaLagSettings

MIN_SAMPLES = 3
"""Samples a lagging partition needs in its window before the trend rules (STALL/STOP/WARN) apply."""


STARTING_MARGIN_S = 30.0
"""Least margin added to the largest table-buffer age for the starting window (see ``starting_window_s``)."""


def starting_window_s(buffer_max_age_s: float, interval_s: float) -> float:
    """How long after a deployment's start a partition without commits is ``STARTING``, not ``NO_COMMITS``.

    loom commits a partition's offsets only after its first table flush, at most ``buffer_max_age_s``
    after data arrives (the largest of the flow's table sinks; 0 without tables), then the sensor must
    sample it: the margin is two sensor intervals, at least ``STARTING_MARGIN_S``.
    """
    return max(0.0, buffer_max_age_s) + max(STARTING_MARGIN_S, 2.0 * interval_s)


class DeploymentStart(msgspec.Struct, frozen=True):
    """When a flow's current deployment started, how long it may go without commits, and the offsets
    its job started from (``(topic, partition) -> offset``, recorded by the deploy)."""

    started_at: float
    window_s: float
    offsets: Mapping[tuple[str, int], int] = msgspec.field(default_factory=dict)

    def within(self, now: float) -> bool:
        """Whether *now* is inside the starting window."""
        return now - self.started_at <= self.window_s

    def start_offset(self, topic: str, partition: int) -> int | None:
        """The offset the job started from on one partition (``None``: not recorded)."""
        return self.offsets.get((topic, partition))

    @classmethod
    def from_record(cls, started_at: float, extra: Mapping[str, Any], window_s: float) -> DeploymentStart:
        """From a deployment record's ``extra["start_offsets"]`` (``{topic: {"partition": offset}}``:
        JSON keys are strings); a missing or malformed entry gives no offsets."""
        offsets: dict[tuple[str, int], int] = {}
        raw = extra.get("start_offsets")
        if isinstance(raw, Mapping):
            for topic, parts in raw.items():
                if not isinstance(parts, Mapping):
                    continue
                for partition, offset in parts.items():
                    try:
                        offsets[(str(topic), int(partition))] = int(offset)
                    except (TypeError, ValueError):
                        continue
        return cls(float(started_at), float(window_s), offsets)


class PartitionLag(msgspec.Struct, frozen=True):
    """One partition's evaluation."""

    topic: str
    partition: int
    end: int | None
    committed: int | None
    lag: int | None
    status: LagStatus
    reason: str
    samples: int = 0
    consume_rate: float | None = None
    produce_rate: float | None = None
    time_lag_s: float | None = None
    stalled_for_s: float | None = None
    delay_s: float | None = None
    """Age in seconds of the oldest unconsumed message (0 without lag; ``None``: unknown or not read)."""
    delay_note: str | None = None
    """Why ``delay_s`` is unknown (not read within the deadline, over the partition cap, an error)."""


class FlowLag(msgspec.Struct, frozen=True):
    """One flow's evaluation: its status (worst partition, then the total-lag thresholds) and why."""

    name: str
    group: str
    status: LagStatus
    reason: str
    total_lag: int
    partitions: tuple[PartitionLag, ...] = ()
    missing_topics: tuple[str, ...] = ()
    consume_rate: float | None = None
    produce_rate: float | None = None
    time_lag_s: float | None = None
    stalled_for_s: float | None = None
    max_delay_s: float | None = None
    """The largest known partition delay (``None``: none known, or the delay was not read)."""
    delay_unknown: int = 0
    """Partitions whose delay is unknown (lagging but not read: deadline, cap, error)."""
    delay_read: bool = False
    """Whether the delay was read for this evaluation (``KafkaLagSettings.read_delay``)."""

    @property
    def severity(self) -> LagSeverity:
        """Severity of the status."""
        return self.status.severity

    @property
    def passed(self) -> bool:
        """True for ``OK`` and ``STARTING`` (severity OK)."""
        return self.status.severity is LagSeverity.OK

    def counts(self) -> dict[str, int]:
        """How many partitions are in each status."""
        return dict(Counter(p.status.value for p in self.partitions))


def evaluate_window(
    window: PartitionWindow,
    *,
    now: float | None = None,
    min_samples: int = MIN_SAMPLES,
    start: DeploymentStart | None = None,
) -> PartitionLag:
    """Burrow's rules on one partition's window (oldest sample first).

    Order: no sample -> UNAVAILABLE; no committed offset -> STARTING within *start*'s window, else
    NO_COMMITS (OK if the partition is empty; lag from the recorded start offset when known);
    committed offset went back -> REWIND; then, over the trailing run of samples with lag > 0 (after any
    rewind), when it has at least *min_samples* samples: committed offset unchanged over its last
    *min_samples* or more samples -> STALL if the end offset grew meanwhile, else STOP; lag grew between
    every pair (and overall) while committing -> WARN. A sample with zero lag ends any run, so a consumer
    that caught up in between is OK (Burrow's rule 1). The worst status found wins.

    Unlike Burrow, STALL/STOP need *min_samples* unchanged samples, not a full window (faster verdicts),
    and STALL vs STOP is told apart by new data arriving (Burrow uses commit timestamps, which
    ``OffsetFetch`` does not return). ``time_lag_s`` = lag / consumption rate over the window; ``None``
    while stalled or stopped (see ``stalled_for_s``).
    """
    if not window.samples:
        return PartitionLag(
            window.topic, window.partition, None, None, None, LagStatus.UNAVAILABLE, "no sample"
        )
    last = window.samples[-1]
    now = last.ts if now is None else now
    rewind, since_rewind = _split_at_rewind(window.samples)
    consume, produce = _rates(window.samples, since_rewind)
    base = PartitionLag(
        window.topic,
        window.partition,
        last.end,
        last.committed,
        last.lag,
        LagStatus.OK,
        "",
        samples=len(window.samples),
        consume_rate=consume,
        produce_rate=produce,
    )
    if last.committed is None:
        return _without_commits(base, last.end, now, start)
    found: list[tuple[LagStatus, str]] = []
    if rewind is not None:
        found.append((LagStatus.REWIND, f"committed offset went back from {rewind[0]} to {rewind[1]}"))
    run = _lagging_run(since_rewind)
    min_samples = max(2, min_samples)
    if len(run) >= min_samples:
        trend = _trend(run, consume, min_samples)
        if trend is not None:
            found.append(trend)
    status, reason = max(found, key=lambda f: f[0].rank, default=(LagStatus.OK, _ok_reason(last)))
    unmoved = window.since is not None and window.since < last.ts
    stalled = now - window.since if unmoved and last.lag and window.since is not None else None
    stuck = status in (LagStatus.STALL, LagStatus.STOP)
    time_lag = 0.0 if not last.lag else (last.lag / consume if consume and not stuck else None)
    return msgspec.structs.replace(
        base, status=status, reason=reason, time_lag_s=time_lag, stalled_for_s=stalled
    )


def _without_commits(base: PartitionLag, end: int, now: float, start: DeploymentStart | None) -> PartitionLag:
    """A partition the group never committed on: empty (OK), STARTING in the window, else NO_COMMITS."""
    if end == 0:
        return msgspec.structs.replace(base, reason="empty partition, nothing to commit yet")
    offset = start.start_offset(base.topic, base.partition) if start is not None else None
    lag = None if offset is None else max(0, end - offset)
    origin = "start offset not recorded" if offset is None else f"started at offset {offset}, lag {lag}"
    if start is not None and start.within(now):
        age = max(0.0, now - start.started_at)
        reason = (
            f"no commit yet, deployed {age:.0f} s ago ({origin}; loom commits after the first table "
            f"flush, expected within {start.window_s:.0f} s); end {end}"
        )
        return msgspec.structs.replace(base, lag=lag, status=LagStatus.STARTING, reason=reason)
    since = "" if start is None else f" {max(0.0, now - start.started_at):.0f} s after the deployment;"
    reason = f"no committed offset yet (not started);{since} end {end}" + (
        f" ({origin})" if offset is not None else ""
    )
    return msgspec.structs.replace(base, lag=lag, status=LagStatus.NO_COMMITS, reason=reason)


def _ok_reason(last: LagSample) -> str:
    return "caught up" if not last.lag else f"lag {last.lag}, consumer progressing"


def _split_at_rewind(samples: Sequence[LagSample]) -> tuple[tuple[int, int] | None, list[LagSample]]:
    """The latest backwards move ``(from, to)`` of the committed offset (or None), and the samples with a
    committed offset since then."""
    usable = [s for s in samples if s.committed is not None]
    rewind, start = None, 0
    for i, (a, b) in enumerate(pairwise(usable), start=1):
        if (b.committed or 0) < (a.committed or 0):
            rewind, start = (a.committed or 0, b.committed or 0), i
    return rewind, usable[start:]


def _lagging_run(since_rewind: Sequence[LagSample]) -> list[LagSample]:
    """The trailing samples with lag > 0."""
    run: list[LagSample] = []
    for sample in reversed(since_rewind):
        if not sample.lag:
            break
        run.append(sample)
    return run[::-1]


def _trend(run: list[LagSample], consume: float | None, min_samples: int) -> tuple[LagStatus, str] | None:
    """STALL / STOP / WARN from a run of lagging samples, or None if the consumer keeps up."""
    flat = _constant_suffix(run)
    if len(flat) >= min_samples:
        first, last = flat[0], flat[-1]
        span = last.ts - first.ts
        if last.end > first.end:
            return LagStatus.STALL, (
                f"committed offset {last.committed} unchanged over {len(flat)} samples ({span:.0f} s) while "
                f"{last.end - first.end} new messages arrived; lag {last.lag}"
            )
        return LagStatus.STOP, (
            f"committed offset {last.committed} unchanged over {len(flat)} samples ({span:.0f} s) with "
            f"{last.lag} messages left and no new data"
        )
    lags = [s.lag or 0 for s in run]
    if all(b >= a for a, b in pairwise(lags)) and lags[-1] > lags[0]:
        rate = f" at {consume:.1f} msg/s" if consume else ""
        return LagStatus.WARN, f"consuming{rate} but lag grew at every sample: {lags[0]} -> {lags[-1]}"
    return None


def _constant_suffix(run: list[LagSample]) -> list[LagSample]:
    """The trailing samples of *run* sharing the latest committed offset."""
    flat = [run[-1]]
    for sample in reversed(run[:-1]):
        if sample.committed != run[-1].committed:
            break
        flat.append(sample)
    return flat[::-1]


def _rates(samples: Sequence[LagSample], usable: Sequence[LagSample]) -> tuple[float | None, float | None]:
    """Committed-offset progress (over *usable*: since any rewind) and end-offset growth per second."""
    consume = None
    if len(usable) >= 2 and usable[-1].ts > usable[0].ts:
        consume = ((usable[-1].committed or 0) - (usable[0].committed or 0)) / (usable[-1].ts - usable[0].ts)
    produce = None
    if len(samples) >= 2 and samples[-1].ts > samples[0].ts:
        produce = max(0, samples[-1].end - samples[0].end) / (samples[-1].ts - samples[0].ts)
    return consume, produce


def evaluate_flow(
    offsets: TargetOffsets,
    windows: Mapping[tuple[str, int], PartitionWindow],
    settings: KafkaLagSettings,
    *,
    now: float | None = None,
    min_samples: int = MIN_SAMPLES,
    start: DeploymentStart | None = None,
    delays: Mapping[tuple[str, int], DelayReading] | None = None,
) -> FlowLag:
    """A flow's status: UNREACHABLE / MISSING_TOPIC first, else the worst partition, then the thresholds
    (total lag, then the delay of every partition not forgiven as an idle tail).

    *start*: the flow's current deployment (``STARTING`` instead of ``NO_COMMITS`` within its window).
    *delays*: the delay reading of each lagging partition (``fetch_delays``); ``None``: not read (no
    delay in the result, no delay thresholds). A lagging partition missing from it is unknown.
    """
    target = offsets.target
    if offsets.unreachable is not None:
        return FlowLag(
            target.name,
            target.group,
            LagStatus.UNREACHABLE,
            offsets.unreachable,
            0,
            delay_read=delays is not None,
        )
    parts = tuple(_partition_lag(p, windows, now, min_samples, start) for p in offsets.partitions)
    if delays is not None:
        parts = tuple(_with_delay(p, delays.get((p.topic, p.partition))) for p in parts)
    total = sum(p.lag or 0 for p in parts)
    judged = _forgive_idle_tail(parts, total, target.idle_tail)
    forgiven = {
        (p.topic, p.partition) for p, q in zip(parts, judged, strict=True) if p.status is not q.status
    }
    parts = judged
    delayed = [p for p in parts if (p.topic, p.partition) not in forgiven]
    status, reason = _flow_status(parts, offsets.missing_topics, total, settings, delayed)
    lagging = [p for p in parts if p.lag]
    times = [p.time_lag_s for p in lagging if p.time_lag_s is not None]
    stalled = [p.stalled_for_s for p in lagging if p.stalled_for_s is not None]
    known = [p.delay_s for p in parts if p.delay_s is not None]
    return FlowLag(
        name=target.name,
        group=target.group,
        status=status,
        reason=reason,
        total_lag=total,
        partitions=parts,
        missing_topics=offsets.missing_topics,
        consume_rate=_sum_known(p.consume_rate for p in parts),
        produce_rate=_sum_known(p.produce_rate for p in parts),
        time_lag_s=max(times) if times else (0.0 if not lagging else None),
        stalled_for_s=max(stalled) if stalled else None,
        max_delay_s=max(known) if known else None,
        delay_unknown=sum(p.delay_s is None for p in parts) if delays is not None else 0,
        delay_read=delays is not None,
    )


def _with_delay(part: PartitionLag, reading: DelayReading | None) -> PartitionLag:
    """*part* with its delay: 0 when nothing is left to consume, else the reading's (unknown without one)."""
    if part.lag == 0 or (part.lag is None and part.end == 0 and part.status is not LagStatus.UNAVAILABLE):
        return msgspec.structs.replace(part, delay_s=0.0)
    if reading is None:
        why = "no offset to read from" if part.lag is None else "not read"
        return msgspec.structs.replace(part, delay_note=why)
    return msgspec.structs.replace(part, delay_s=reading.delay_s, delay_note=reading.error)


def _forgive_idle_tail(
    parts: tuple[PartitionLag, ...], total: int, idle_tail: int
) -> tuple[PartitionLag, ...]:
    """loom flushes a table buffer only when more data arrives, so on an idle topic a healthy job keeps
    up to a buffer of rows (and their offsets) uncommitted: STOP within that tail is reported OK."""
    stopped = [p for p in parts if p.status is LagStatus.STOP]
    if not stopped or total > idle_tail or any(p.status is LagStatus.STALL for p in parts):
        return parts
    reason = (
        f"idle: {total} message(s) wait in loom's table buffer (up to {idle_tail}) until more data "
        "arrives; they are committed after the next flush"
    )
    return tuple(
        msgspec.structs.replace(p, status=LagStatus.OK, reason=reason) if p.status is LagStatus.STOP else p
        for p in parts
    )


def _partition_lag(
    part: PartitionOffsets,
    windows: Mapping[tuple[str, int], PartitionWindow],
    now: float | None,
    min_samples: int,
    start: DeploymentStart | None = None,
) -> PartitionLag:
    """Evaluate one partition, or mark it UNAVAILABLE when this fetch failed for it."""
    if part.error is not None or part.end is None:
        lag = None if part.end is None or part.committed is None else max(0, part.end - part.committed)
        reason = part.error or "no end offset"
        return PartitionLag(
            part.topic, part.partition, part.end, part.committed, lag, LagStatus.UNAVAILABLE, reason
        )
    window = windows.get((part.topic, part.partition))
    if window is None or not window.samples:
        window = PartitionWindow(part.topic, part.partition).add(
            LagSample(now if now is not None else time.time(), part.end, part.committed), 1
        )
    return evaluate_window(window, now=now, min_samples=min_samples, start=start)


def _flow_status(
    parts: Sequence[PartitionLag],
    missing: Sequence[str],
    total: int,
    settings: KafkaLagSettings,
    delayed: Sequence[PartitionLag] = (),
) -> tuple[LagStatus, str]:
    """Worst of: missing topics, partition statuses, total-lag thresholds, delay thresholds (over
    *delayed*); with a one-line reason."""
    found: list[tuple[LagStatus, str]] = []
    if missing:
        found.append((LagStatus.MISSING_TOPIC, f"source topic(s) missing: {', '.join(missing)}"))
    if not parts and not missing:
        found.append((LagStatus.UNAVAILABLE, "no partition answered"))
    for status in sorted({p.status for p in parts}, key=lambda s: -s.rank):
        if status is LagStatus.OK:
            continue
        bad = [p for p in parts if p.status is status]
        example = bad[0]
        found.append(
            (
                status,
                f"{len(bad)}/{len(parts)} partition(s) {status.value}, e.g. "
                f"{example.topic}[{example.partition}]: {example.reason}",
            )
        )
    if total >= settings.error_lag:
        found.append((LagStatus.ERR, f"total lag {total} >= error_lag {settings.error_lag}"))
    elif total >= settings.warn_lag:
        found.append((LagStatus.WARN, f"total lag {total} >= warn_lag {settings.warn_lag}"))
    found.extend(_delay_thresholds(delayed, settings))
    if not found:
        return LagStatus.OK, f"total lag {total} over {len(parts)} partition(s)"
    status = worst(s for s, _ in found)
    reasons = [r for s, r in sorted(found, key=lambda f: -f[0].rank)]
    return status, "; ".join(reasons)


def _delay_thresholds(
    parts: Sequence[PartitionLag], settings: KafkaLagSettings
) -> list[tuple[LagStatus, str]]:
    """ERR / WARN when some partition's delay is at least ``error_delay_s`` / ``warn_delay_s``, naming the
    oldest one."""
    if settings.warn_delay_s is None and settings.error_delay_s is None:
        return []
    known = sorted((p for p in parts if p.delay_s is not None), key=lambda p: -(p.delay_s or 0.0))
    for status, name, limit in (
        (LagStatus.ERR, "error_delay_s", settings.error_delay_s),
        (LagStatus.WARN, "warn_delay_s", settings.warn_delay_s),
    ):
        over = [p for p in known if limit is not None and (p.delay_s or 0.0) >= limit]
        if over and limit is not None:
            first = over[0]
            more = f" ({len(over)} partition(s) at least that old)" if len(over) > 1 else ""
            return [
                (
                    status,
                    f"partition {first.topic}[{first.partition}] delay {first.delay_s:.0f} s (oldest "
                    f"unconsumed message) >= {name} {limit:g}{more}",
                )
            ]
    return []


def _sum_known(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None
