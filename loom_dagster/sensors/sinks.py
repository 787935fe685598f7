"""Sink health in Dagster: a sensor that reports a runless materialization of a sink table each time
new data lands in it, and a ``freshness`` asset check per sink.

The materializations feed each sink's Dagster ``FreshnessPolicy`` (``loom_dagster.freshness_policy``:
the freshness daemon judges the sink's age from them); the ``freshness`` check judges what the policy
cannot see: a sink silent while its source lags, and a table missing, empty or unreadable.

The sensor reads every sink's metadata each tick (``loom_dagster.core.sinks``), keeps the last
reading per sink in its cursor, emits ONE ``AssetMaterialization`` per sink whose data changed and none
otherwise, and an ``AssetCheckEvaluation`` of ``freshness`` when a sink's freshness status changes (and
at least every ``check_refresh_s``). ``build_sink_freshness_checks`` declares those checks, so the UI
lists them, and runs the same evaluation on demand.

**End-to-end delay**: each tick, for every sink written by Kafka-sourced flows, the largest end-to-end
delay of its writers, read from their latest ``kafka_lag`` evaluation (``loom/end_to_end_delay_s``, which
the lag sensor computes over the chained flows; one event-log query per flow per tick, shared by the
sinks it writes). It goes into the ``freshness`` metadata (value, path, when measured) and is judged
against the sink's ``warn_end_to_end_delay_s`` / ``max_end_to_end_delay_s`` (``over_delay_budget``). The
evaluation is also reported when that delay moved by at least ``end_to_end_step_s`` and 10 % since the
last one reported, so its metadata stays current.
"""

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import dagster as dg
import msgspec

from loom_dagster.asset_check_names import KAFKA_LAG, SINK_FRESHNESS
from loom_dagster.asset_graph import LoomAssetGraph, graph_sinks
from loom_dagster.core.flows.defs_state import Lazy
from loom_dagster.core.flows.records import SinkBackend
from loom_dagster.core.sensor_settings import SinkHealthSettings
from loom_dagster.core.sinks.connections import DEFAULT_TIMEOUT_S
from loom_dagster.core.sinks.freshness import (
    FreshnessVerdict,
    Severity,
    SinkEndToEnd,
    SourceLag,
    evaluate_freshness,
    with_delay_budget,
)
from loom_dagster.core.sinks.read import read_sinks
from loom_dagster.core.sinks.reading import ReadStatus, SinkReading, as_int
from loom_dagster.core.sinks.targets import SinkTarget, declared_sink_targets, sink_targets
from loom_dagster.sensors.check_ops import declared_check_ops
from loom_dagster.sensors.lag import (
    END_TO_END_COMPLETE_KEY,
    END_TO_END_DELAY_KEY,
    END_TO_END_PATH_KEY,
    kafka_lag_flows,
)

Clock = Callable[[], float]
LAG_METADATA_KEYS = ("total_lag", "loom/total_lag")
"""Metadata keys of the ``kafka_lag`` check evaluation holding a flow's total lag (first found wins)."""
DELAY_METADATA_KEY = "max_delay_s"
"""Metadata key of the ``kafka_lag`` check evaluation holding a flow's delay in seconds (null: unknown)."""
DELAY_UNKNOWN_METADATA_KEY = "delay_unknown_partitions"
"""Metadata key of the ``kafka_lag`` check evaluation counting partitions whose delay is unknown."""
CURSOR_VERSION = 1
END_TO_END_STEP_S = 30.0
"""Default least move of a sink's end-to-end delay that reports its ``freshness`` evaluation again (with
at least 10 % of the last reported value): the lag sensor's default interval."""
END_TO_END_STEP_RATIO = 0.1


