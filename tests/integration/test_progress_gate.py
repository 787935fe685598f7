"""Deploys judged by data progress, on the real broker: the progress gate (``gate: progress``) and the
job health sensor's regression watch (``regression_watch_ticks``).

The version that "moves nothing" is ``tests.flows.progress:ticks_flow`` with ``LOOM_TEST_BLOCK_AFTER=0``:
its step blocks on the first tick, so the job stays alive and healthy (heartbeats from a thread, first
poll done) while it commits nothing and writes no row. A step that raises on every tick without a DLQ
route is NOT such a version: loom completes unrouted error envelopes at a drop sink, so the group
commits (``test_unrouted_errors_count_as_progress_by_commits``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest

from loom_dagster import LoomFlowSpec
from loom_dagster.assets import build_loom_asset_graph
from loom_dagster.core.deploy.restart_policy import load_cursor
from loom_dagster.core.sensor_settings import JobHealthSettings
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.sensors.health import build_job_health_sensor
from tests.support.deploy_env import DeployBench, bench_fixture, runtime_pids_for
from tests.support.helpers import materialization_metadata as _metadata
from tests.support.helpers import step_failure_message as _failure_message

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

BLOCKS = "tests.flows.progress:ticks_flow"
UNROUTED = "tests.flows.progress:unrouted_flow"


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def _spec(bench: DeployBench, import_path: str, **env: str) -> LoomFlowSpec:
    return LoomFlowSpec(import_path, config=bench.config, environment="test", env=env)


@contextmanager
def producing(
    bench: DeployBench, start: int = 100_000, batch: int = 20, every_s: float = 0.25
) -> Iterator[None]:
    """Keep producing ticks in the background (about 80 messages/s)."""
    stop = threading.Event()

    def run() -> None:
        n = start
        while not stop.is_set():
            bench.produce(n, batch)
            n += batch
            stop.wait(every_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def _deploy_good(bench: DeployBench, instance: dg.DagsterInstance) -> tuple[str, int]:
    """Deploy the working ticks flow on 200 ticks; its plan hash and pid once the ticks are in Delta."""
    bench.produce(0, 200)
    good = bench.materialize(instance, LOOM_TEST_VERSION="v1")
    assert good.success, _failure_message(good)
    bench.wait_for_delta(set(bench.produced), timeout_s=180)
    md = _metadata(good)
    return str(md["loom/plan_hash"]), int(md["loom/pid"])


def test_progress_gate_rolls_back_a_version_that_moves_no_data(bench: DeployBench) -> None:
    """(a) A new version that is healthy but commits nothing and writes no row while messages wait is
    stopped after the window; the previous deployment runs again and the run fails naming the signals."""
    with dg.instance_for_test() as instance:
        good_plan, good_pid = _deploy_good(bench, instance)
        with producing(bench):
            time.sleep(1.0)
            started = time.monotonic()
            bad = bench.materialize(
                instance,
                bench.resource(gate="progress", progress_window_s=15),
                spec=_spec(bench, BLOCKS, LOOM_TEST_BLOCK_AFTER="0"),
            )
            elapsed = time.monotonic() - started
            message = _failure_message(bad)
            assert "failed its progress gate and was stopped" in message, message
            assert f"no commit past the start offsets on {bench.prefix}.ticks[" in message, message
            assert "and no sink rows in 15 s while" in message and "messages were waiting" in message, message
            assert f"The previous deployment (plan {good_plan}) runs again" in message, message
            current = bench.store.current("ticks")
            assert current is not None and current.plan_hash == good_plan
            pids = bench.alive_pids()
            assert len(pids) == 1 and pids == runtime_pids_for(bench.state_dir)
            assert pids != [good_pid]  # relaunched by the rollback
            print(f"\n[progress gate] failed deploy + rollback in {elapsed:.1f} s: {message.splitlines()[0]}")
        # the restored version consumes everything, including what waited during the bad version
        ids = bench.wait_for_delta(set(bench.produced), timeout_s=180)
        assert set(bench.produced) <= set(ids)


def test_progress_gate_keeps_a_version_that_works(bench: DeployBench) -> None:
    """(b) A working new version passes at its first commit or row; with nothing waiting, the gate passes
    at once and says so. The records keep the verdict and the previous version's progress."""
    with dg.instance_for_test() as instance:
        good_plan, _ = _deploy_good(bench, instance)
        resource = bench.resource(gate="progress", progress_window_s=60)
        with producing(bench):
            time.sleep(1.0)
            second = bench.materialize(instance, resource, LOOM_TEST_VERSION="v2")
            assert second.success, _failure_message(second)
        md = _metadata(second)
        assert str(md["loom/progress"]).startswith("data moved"), md["loom/progress"]
        record = bench.store.current("ticks")
        assert record is not None
        gate = record.extra["progress_gate"]
        assert gate["passed"] and gate["signal"] in ("commits", "sink_rows")
        previous = record.extra["previous_progress"]
        assert previous["plan_hash"] == good_plan and previous["moving"] is True
        print(
            f"\n[progress gate] passed in {gate['seconds']:.1f} s by {gate['signal']}: {gate['message']}; "
            f"previous: {previous['detail']}"
        )
        ids = bench.wait_for_delta(set(bench.produced), timeout_s=180)
        assert set(bench.produced) <= set(ids)

        time.sleep(3.0)  # idle: everything consumed and committed
        third = bench.materialize(instance, resource, LOOM_TEST_VERSION="v3")
        assert third.success, _failure_message(third)
        assert "no input to consume" in str(_metadata(third)["loom/progress"])
        assert bench.store.current("ticks").extra["progress_gate"]["signal"] == "no_input"  # type: ignore[union-attr]


