"""The sink side of the end-to-end delay: read from the writing flows' latest ``kafka_lag`` evaluations
on a real instance (one query for every flow per tick, plus one per flow whose latest record lacks it), judged against the sink's budget
(``over_delay_budget``), reported again when it moves materially, remembered in a compatible cursor."""

from __future__ import annotations

import time

import dagster as dg
import pytest

from loom_dagster.asset_check_names import KAFKA_LAG
from loom_dagster.core.flows.records import SinkBackend
from loom_dagster.core.sensor_settings import SinkFreshness, SinkHealthSettings
from loom_dagster.core.sinks.freshness import (
    FreshnessStatus,
    FreshnessVerdict,
    Severity,
    SinkEndToEnd,
    with_delay_budget,
)
from loom_dagster.core.sinks.reading import ReadStatus, SinkReading
from loom_dagster.core.sinks.targets import SinkTarget
from loom_dagster.sensors.sinks import LagLookup, SinkState, dump_cursor, load_cursor, sink_tick

TARGET = SinkTarget(
    "delta/chain", SinkBackend.DELTA, "chain", None, "/tmp/chain", ("a", "b"), ("loom/a", "loom/b")
)
BUDGET = SinkFreshness(warn_end_to_end_delay_s=60, max_end_to_end_delay_s=300)
PATH = "orders -> [a 5.0 s] -> enriched -> [b 0.0 s]"


def _verdict(
    status: FreshnessStatus, severity: Severity | None, freshness: SinkFreshness = BUDGET
) -> FreshnessVerdict:
    return FreshnessVerdict(
        "delta/chain", status, severity is None, severity, status.value, 1.0, 0.0, freshness
    )


def _e2e(delay_s: float, complete: bool = True) -> SinkEndToEnd:
    return SinkEndToEnd("loom/b", delay_s, PATH, complete, 1000.0)


def test_budget_warn_and_error_only_where_worse() -> None:
    fresh = _verdict(FreshnessStatus.FRESH, None)
    within = with_delay_budget(fresh, _e2e(59.0))
    assert within.status is FreshnessStatus.FRESH and within.passed and within.end_to_end == _e2e(59.0)
    warn = with_delay_budget(fresh, _e2e(60.0))
    assert (warn.status, warn.severity, warn.passed) == (
        FreshnessStatus.OVER_DELAY_BUDGET,
        Severity.WARN,
        False,
    )
    assert warn.message == f"end-to-end delay 60s (60 s) >= warn_end_to_end_delay_s 60, via {PATH}"
    error = with_delay_budget(fresh, _e2e(400.0, complete=False))
    assert (
        error.severity is Severity.ERROR
        and "delay at least 7m (400 s) >= max_end_to_end_delay_s 300" in error.message
    )
    # an ERROR already there keeps its status; a WARN one gives way to an ERROR budget, and is kept in the message
    silent = with_delay_budget(_verdict(FreshnessStatus.SILENT_WHILE_LAGGING, Severity.ERROR), _e2e(400.0))
    assert silent.status is FreshnessStatus.SILENT_WHILE_LAGGING and silent.end_to_end is not None
    no_data = with_delay_budget(_verdict(FreshnessStatus.NO_DATA, Severity.WARN), _e2e(400.0))
    assert no_data.status is FreshnessStatus.OVER_DELAY_BUDGET and no_data.message.endswith("; also no_data")
    assert (
        with_delay_budget(_verdict(FreshnessStatus.NO_DATA, Severity.WARN), _e2e(70.0)).status
        is FreshnessStatus.NO_DATA
    )
    # no budget, or nothing measured: no verdict of its own
    plain = with_delay_budget(_verdict(FreshnessStatus.FRESH, None, SinkFreshness()), _e2e(10**6))
    assert plain.passed and plain.status is FreshnessStatus.FRESH
    assert with_delay_budget(fresh, None).status is FreshnessStatus.FRESH


def _report(instance: dg.DagsterInstance, flow: str, delay: float | None, path: str = PATH) -> None:
    metadata: dict[str, object] = {"total_lag": 3}
    if delay is not None:
        metadata |= {"loom/end_to_end_delay_s": delay, "loom/end_to_end_path": dg.MetadataValue.text(path),
                     "loom/end_to_end_complete": True}  # fmt: skip
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(
            asset_key=dg.AssetKey.from_user_string(flow), check_name=KAFKA_LAG, passed=True, metadata=metadata
        )
    )


def _one_shot_run(instance: dg.DagsterInstance, flow: str) -> None:
    """A ``kafka_lag`` evaluation from a run, as the one-shot check gives: total lag, no end-to-end delay."""

    @dg.asset_check(asset=dg.AssetKey.from_user_string(flow), name=KAFKA_LAG)
    def one_shot() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=True, metadata={"total_lag": 3})

    job = dg.define_asset_job("one_shot", selection=dg.AssetSelection.checks(one_shot))
    defs = dg.Definitions(asset_checks=[one_shot], jobs=[job])
    assert defs.resolve_job_def("one_shot").execute_in_process(instance=instance).success