class SinkState(msgspec.Struct, frozen=True):
    """What the sensor remembers about one sink between ticks (one entry of its cursor).

    ``reading`` is the last successful reading (the baseline for change detection); the cursor keeps
    only its marker, version, rows and time (``SinkCursorEntry``), so 200 sinks stay around 20 KiB.

    Example:
        >>> SinkState(check_status="fresh", check_at=12.3456).to_json()
        {'ok': False, 'c': 'fresh', 'ct': 12.346}
    """

    reading: SinkReading | None = None
    last_data_at: float | None = None
    check_status: str | None = None
    check_at: float | None = None
    end_to_end_s: float | None = None
    """The end-to-end delay in the last reported ``freshness`` evaluation (``None``: none)."""

    def to_json(self) -> dict[str, Any]:
        """Compact JSON-safe dict for the cursor (``None`` values left out)."""
        r = self.reading
        entry = SinkCursorEntry(
            ok=r is not None,
            marker=r.marker if r else None,
            version=r.version if r else None,
            rows=r.rows if r else None,
            last_modified=_rounded(r.last_modified) if r else None,
            last_data_at=_rounded(self.last_data_at),
            check_status=self.check_status,
            check_at=_rounded(self.check_at),
            end_to_end_s=_rounded(self.end_to_end_s),
        )
        return cast("dict[str, Any]", msgspec.to_builtins(entry))

    @classmethod
    def from_json(cls, data: Mapping[str, Any], target: SinkTarget) -> "SinkState":
        """Inverse of ``to_json`` for *target* (a cursor entry written by any earlier version).

        Raises:
            ValueError: if a value has the wrong type.
        """
        entry = msgspec.convert({"ok": False, **data}, SinkCursorEntry, strict=False)
        reading = None
        if entry.ok:
            reading = SinkReading(
                asset_key=target.asset_key,
                backend=target.backend,
                status=ReadStatus.OK,
                read_at=0.0,
                marker=entry.marker,
                version=entry.version,
                rows=entry.rows,
                last_modified=entry.last_modified,
            )
        return cls(reading, entry.last_data_at, entry.check_status, entry.check_at, entry.end_to_end_s)


class SinkCursorEntry(msgspec.Struct, frozen=True, omit_defaults=True):
    """One sink in the sensor cursor, as stored: short keys, ``None`` values left out.

    Example:
        >>> msgspec.json.encode(SinkCursorEntry(ok=True, marker="7", version=7))
        b'{"ok":true,"m":"7","v":7}'
    """

    ok: bool
    marker: str | None = msgspec.field(default=None, name="m")
    version: int | None = msgspec.field(default=None, name="v")
    rows: int | None = msgspec.field(default=None, name="r")
    last_modified: float | None = msgspec.field(default=None, name="lm")
    last_data_at: float | None = msgspec.field(default=None, name="d")
    check_status: str | None = msgspec.field(default=None, name="c")
    check_at: float | None = msgspec.field(default=None, name="ct")
    end_to_end_s: float | None = msgspec.field(default=None, name="e")


