"""A hung job (its process alive, its heartbeat stale) restarted end to end by the job health sensor: the
real sensor, evaluated tick after tick against a real Dagster instance, fails ``job_running`` with
"hung" once the heartbeat is older than the resource's ``heartbeat_timeout_s``, requests a restart run;
that run (materialized with the request's tags) stops the frozen job (SIGTERM cannot reach a stopped
process: SIGKILL after ``drain_timeout_s``) and launches the recorded deployment again."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from loom_dagster import build_loom_asset_graph
from loom_dagster.asset_check_names import JOB_RUNNING, RESTART_TAG
from loom_dagster.core import procfs
from loom_dagster.core.sensor_settings import JobHealthSettings
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.sensors.health import build_job_health_sensor
from tests.support.deploy_env import DeployBench, bench_fixture, runtime_pids_for
from tests.support.helpers import step_failure_message, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
HEARTBEAT_TIMEOUT_S = 6.0
DRAIN_TIMEOUT_S = 4.0


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def tick(
    sensor: dg.SensorDefinition, instance: dg.DagsterInstance, bench: DeployBench, cursor: str | None
) -> tuple[dg.SensorResult, dg.AssetCheckEvaluation]:
    """One evaluation of the health sensor; its result and the ticks flow's ``job_running``."""
    resource = bench.resource(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, drain_timeout_s=DRAIN_TIMEOUT_S)
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"loom": resource})
    result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    (check,) = [
        e
        for e in result.asset_events or []
        if isinstance(e, dg.AssetCheckEvaluation) and e.check_name == JOB_RUNNING
    ]
    return result, check


def test_hung_job_is_restarted_by_the_health_sensor(bench: DeployBench) -> None:
    resource = bench.resource(heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, drain_timeout_s=DRAIN_TIMEOUT_S)
    sensor = build_job_health_sensor(build_loom_asset_graph([bench.spec()]), JobHealthSettings())
    bench.produce(0, 300)
    pid = 0
    with dg.instance_for_test() as instance:
        deployed = bench.materialize(instance, resource)
        assert deployed.success, step_failure_message(deployed)
        bench.wait_for_delta(set(bench.produced))
        (pid,) = bench.alive_pids()
        result, check = tick(sensor, instance, bench, None)
        assert check.passed and not result.run_requests, check.description
        cursor = result.cursor

        os.kill(pid, signal.SIGSTOP)  # alive in /proc, but no heartbeat any more
        frozen_at = time.monotonic()
        try:
            hung: list[tuple[dg.SensorResult, dg.AssetCheckEvaluation]] = []

            def restart_requested() -> bool:
                nonlocal cursor
                result, check = tick(sensor, instance, bench, cursor)
                cursor = result.cursor
                if result.run_requests:
                    hung.append((result, check))
                    return True
                assert check.passed, f"failed before the heartbeat timeout: {check.description}"
                return False

            wait_for(restart_requested, 60, "a restart request for the hung job", interval_s=1.0)
            detected_after = time.monotonic() - frozen_at
            ((result, check),) = hung
            assert procfs.is_alive(pid), "the hung job is alive: only its heartbeat stopped"
            assert not check.passed and check.severity is dg.AssetCheckSeverity.ERROR
            description = check.description or ""
            assert description.startswith(f"hung: process 0 (pid {pid}) has not written a heartbeat for"), (
                description
            )
            assert "restart requested (#1 in window)" in description, description
            assert detected_after >= HEARTBEAT_TIMEOUT_S - 1, detected_after
            (request,) = result.run_requests or []
            assert request.tags[RESTART_TAG] == "true" and request.tags["loom/flow"] == "ticks"
            assert request.tags["loom/restart_reason"].startswith("hung: ")

            restarted = dg.materialize(
                list(bench.defs().assets or []),  # type: ignore[arg-type]
                selection=request.asset_selection,
                resources={"loom": resource},
                instance=instance,
                tags=request.tags,
                raise_on_error=False,
            )
            assert restarted.success, step_failure_message(restarted)
        finally:
            if procfs.is_alive(pid):
                os.kill(pid, signal.SIGCONT)
        assert not procfs.is_alive(pid), "the frozen job must have been stopped (SIGKILL after the drain)"
        current = bench.store.current("ticks")
        assert current is not None and current.restarts == 1 and not current.stopped_on_purpose
        (new_pid,) = bench.alive_pids()
        assert new_pid != pid and runtime_pids_for(bench.state_dir) == [new_pid]
        result, check = tick(sensor, instance, bench, cursor)
        assert check.passed and not result.run_requests, check.description
        print(f"\n[hung] restart requested {detected_after:.1f}s after SIGSTOP; new pid {new_pid}")

    bench.produce(300, 300)
    ids = bench.wait_for_delta(set(bench.produced))
    assert not set(bench.produced) - set(ids)