def _reading() -> SinkReading:
    return SinkReading(
        "delta/chain",
        SinkBackend.DELTA,
        ReadStatus.OK,
        time.time(),
        marker="1",
        version=1,
        last_modified=time.time(),
    )


def test_sink_takes_the_largest_writer_one_query_per_flow_and_skips_non_kafka_flows() -> None:
    with dg.instance_for_test() as instance:
        _report(instance, "loom/a", 12.0, "orders -> [a 12.0 s]")
        _report(instance, "loom/b", 30.0)
        steady = LagLookup(instance, ["loom/a", "loom/b"])
        assert steady.end_to_end(TARGET).delay_s == 30.0 and steady.queries == 1  # type: ignore[union-attr]
        assert steady.end_to_end(TARGET).delay_s == 30.0 and steady.queries == 1  # type: ignore[union-attr]
        _one_shot_run(instance, "loom/b")  # newer, without the end-to-end delay
        lags = LagLookup(instance, ["loom/a", "loom/b"])
        found = lags.end_to_end(TARGET)
        assert found is not None and (found.flow_key, found.delay_s, found.path, found.complete) == (
            "loom/b",
            30.0,
            PATH,
            True,
        )
        assert lags.latest("loom/b") is not None and lags.end_to_end(TARGET) == found
        assert lags.queries == 2  # all latest records at once, then b's history; cached for the tick
        # the lag sensor's own record without one (end_to_end off): no history read, b has none
        _report(instance, "loom/b", None)
        off = LagLookup(instance, ["loom/a", "loom/b"])
        assert off.end_to_end(TARGET).flow_key == "loom/a" and off.queries == 1  # type: ignore[union-attr]
        only_a = LagLookup(instance, ["loom/a"])
        assert only_a.end_to_end(TARGET).delay_s == 12.0 and only_a.queries == 1  # type: ignore[union-attr]
        assert LagLookup(instance, []).end_to_end(TARGET) is None


def test_the_evaluation_is_reported_again_when_the_delay_moves_materially() -> None:
    settings = SinkHealthSettings(default_freshness=BUDGET)
    with dg.instance_for_test() as instance:
        now = time.time()

        def tick(state: SinkState, delay: float) -> tuple[SinkState, dg.AssetCheckEvaluation | None]:
            _report(instance, "loom/b", delay)
            out = sink_tick(TARGET, _reading(), state, now=now, settings=settings,
                            lags=LagLookup(instance, ["loom/b"]), refresh_s=600.0, end_to_end_step_s=30.0)  # fmt: skip
            return out.state, out.evaluation

        state, first = tick(SinkState(), 10.0)
        assert first is not None and first.metadata["loom/end_to_end_delay_s"].value == 10.0
        assert first.metadata["loom/max_end_to_end_delay_s"].value == 300.0
        state, same = tick(state, 35.0)  # moved 25 s < 30 s: same status, not reported
        assert same is None and state.end_to_end_s == 10.0
        state, moved = tick(state, 41.0)  # 31 s and > 10 %
        assert moved is not None and moved.metadata["loom/end_to_end_delay_s"].value == 41.0
        assert moved.metadata["loom/freshness"].value == "fresh" and state.end_to_end_s == 41.0
        state, over = tick(state, 61.0)  # 20 s only, but the status changed
        assert over is not None and over.metadata["loom/freshness"].value == "over_delay_budget"


def test_cursor_keeps_the_reported_delay_and_reads_older_cursors() -> None:
    state = SinkState(
        reading=_reading(), last_data_at=5.0, check_status="fresh", check_at=6.0, end_to_end_s=12.3456
    )
    cursor = dump_cursor({"delta/chain": state})
    assert '"e":12.346' in cursor
    assert load_cursor(cursor, [TARGET])["delta/chain"].end_to_end_s == 12.346
    older = '{"v":1,"sinks":{"delta/chain":{"ok":true,"m":"1","v":1,"c":"fresh","ct":6.0}}}'
    loaded = load_cursor(older, [TARGET])["delta/chain"]
    assert loaded.end_to_end_s is None and loaded.check_status == "fresh"


@pytest.mark.parametrize(
    "reported,current,moved",
    [(None, None, False), (None, 0.0, True), (5.0, None, True), (400.0, 439.0, False), (400.0, 440.0, True)],
)
def test_material_move(reported: float | None, current: float | None, moved: bool) -> None:
    from loom_dagster.sensors.sinks import end_to_end_moved

    assert end_to_end_moved(reported, current, 30.0) is moved