def _rounded(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


@dataclass(frozen=True)
class SinkTick:
    """Outcome of one tick for one sink: the events to report and the new state."""

    state: SinkState
    materialization: dg.AssetMaterialization | None = None
    evaluation: dg.AssetCheckEvaluation | None = None
    verdict: FreshnessVerdict | None = field(default=None, compare=False)


# -- Kafka lag of the writing flows ---------------------------------------------------------------


class LagLookup:
    """Latest ``kafka_lag`` evaluations of the flows writing sinks, read from the instance at most once per
    tick and flow: a flow's total lag and delay (from its recent history, read when a sink is silent), and
    the end-to-end delays of every flow of *kafka_flows* (the flow keys with a ``kafka_lag`` check) from
    ONE query of each check's latest record (the lag sensor's runless evaluation, updated in place). A flow
    whose latest record is a one-shot check run's (which computes none) is read from its history."""

    def __init__(self, instance: dg.DagsterInstance, kafka_flows: Iterable[str]) -> None:
        self._instance = instance
        self._kafka = sorted(set(kafka_flows))
        self._history: dict[str, list[tuple[float, dg.AssetCheckEvaluation]]] = {}
        self._end_to_end: dict[str, SinkEndToEnd | None] | None = None
        self.queries = 0

    def for_target(self, target: SinkTarget) -> list[SourceLag]:
        """Known lags of the flows writing *target*."""
        lags = [self.latest(key) for key in target.flow_keys]
        return [lag for lag in lags if lag is not None]

    def latest(self, flow_key: str) -> SourceLag | None:
        """The flow's latest total lag, or ``None`` when unknown."""
        return source_lag_of(flow_key, self.history(flow_key))

    def end_to_end(self, target: SinkTarget) -> SinkEndToEnd | None:
        """The largest latest end-to-end delay of the Kafka-sourced flows writing *target* (``None``: none
        known)."""
        if self._end_to_end is None:
            self._end_to_end = self._read_end_to_end()
        found = [e for key in target.flow_keys if (e := self._end_to_end.get(key)) is not None]
        return max(found, key=lambda e: (e.delay_s, e.complete, e.flow_key), default=None)

    def _read_end_to_end(self) -> dict[str, SinkEndToEnd | None]:
        """Every Kafka flow's end-to-end delay: from its latest ``kafka_lag`` record (one query for all),
        else from its history when that record carries none."""
        checks = {dg.AssetCheckKey(dg.AssetKey.from_user_string(k), KAFKA_LAG): k for k in self._kafka}
        records: Mapping[dg.AssetCheckKey, Any] = {}
        if checks:
            self.queries += 1
            try:
                records = self._instance.event_log_storage.get_latest_asset_check_execution_by_key(
                    list(checks)
                )
            except NotImplementedError:
                records = {}
        found: dict[str, SinkEndToEnd | None] = {}
        for check, key in checks.items():
            event = getattr(records.get(check), "event", None)
            evaluation = getattr(records.get(check), "evaluation", None)
            if event is None or not evaluation:
                found[key] = None
                continue
            found[key] = end_to_end_of(key, [(event.timestamp, evaluation)])
            if found[key] is None and event.run_id:  # a one-shot check run, after the sensor's tick
                found[key] = end_to_end_of(key, self.history(key))
        return found

    def history(self, flow_key: str) -> list[tuple[float, dg.AssetCheckEvaluation]]:
        """The flow's latest ``kafka_lag`` evaluations with their event times, newest first (one query,
        then cached)."""
        if flow_key not in self._history:
            self.queries += 1
            self._history[flow_key] = lag_history(self._instance, flow_key)
        return self._history[flow_key]


def lag_history(instance: dg.DagsterInstance, flow_key: str) -> list[tuple[float, dg.AssetCheckEvaluation]]:
    """The latest (up to 5) ``kafka_lag`` check evaluations on the flow asset (runless or in a run),
    newest first by event time (runless evaluations update one row in place, so not by row id)."""
    check_key = dg.AssetCheckKey(asset_key=dg.AssetKey.from_user_string(flow_key), name=KAFKA_LAG)
    try:
        records = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=5)
    except NotImplementedError:  # an event log storage without check history: no lag to report
        return []
    found = [(r.event.timestamp, r.evaluation) for r in records if r.event is not None and r.evaluation]
    return sorted(found, key=lambda pair: -pair[0])


def latest_source_lag(instance: dg.DagsterInstance, flow_key: str) -> SourceLag | None:
    """Total lag and delay from the newest ``kafka_lag`` check evaluation on the flow asset (runless or in
    a run); the delay is ``None`` when that evaluation did not carry one."""
    return source_lag_of(flow_key, lag_history(instance, flow_key))


def end_to_end_of(
    flow_key: str, history: Sequence[tuple[float, dg.AssetCheckEvaluation]]
) -> SinkEndToEnd | None:
    """The end-to-end delay in the newest of *history* that carries a known one (the lag sensor's: a
    one-shot check run does not compute it)."""
    for evaluated_at, evaluation in history:
        delay = _as_float(_metadata_value(evaluation.metadata, END_TO_END_DELAY_KEY))
        if delay is None:
            continue
        path = str(_metadata_value(evaluation.metadata, END_TO_END_PATH_KEY) or "")
        complete = _metadata_value(evaluation.metadata, END_TO_END_COMPLETE_KEY) is True
        return SinkEndToEnd(flow_key, delay, path, complete, evaluated_at)
    return None


def source_lag_of(
    flow_key: str, history: Sequence[tuple[float, dg.AssetCheckEvaluation]]
) -> SourceLag | None:
    """Total lag and delay from the newest of *history* (``None``: no evaluation, or no total lag)."""
    if not history:
        return None
    evaluated_at, evaluation = history[0]
    values = (_metadata_value(evaluation.metadata, key) for key in LAG_METADATA_KEYS)
    total = next((v for v in map(as_int, values) if v is not None), None)
    if total is None:
        return None
    delay = _as_float(_metadata_value(evaluation.metadata, DELAY_METADATA_KEY))
    unknown = as_int(_metadata_value(evaluation.metadata, DELAY_UNKNOWN_METADATA_KEY)) or 0
    return SourceLag(flow_key, total, evaluated_at, delay, unknown)