def test_unrouted_errors_count_as_progress_by_commits(bench: DeployBench) -> None:
    """A step that raises on every tick with no DLQ route writes no row, but loom completes the dropped
    error envelopes, so the group commits: the gate sees data move (by commits), even on a first deploy."""
    bench.produce(0, 200)
    with dg.instance_for_test() as instance:
        result = bench.materialize(
            instance, bench.resource(gate="progress", progress_window_s=60), spec=_spec(bench, UNROUTED)
        )
    assert result.success, _failure_message(result)
    gate = bench.store.current("ticks").extra["progress_gate"]  # type: ignore[union-attr]
    assert gate["signal"] == "commits" and gate["rows"] == 0, gate
    print(f"\n[progress gate] unrouted errors: {gate['message']}")


def _tick(
    sensor: dg.SensorDefinition, bench: DeployBench, instance: dg.DagsterInstance, cursor: str | None
) -> tuple[str | None, list[dg.AssetMaterialization]]:
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"loom": bench.resource()})
    result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    mats = [e for e in result.asset_events or [] if isinstance(e, dg.AssetMaterialization)]
    return result.cursor, mats


def test_regression_watch_rolls_back_once(bench: DeployBench) -> None:
    """(c) A version that passes the progress gate, then stalls (its step blocks after 300 ticks) while
    the previous version was moving data, is rolled back once by the job health sensor's watch: one
    materialization with ``loom/rolled_back_from``, and later ticks leave the restored version alone."""
    with dg.instance_for_test() as instance:
        good_plan, _ = _deploy_good(bench, instance)
        graph = build_loom_asset_graph([bench.spec()])
        sensor = build_job_health_sensor(graph, JobHealthSettings(regression_watch_ticks=15))
        with producing(bench):
            time.sleep(1.0)
            stalling = bench.materialize(
                instance,
                bench.resource(gate="progress", progress_window_s=60),
                spec=_spec(bench, BLOCKS, LOOM_TEST_BLOCK_AFTER="300", LOOM_TEST_VERSION="v2"),
            )
            assert stalling.success, _failure_message(stalling)
            bad = bench.store.current("ticks")
            assert bad is not None and bad.plan_hash != good_plan
            assert bad.extra["previous_progress"]["moving"] is True

            cursor: str | None = None
            rollbacks: list[dg.AssetMaterialization] = []
            started = time.monotonic()
            ticks_after = 0
            ticks = 0
            durations = []
            for _ in range(30):
                tick_started = time.monotonic()
                cursor, mats = _tick(sensor, bench, instance, cursor)
                durations.append(time.monotonic() - tick_started)
                ticks += 1
                rollbacks += mats
                if rollbacks:
                    ticks_after += 1
                    if ticks_after > 4:  # the rollback tick and four more
                        break
                time.sleep(3.0)
            detected_s = time.monotonic() - started
        assert len(rollbacks) == 1, rollbacks
        (mat,) = rollbacks
        assert mat.asset_key == dg.AssetKey(["loom", "ticks"])
        assert mat.metadata["loom/rolled_back_from"].value == bad.plan_hash
        reason = str(mat.metadata["loom/rollback_reason"].value)
        assert "stalled where the previous version was moving data" in reason
        assert mat.metadata["loom/plan_hash"].value == good_plan

        restored = bench.store.current("ticks")
        assert restored is not None and restored.plan_hash == good_plan
        assert restored.extra["rolled_back_from"]["plan_hash"] == bad.plan_hash
        assert sum(1 for r in bench.store.history("ticks") if r.extra.get("rolled_back_from")) == 1
        state = load_cursor(cursor)["ticks"].watch
        assert str(state["done"]).startswith("not watched: restored by a rollback"), state
        pids = bench.alive_pids()
        assert len(pids) == 1 and pids == runtime_pids_for(bench.state_dir)
        print(
            f"\n[regression watch] rolled back at tick {ticks - 4} ({detected_s:.1f} s in all; sensor ticks "
            f"{min(durations):.2f}-{max(durations):.2f} s, the rollback tick {durations[ticks - 5]:.2f} s): {reason}"
        )

        # further ticks do not roll back again
        for _ in range(3):
            cursor, mats = _tick(sensor, bench, instance, cursor)
            assert not mats
        assert bench.store.current("ticks").plan_hash == good_plan  # type: ignore[union-attr]
    ids = bench.wait_for_delta(set(bench.produced), timeout_s=180)
    assert set(bench.produced) <= set(ids)
