"""Freshness of a sink beyond its age: given when data last landed and the lag of the flows writing it,
a verdict (``fresh`` / ``idle`` / ``silent_while_lagging`` / ``no_data`` / ``unknown`` / ``missing`` /
``unreachable`` / ``read_error``) with a severity and a message, then (``with_delay_budget``) its
end-to-end delay against its budget (``over_delay_budget``). How old a sink's data may be is its Dagster
``FreshnessPolicy`` (``loom_dagster.freshness_policy``), judged by Dagster's freshness daemon."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import StrEnum

import msgspec

from loom_dagster.core.sensor_settings import SinkFreshness
from loom_dagster.core.sinks.reading import ReadStatus, SinkReading


class FreshnessStatus(StrEnum):
    """Freshness of one sink (see ``evaluate_freshness``)."""

    FRESH = "fresh"
    IDLE = "idle"
    SILENT_WHILE_LAGGING = "silent_while_lagging"
    NO_DATA = "no_data"
    UNKNOWN = "unknown"
    MISSING = "missing"
    UNREACHABLE = "unreachable"
    READ_ERROR = "read_error"
    OVER_DELAY_BUDGET = "over_delay_budget"


class Severity(StrEnum):
    """Severity of a failed freshness verdict (maps to Dagster's ``AssetCheckSeverity``)."""

    WARN = "WARN"
    ERROR = "ERROR"


class SourceLag(msgspec.Struct, frozen=True):
    """The latest Kafka lag known for a flow writing a sink: its total offset lag and, when the lag check
    read it, its delay (``max_delay_s``: the age of its oldest unconsumed message; ``delay_unknown``:
    lagging partitions whose delay was not read, so ``max_delay_s`` is only a lower bound)."""

    flow_key: str
    total_lag: int
    evaluated_at: float
    max_delay_s: float | None = None
    delay_unknown: int = 0

    @property
    def delay_known(self) -> bool:
        """Whether ``max_delay_s`` covers every partition of the flow."""
        return self.max_delay_s is not None and self.delay_unknown == 0


class FreshnessVerdict(msgspec.Struct, frozen=True):
    """Freshness of one sink at ``now``: status, pass/fail, severity and a human message."""

    asset_key: str
    status: FreshnessStatus
    passed: bool
    severity: Severity | None
    message: str
    age_s: float | None
    last_data_at: float | None
    freshness: SinkFreshness
    source_lag: SourceLag | None = None
    end_to_end: SinkEndToEnd | None = None


class SinkEndToEnd(msgspec.Struct, frozen=True):
    """The end-to-end delay of the data a sink receives: the largest latest end-to-end delay of the flows
    writing it (``flow_key``: that flow), its path from the first Kafka topic, whether every hop was
    known (else a lower bound), and when the lag sensor measured it."""

    flow_key: str
    delay_s: float
    path: str
    complete: bool
    measured_at: float


def with_delay_budget(verdict: FreshnessVerdict, end_to_end: SinkEndToEnd | None) -> FreshnessVerdict:
    """*verdict* carrying the sink's end-to-end delay and, when that delay is at least the sink's budget
    (``max_end_to_end_delay_s``: ERROR; ``warn_end_to_end_delay_s``: WARN), ``over_delay_budget`` instead
    (only where that is worse: a verdict already failing as badly keeps its status). A lower bound over
    the budget is over it too.

    Example:
        >>> from loom_dagster.core.sinks.reading import SinkReading
        >>> fresh = FreshnessVerdict("delta/t", FreshnessStatus.FRESH, True, None, "ok", 1.0, 0.0,
        ...     SinkFreshness(max_end_to_end_delay_s=60))
        >>> late = SinkEndToEnd("loom/b", 75.0, "orders -> [a 75.0 s] -> enriched -> [b 0.0 s]", True, 0.0)
        >>> judged = with_delay_budget(fresh, late)
        >>> judged.status.value, judged.severity.value
        ('over_delay_budget', 'ERROR')
    """
    judged = msgspec.structs.replace(verdict, end_to_end=end_to_end)
    over = _over_budget(end_to_end, verdict.freshness)
    if over is None or end_to_end is None or _rank(verdict.severity) >= _rank(over[0]):
        return judged
    severity, name, limit = over
    bound = "" if end_to_end.complete else "at least "
    message = (
        f"end-to-end delay {bound}{_duration(end_to_end.delay_s)} ({end_to_end.delay_s:.0f} s) >= {name} "
        f"{limit:g}, via {end_to_end.path}"
    )
    if not verdict.passed:
        message += f"; also {verdict.message}"
    return msgspec.structs.replace(
        judged, status=FreshnessStatus.OVER_DELAY_BUDGET, passed=False, severity=severity, message=message
    )


def _over_budget(
    end_to_end: SinkEndToEnd | None, freshness: SinkFreshness
) -> tuple[Severity, str, float] | None:
    if end_to_end is None:
        return None
    for severity, name, limit in (
        (Severity.ERROR, "max_end_to_end_delay_s", freshness.max_end_to_end_delay_s),
        (Severity.WARN, "warn_end_to_end_delay_s", freshness.warn_end_to_end_delay_s),
    ):
        if limit is not None and end_to_end.delay_s >= limit:
            return severity, name, float(limit)
    return None


def _rank(severity: Severity | None) -> int:
    return {None: 0, Severity.WARN: 1, Severity.ERROR: 2}[severity]


def evaluate_freshness(
    reading: SinkReading,
    *,
    last_data_at: float | None,
    now: float,
    freshness: SinkFreshness,
    lags: Sequence[SourceLag] = (),
) -> FreshnessVerdict:
    """Freshness of a sink at *now*, as far as Dagster's ``FreshnessPolicy`` cannot see it: the policy
    (built from the same ``SinkFreshness``) judges the sink's age from the materializations the sink
    health sensor reports; this verdict adds the cross-system stall and the table's own state.

    The first that applies, in order:
    unreachable / read_error: cannot read the table (ERROR). missing: no such table (WARN; the policy
    only sees no materialization). no_data: the table holds no data (WARN; likewise). unknown: it holds
    data but nothing says when it landed (passed: the sensor's next materialization tells the policy).
    silent_while_lagging: no new data for longer than ``warn_after_s`` while a writing flow's source
    delay (age of its oldest unconsumed message) is also longer than ``warn_after_s``, however small its
    offset lag; where the delay is unknown (not read, or not for every partition), while the source has
    offset lag > 0 (ERROR). A source whose whole delay is known and within the window is no reason
    (data did arrive, recently). Otherwise fresh (new data within ``warn_after_s``) or idle (none for
    longer, and no writing flow has data waiting): both pass, the age is the policy's to judge.
    """

    def verdict(status: FreshnessStatus, severity: Severity | None, message: str) -> FreshnessVerdict:
        age = max(0.0, now - last_data_at) if last_data_at is not None else None
        return FreshnessVerdict(
            reading.asset_key, status, severity is None, severity, message, age, last_data_at, freshness, lag
        )

    silent_cause = _silent_cause(lags, freshness.warn_after_s)
    lag = silent_cause or max(lags, key=lambda x: x.total_lag, default=None)
    lag = lag if lag is not None and lag.total_lag > 0 else None
    if reading.status is not ReadStatus.OK:
        return _unreadable(reading, verdict)
    if not reading.has_data:
        return verdict(FreshnessStatus.NO_DATA, Severity.WARN, f"{reading.asset_key} holds no data yet")
    if last_data_at is None:
        return verdict(
            FreshnessStatus.UNKNOWN,
            None,
            f"{reading.asset_key} holds data but its metadata does not say when it last landed (the sink "
            "health sensor's next materialization will; or configure SinkHealthSettings.sql_timestamp_columns)",
        )
    age = max(0.0, now - last_data_at)
    # Failing statuses that need the age, each its own step, before the passing ones.
    if age > freshness.warn_after_s and silent_cause is not None:
        return verdict(
            FreshnessStatus.SILENT_WHILE_LAGGING,
            Severity.ERROR,
            _silent_message(silent_cause, age, now, freshness),
        )
    if age <= freshness.warn_after_s:
        return verdict(FreshnessStatus.FRESH, None, f"new data {_duration(age)} ago")
    return verdict(
        FreshnessStatus.IDLE,
        None,
        f"no new data for {_duration(age)}, and no writing flow has data waiting (how old the data may be is "
        "the asset's freshness policy)",
    )


def _silent_message(cause: SourceLag, age: float, now: float, freshness: SinkFreshness) -> str:
    measured = _duration(max(0.0, now - cause.evaluated_at))
    if cause.max_delay_s is not None and cause.max_delay_s > freshness.warn_after_s:
        why = (
            f"flow {cause.flow_key}'s oldest unconsumed message is {_duration(cause.max_delay_s)} old "
            f"(delay {cause.max_delay_s:.0f} s > warn_after_s {freshness.warn_after_s:g}; "
            f"{cause.total_lag} message(s) behind; measured {measured} ago)"
        )
    else:
        why = f"flow {cause.flow_key} is {cause.total_lag} message(s) behind (lag measured {measured} ago)"
    return f"sink silent while its source lags: no new data for {_duration(age)} while {why}"


def _silent_cause(lags: Sequence[SourceLag], window_s: float) -> SourceLag | None:
    """The writing flow that makes a silent sink a failure: the one with the oldest unconsumed message
    beyond *window_s*; else, among flows whose delay is not fully known, the most lagging one with
    offset lag > 0; else none (every lagging flow's delay is known and within the window)."""
    delayed = [x for x in lags if x.max_delay_s is not None and x.max_delay_s > window_s]
    if delayed:
        return max(delayed, key=lambda x: x.max_delay_s or 0.0)
    unknown = [x for x in lags if x.total_lag > 0 and not x.delay_known]
    return max(unknown, key=lambda x: x.total_lag, default=None)


def _unreadable(
    reading: SinkReading, verdict: Callable[[FreshnessStatus, Severity | None, str], FreshnessVerdict]
) -> FreshnessVerdict:
    error = reading.error or reading.status.value
    if reading.status is ReadStatus.MISSING:
        return verdict(FreshnessStatus.MISSING, Severity.WARN, f"table missing: {error}")
    if reading.status is ReadStatus.UNREACHABLE:
        return verdict(FreshnessStatus.UNREACHABLE, Severity.ERROR, f"unreachable: {error}")
    return verdict(FreshnessStatus.READ_ERROR, Severity.ERROR, f"cannot read: {error}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