def build_sink_health_sensor(
    graph: LoomAssetGraph,
    settings: SinkHealthSettings,
    *,
    name: str = "loom_sink_health",
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
    clock: Clock = time.time,
    check_refresh_s: float = 600.0,
    max_workers: int = 16,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    end_to_end_step_s: float = END_TO_END_STEP_S,
) -> dg.SensorDefinition:
    """A sensor reading every storage sink of *graph* each ``settings.interval_s``.

    Per tick and sink: one runless ``AssetMaterialization`` when new data landed since the last tick
    (none otherwise), and a ``freshness`` ``AssetCheckEvaluation`` when the status changes, the last
    one is older than ``check_refresh_s``, or the sink's end-to-end delay moved by at least
    *end_to_end_step_s* and 10 % since the last one reported. Declare the checks with
    ``build_sink_freshness_checks``.
    """
    declared = declared_sink_targets(graph_sinks(graph), settings)
    resolved = lazy_sink_targets(graph, settings, declared)
    kafka_flows = [key.to_user_string() for key, _ in kafka_lag_flows(graph)]

    @dg.sensor(
        name=name,
        minimum_interval_seconds=settings.interval_s,
        default_status=default_status,
        description=f"Reads the metadata of {len(declared)} loom sink table(s): reports a materialization "
        "when new data lands (what their freshness policies judge) and evaluates their freshness check "
        "(silent while the source lags; missing, empty or unreadable table).",
    )
    def _sink_health(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        targets = resolved()
        now = clock()
        states = load_cursor(context.cursor, targets)
        states.update(baseline_states(context.instance, [t for t in targets if t.asset_key not in states]))
        previous = {k: s.reading for k, s in states.items() if s.reading is not None}
        readings = read_sinks(targets, previous, max_workers=max_workers, timeout_s=timeout_s)
        lags = LagLookup(context.instance, kafka_flows)
        ticks = [
            sink_tick(
                t,
                r,
                states[t.asset_key],
                now=now,
                settings=settings,
                lags=lags,
                refresh_s=check_refresh_s,
                end_to_end_step_s=end_to_end_step_s,
            )
            for t, r in zip(targets, readings, strict=True)
        ]
        events: list[dg.AssetMaterialization | dg.AssetCheckEvaluation] = []
        for tick in ticks:
            events += [e for e in (tick.materialization, tick.evaluation) if e is not None]
        context.log.info(_summary(targets, readings, ticks))
        cursor = dump_cursor({t.asset_key: tick.state for t, tick in zip(targets, ticks, strict=True)})
        return dg.SensorResult(asset_events=events, cursor=cursor)

    return _sink_health


def lazy_sink_targets(
    graph: LoomAssetGraph, settings: SinkHealthSettings, declared: Sequence[SinkTarget]
) -> Lazy[list[SinkTarget]]:
    """The sink targets with their connection settings, resolved on first use in the process that
    ticks (it compiles the plans a state-backed load skipped) and kept for its lifetime; restricted
    to the sinks declared at load."""
    keys = {t.asset_key for t in declared}
    return Lazy(lambda: [t for t in sink_targets(graph_sinks(graph), settings) if t.asset_key in keys])


def sink_tick(
    target: SinkTarget,
    reading: SinkReading,
    state: SinkState,
    *,
    now: float,
    settings: SinkHealthSettings,
    lags: LagLookup,
    refresh_s: float,
    end_to_end_step_s: float = END_TO_END_STEP_S,
) -> SinkTick:
    """Compare one reading with the sink's state: materialize on new data, evaluate freshness."""
    prior = state.reading
    changed = reading.has_data and reading.marker != (prior.marker if prior is not None else None)
    last_data_at = _last_data_at(reading, state, changed, now)
    verdict = freshness_verdict(target, reading, last_data_at, now, settings, lags)
    materialization = sink_materialization(target, reading, last_data_at) if changed else None
    end_to_end_s = verdict.end_to_end.delay_s if verdict.end_to_end is not None else None
    due = (
        state.check_status != verdict.status.value
        or state.check_at is None
        or now - state.check_at >= refresh_s
        or end_to_end_moved(state.end_to_end_s, end_to_end_s, end_to_end_step_s)
    )
    evaluation = freshness_evaluation(target, verdict, reading) if due else None
    new_state = SinkState(
        reading=reading if reading.ok else prior,
        last_data_at=last_data_at if reading.ok else state.last_data_at,
        check_status=verdict.status.value if due else state.check_status,
        check_at=now if due else state.check_at,
        end_to_end_s=end_to_end_s if due else state.end_to_end_s,
    )
    return SinkTick(new_state, materialization, evaluation, verdict)


def end_to_end_moved(reported: float | None, current: float | None, step_s: float) -> bool:
    """Whether the end-to-end delay moved materially since the last reported one: it appeared or went
    away, or moved by at least *step_s* and ``END_TO_END_STEP_RATIO`` of the reported value.

    Example:
        >>> end_to_end_moved(100.0, 125.0, 30.0), end_to_end_moved(100.0, 131.0, 30.0)
        (False, True)
        >>> end_to_end_moved(1000.0, 1090.0, 30.0), end_to_end_moved(None, 0.0, 30.0)
        (False, True)
    """
    if reported is None or current is None:
        return (reported is None) != (current is None)
    return abs(current - reported) >= max(step_s, END_TO_END_STEP_RATIO * reported)


def _last_data_at(reading: SinkReading, state: SinkState, changed: bool, now: float) -> float | None:
    """The table's own time of new data when it has one, else when the sensor first saw the change."""
    if not reading.ok:
        return state.last_data_at
    if not reading.has_data:
        return None
    if not changed and state.last_data_at is not None:
        return state.last_data_at
    return reading.last_modified if reading.last_modified is not None else now


def freshness_verdict(
    target: SinkTarget,
    reading: SinkReading,
    last_data_at: float | None,
    now: float,
    settings: SinkHealthSettings,
    lags: LagLookup,
) -> FreshnessVerdict:
    """``evaluate_freshness`` with the writing flows' Kafka lag (looked up only when the sink has been
    silent past ``warn_after_s``), then the sink's end-to-end delay and its budget (``with_delay_budget``)."""
    freshness = settings.freshness_for(target.asset_key)
    silent = reading.has_data and last_data_at is not None and now - last_data_at > freshness.warn_after_s
    verdict = evaluate_freshness(
        reading,
        last_data_at=last_data_at,
        now=now,
        freshness=freshness,
        lags=lags.for_target(target) if silent else (),
    )
    return with_delay_budget(verdict, lags.end_to_end(target))


def sink_materialization(
    target: SinkTarget, reading: SinkReading, last_data_at: float | None
) -> dg.AssetMaterialization:
    """The runless materialization reported when new data landed in a sink."""
    added = f"{reading.rows_added} new row(s)" if reading.rows_added is not None else "new data"
    return dg.AssetMaterialization(
        asset_key=dg.AssetKey.from_user_string(target.asset_key),
        description=f"{added} in {target.backend.value} table {target.table} (seen by the sink health sensor)",
        metadata=materialization_metadata(target, reading, last_data_at),
    )


def materialization_metadata(
    target: SinkTarget, reading: SinkReading, last_data_at: float | None
) -> dict[str, Any]:
    """Version, time of the new data, rows and rows added; never a URL or a secret."""
    metadata: dict[str, Any] = {
        "loom/backend": target.backend.value,
        "loom/marker": reading.marker or "",
        "loom/flows": ", ".join(target.flow_names),
        "loom/read_ms": reading.read_ms,
    }
    if reading.version is not None:
        metadata["loom/version"] = reading.version
    if last_data_at is not None:
        metadata["loom/last_data_at"] = dg.MetadataValue.timestamp(last_data_at)
    if reading.rows is not None:
        metadata["loom/rows"] = reading.rows
        if target.backend is not SinkBackend.DELTA:
            metadata["dagster/row_count"] = reading.rows
    if reading.rows_added is not None:
        metadata["loom/rows_added"] = reading.rows_added
    metadata.update({f"loom/{k}": v for k, v in reading.extra.items() if v is not None})
    return metadata


def freshness_evaluation(
    target: SinkTarget, verdict: FreshnessVerdict, reading: SinkReading
) -> dg.AssetCheckEvaluation:
    """The ``freshness`` check evaluation of one sink."""
    return dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey.from_user_string(target.asset_key),
        check_name=SINK_FRESHNESS,
        passed=verdict.passed,
        severity=check_severity(verdict),
        metadata=freshness_metadata(verdict, reading),
        description=verdict.message,
    )


