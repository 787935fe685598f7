"""The job health sensor against real deployed jobs: restart after SIGKILL (nothing lost), backoff, the
restart cap, and no restart after an undeploy. Ticks are evaluated through a real Dagster instance; the
run a tick requests is executed the way the daemon would (a materialization of the requested asset)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from loom_dagster import build_loom_asset_graph
from loom_dagster.core import procfs
from loom_dagster.core.deploy.restart_policy import (
    RestartState,
    record_restart,
    reset_backoff_when_stable,
)
from loom_dagster.core.sensor_settings import JobHealthSettings
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.sensors.health import build_job_health_sensor
from tests.support.deploy_env import DeployBench, bench_fixture, runtime_pids_for

FLOW_KEY = dg.AssetKey(["loom", "ticks"])


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def _tick(bench: DeployBench, instance: dg.DagsterInstance, settings: JobHealthSettings, cursor: str | None):
    graph = build_loom_asset_graph([bench.spec()])
    sensor = build_job_health_sensor(graph, settings)
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"loom": bench.resource()})
    result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    checks = [e for e in result.asset_events or [] if isinstance(e, dg.AssetCheckEvaluation)]
    observations = [e for e in result.asset_events or [] if isinstance(e, dg.AssetObservation)]
    return result, checks, observations


def _kill_job(bench: DeployBench) -> int:
    (pid,) = bench.alive_pids()
    os.kill(pid, signal.SIGKILL)
    while procfs.is_alive(pid):
        time.sleep(0.05)
    return pid


@pytest.mark.kafka
@pytest.mark.slow
def test_sigkilled_job_is_restarted_and_catches_up(bench: DeployBench) -> None:
    settings = JobHealthSettings(backoff_initial_s=30)
    bench.produce(0, 500)
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance).success
        result, checks, observations = _tick(bench, instance, settings, None)
        assert not result.run_requests
        assert checks[0].passed and checks[0].check_name == "job_running"
        md = observations[0].metadata
        assert md["loom/state"].value == "healthy" and md["loom/uptime_s"].value >= 0
        bench.wait_for_delta(set(bench.produced))

        _kill_job(bench)
        bench.produce(500, 500)  # written while the job is down
        result, checks, _ = _tick(bench, instance, settings, result.cursor)
        assert not checks[0].passed and checks[0].severity == dg.AssetCheckSeverity.ERROR
        assert "dead" in (checks[0].description or "")
        assert "died without a final status (killed by a signal" in (checks[0].description or "")
        (request,) = result.run_requests or []
        assert request.asset_selection == [FLOW_KEY]
        assert request.tags["loom/restart"] == "true"

        # What the daemon does with the request: materialize the flow asset (= redeploy).
        assert bench.materialize(instance).success
        result, checks, _ = _tick(bench, instance, settings, result.cursor)
        assert checks[0].passed and not result.run_requests
    ids = bench.wait_for_delta(set(bench.produced))
    assert set(bench.produced) <= set(ids)
    assert bench.store.current("ticks").restarts == 0  # a re-materialization is a fresh deployment


@pytest.mark.kafka
@pytest.mark.slow
def test_backoff_and_cap_with_a_real_dead_job(bench: DeployBench) -> None:
    settings = JobHealthSettings(backoff_initial_s=1.0, max_restarts=2, restart_window_s=600)
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance).success
        _kill_job(bench)
        first, _, _ = _tick(bench, instance, settings, None)
        assert len(first.run_requests or []) == 1
        second, checks, _ = _tick(bench, instance, settings, first.cursor)
        assert not second.run_requests and "backing off" in (checks[0].description or "")
        time.sleep(1.2)
        third, _, _ = _tick(bench, instance, settings, second.cursor)
        assert len(third.run_requests or []) == 1
        time.sleep(2.2)
        fourth, checks, _ = _tick(bench, instance, settings, third.cursor)
        assert not fourth.run_requests
        assert "restart cap reached: 2 restarts" in (checks[0].description or "")
        assert checks[0].severity == dg.AssetCheckSeverity.ERROR


@pytest.mark.kafka
@pytest.mark.slow
def test_no_restart_after_undeploy(bench: DeployBench) -> None:
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance).success
        bench.resource().deployer().undeploy("ticks", by="test")
        assert runtime_pids_for(bench.state_dir) == []
        result, checks, _ = _tick(bench, instance, JobHealthSettings(), None)
        assert not result.run_requests
        assert not checks[0].passed and checks[0].severity == dg.AssetCheckSeverity.WARN
        assert "stopped on purpose by test" in (checks[0].description or "")


def test_backoff_resets_only_after_a_stable_period() -> None:
    settings = JobHealthSettings(backoff_initial_s=10, backoff_max_s=1000, backoff_reset_after_s=600)
    state = RestartState()
    record_restart(state, settings, now=0)
    record_restart(state, settings, now=10)
    assert state.consecutive == 2
    assert not reset_backoff_when_stable(state, settings, now=100, job_started_at=50)  # healthy 50 s
    assert state.consecutive == 2
    assert reset_backoff_when_stable(state, settings, now=700, job_started_at=50)  # healthy 650 s
    assert state.consecutive == 0


@pytest.mark.kafka
@pytest.mark.slow
def test_backoff_grows_across_short_lived_restarts(bench: DeployBench) -> None:
    """A job that dies shortly after each (healthy) restart keeps backing off: 1 s, 2 s, 4 s ..."""
    import json

    settings = JobHealthSettings(backoff_initial_s=1.0, max_restarts=10, restart_window_s=600)
    delays = []
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance).success
        cursor = None
        for _ in range(3):
            _kill_job(bench)
            while True:  # tick until the backoff lets a restart through
                result, checks, _ = _tick(bench, instance, settings, cursor)
                cursor = result.cursor
                if result.run_requests:
                    break
                assert "backing off" in (checks[0].description or ""), checks[0].description
                time.sleep(0.3)
            state = json.loads(cursor or "{}")["ticks"]
            delays.append(round(state["next_restart_at"] - state["restarts"][-1], 3))
            assert bench.materialize(instance).success  # what the daemon does with the request
            result, checks, _ = _tick(bench, instance, settings, cursor)  # healthy again, briefly
            cursor = result.cursor
            assert checks[0].passed
    assert delays == [1.0, 2.0, 4.0]