def check_severity(verdict: FreshnessVerdict) -> dg.AssetCheckSeverity:
    """Dagster severity of a verdict (WARN or ERROR; ERROR when it passed, Dagster's default)."""
    return dg.AssetCheckSeverity.WARN if verdict.severity is Severity.WARN else dg.AssetCheckSeverity.ERROR


def freshness_metadata(verdict: FreshnessVerdict, reading: SinkReading) -> dict[str, Any]:
    """Status, age, the silent window (``warn_after_s``), the source lag when it mattered, and the read
    status/error (redacted)."""
    metadata: dict[str, Any] = {
        "loom/freshness": verdict.status.value,
        "loom/warn_after_s": float(verdict.freshness.warn_after_s),
        "loom/read_status": reading.status.value,
    }
    if verdict.age_s is not None:
        metadata["loom/age_s"] = round(verdict.age_s, 1)
    if verdict.last_data_at is not None:
        metadata["loom/last_data_at"] = dg.MetadataValue.timestamp(verdict.last_data_at)
    if verdict.source_lag is not None:
        metadata["loom/source_lag"] = verdict.source_lag.total_lag
        metadata["loom/source_flow"] = verdict.source_lag.flow_key
        if verdict.source_lag.max_delay_s is not None:
            metadata["loom/source_delay_s"] = round(verdict.source_lag.max_delay_s, 1)
    if verdict.end_to_end is not None:
        metadata.update(end_to_end_sink_metadata(verdict))
    if reading.error:
        metadata["loom/error"] = reading.error
    return metadata


def end_to_end_sink_metadata(verdict: FreshnessVerdict) -> dict[str, Any]:
    """The sink's end-to-end delay: value, path, the writing flow it comes from, whether every hop was
    known, when the lag sensor measured it, and the budgets that are set."""
    found = verdict.end_to_end
    if found is None:
        return {}
    metadata: dict[str, Any] = {
        END_TO_END_DELAY_KEY: round(found.delay_s, 1),
        END_TO_END_PATH_KEY: dg.MetadataValue.text(found.path),
        END_TO_END_COMPLETE_KEY: found.complete,
        "loom/end_to_end_flow": found.flow_key,
        "loom/end_to_end_measured_at": dg.MetadataValue.timestamp(found.measured_at),
    }
    budgets = {
        "loom/warn_end_to_end_delay_s": verdict.freshness.warn_end_to_end_delay_s,
        "loom/max_end_to_end_delay_s": verdict.freshness.max_end_to_end_delay_s,
    }
    metadata.update({k: float(v) for k, v in budgets.items() if v is not None})
    return metadata


# -- cursor and baseline --------------------------------------------------------------------------


def load_cursor(cursor: str | None, targets: Sequence[SinkTarget]) -> dict[str, SinkState]:
    """Per-sink states from the sensor cursor (sinks no longer in the graph are dropped); an unreadable
    or older cursor starts afresh."""
    if not cursor:
        return {}
    try:
        data = json.loads(cursor)
        if data.get("v") != CURSOR_VERSION:
            return {}
        sinks = data["sinks"]
        return {
            t.asset_key: SinkState.from_json(sinks[t.asset_key], t) for t in targets if t.asset_key in sinks
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def dump_cursor(states: Mapping[str, SinkState]) -> str:
    """The sensor cursor: JSON of the last reading and check status per sink."""
    sinks = {k: s.to_json() for k, s in sorted(states.items())}
    return json.dumps({"v": CURSOR_VERSION, "sinks": sinks}, separators=(",", ":"))


def baseline_states(instance: dg.DagsterInstance, targets: Sequence[SinkTarget]) -> dict[str, SinkState]:
    """States of sinks the cursor does not know, from their latest materializations (one query).

    So a reset cursor (or a renamed sensor) does not report the same data again.
    """
    keys = {t.asset_key: dg.AssetKey.from_user_string(t.asset_key) for t in targets}
    events = instance.get_latest_materialization_events(list(keys.values())) if keys else {}
    return {t.asset_key: state_from_materialization(events.get(keys[t.asset_key]), t) for t in targets}


def state_from_materialization(event: dg.EventLogEntry | None, target: SinkTarget) -> SinkState:
    """The state recorded in a sink materialization reported by this sensor (empty for any other)."""
    materialization = event.asset_materialization if event is not None else None
    if event is None or materialization is None:
        return SinkState()
    metadata = materialization.metadata
    marker = _metadata_value(metadata, "loom/marker")
    if not marker:
        return SinkState()
    last_data_at = _as_float(_metadata_value(metadata, "loom/last_data_at")) or event.timestamp
    reading = SinkReading(
        asset_key=target.asset_key,
        backend=target.backend,
        status=ReadStatus.OK,
        read_at=event.timestamp,
        marker=str(marker),
        version=as_int(_metadata_value(metadata, "loom/version")),
        last_modified=last_data_at,
        rows=as_int(_metadata_value(metadata, "loom/rows")),
    )
    return SinkState(reading=reading, last_data_at=last_data_at)


# -- on-demand checks ------------------------------------------------------------------------------


def build_sink_freshness_checks(
    graph: LoomAssetGraph,
    settings: SinkHealthSettings,
    *,
    name: str = "loom_sink_freshness",
    clock: Clock = time.time,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[dg.AssetChecksDefinition]:
    """``freshness`` checks on every sink of *graph* (listed in the UI, runnable one by one).

    The body reads each selected sink once: the time of its last data comes from the table (Delta
    commit, ClickHouse part, SQL timestamp column), else from the sink's latest materialization.
    """
    declared = declared_sink_targets(graph_sinks(graph), settings)
    if not declared:
        raise ValueError("the asset graph has no storage sinks: there is nothing to check for freshness")
    kafka_flows = [key.to_user_string() for key, _ in kafka_lag_flows(graph)]
    specs = [freshness_check_spec(t, settings) for t in declared]
    resolved = lazy_sink_targets(graph, settings, declared)

    def _freshness(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        targets = {t.asset_key: t for t in resolved()}
        chosen = [
            targets[k.asset_key.to_user_string()]
            for k in context.selected_asset_check_keys
            if k.asset_key.to_user_string() in targets
        ]
        readings = read_sinks(chosen, timeout_s=timeout_s)
        now, lags = clock(), LagLookup(context.instance, kafka_flows)
        for target, reading in zip(chosen, readings, strict=True):
            last = reading.last_modified if reading.has_data else None
            if reading.has_data and last is None:
                last = materialized_data_at(context.instance, target)
            verdict = freshness_verdict(target, reading, last, now, settings, lags)
            yield dg.AssetCheckResult(
                asset_key=dg.AssetKey.from_user_string(target.asset_key),
                check_name=SINK_FRESHNESS,
                passed=verdict.passed,
                severity=check_severity(verdict),
                metadata=freshness_metadata(verdict, reading),
                description=verdict.message,
            )

    return declared_check_ops(
        name,
        specs,
        _freshness,
        description="Freshness of loom sink tables beyond their age (their freshness policies judge that): "
        "silent while the source Kafka lag grows, missing, empty or unreadable.",
        after_targets=False,  # sink tables are external: no run materializes them
    )


def freshness_check_spec(target: SinkTarget, settings: SinkHealthSettings) -> dg.AssetCheckSpec:
    """The declared ``freshness`` check of one sink."""
    windows = settings.freshness_for(target.asset_key)
    return dg.AssetCheckSpec(
        SINK_FRESHNESS,
        asset=dg.AssetKey.from_user_string(target.asset_key),
        description=f"Fails when the table is silent for over {windows.warn_after_s:g}s while "
        f"{', '.join(target.flow_names)} lags (its oldest unconsumed message older than that, or offset "
        "lag where that delay is unknown), or when it is unreachable or unreadable; warns when it is "
        "missing or empty. How old its data may be is the asset's freshness policy.",
    )


def materialized_data_at(instance: dg.DagsterInstance, target: SinkTarget) -> float | None:
    """When data last landed according to the sink's latest (sensor-reported) materialization."""
    key = dg.AssetKey.from_user_string(target.asset_key)
    return state_from_materialization(instance.get_latest_materialization_event(key), target).last_data_at


# -- helpers ---------------------------------------------------------------------------------------


def _metadata_value(metadata: Mapping[str, Any], key: str) -> Any:
    value = metadata.get(key)
    return getattr(value, "value", value)


def _as_float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _summary(
    targets: Sequence[SinkTarget], readings: Sequence[SinkReading], ticks: Sequence[SinkTick]
) -> str:
    changed = sum(t.materialization is not None for t in ticks)
    failing = [t.verdict.status.value for t in ticks if t.verdict is not None and not t.verdict.passed]
    unread = sum(not r.ok for r in readings)
    return (
        f"read {len(targets)} sink(s): {changed} with new data, {unread} unreadable, "
        f"{len(failing)} failing freshness"
    )
