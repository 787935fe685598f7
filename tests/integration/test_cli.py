"""The operator CLI against real deployments: status, logs, stop, and its errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from loom_dagster.dev.kafka import KafkaBroker
from tests.support.deploy_env import DeployBench, bench_fixture, runtime_pids_for
from tests.support.helpers import run_cli

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def cli(bench: DeployBench, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script on the bench's state dir."""
    return run_cli(bench.state_dir, *args, timeout_s=60)


def test_status_logs_stop(bench: DeployBench) -> None:
    empty = cli(bench, "status")
    assert empty.returncode == 0 and "no flows deployed" in empty.stdout
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance).success
    (pid,) = bench.alive_pids()

    # The job is frozen before any message exists, so it can neither consume nor commit: the lag is
    # exactly what is produced now, counted from the offsets the deployment started at (no commit yet).
    # Resumed well within the fence's 10 s session.
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        bench.produce(0, 300)
        (frozen,) = json.loads(cli(bench, "status", "--json").stdout)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert time.monotonic() - stopped_at < 9, "frozen too long: the job lost its fence"
    assert frozen["lag"] == "300 (NO_COMMITS)", frozen
    assert frozen["records_in"] == 0, frozen
    bench.wait_for_delta(set(bench.produced))

    rows = json.loads(cli(bench, "status", "--json").stdout)
    (row,) = rows
    assert row["flow"] == "ticks" and row["health"] == "healthy" and row["pids"] == [pid]
    assert row["records_in"] >= 300 and "ticks_delta" in row["last_write"]
    table = cli(bench, "status").stdout
    assert table.splitlines()[0].split()[:3] == ["FLOW", "HEALTH", "PIDS"]
    assert "ticks" in table and "healthy" in table and str(pid) in table

    logs = cli(bench, "logs", "ticks", "-n", "5")
    assert logs.returncode == 0 and logs.stdout.strip()

    stopped = cli(bench, "stop", "ticks")
    assert stopped.returncode == 0 and f"ticks: stopped (pids {pid})" in stopped.stdout
    assert runtime_pids_for(bench.state_dir) == []
    assert "no flows deployed" in cli(bench, "status").stdout
    (row,) = json.loads(cli(bench, "status", "--all", "--json").stdout)
    assert row["health"] == "stopped" and "loom-dagster CLI" in row["detail"]


def test_errors_are_clear(bench: DeployBench) -> None:
    unknown = cli(bench, "logs", "nope")
    assert unknown.returncode == 2
    assert f"no deployment of flow 'nope' in state directory {bench.state_dir}" in unknown.stderr
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance).success
    (pid,) = bench.alive_pids()
    os.kill(pid, signal.SIGKILL)
    (row,) = json.loads(cli(bench, "status", "--json", "--no-lag").stdout)
    assert row["health"] == "dead" and row["detail"].startswith("stale record: no process is running")

    record_path = bench.state_dir / "flows" / "ticks" / "deployment.json"
    record = json.loads(record_path.read_text())
    record["job"]["host"] = "elsewhere"
    record_path.write_text(json.dumps(record))
    (row,) = json.loads(cli(bench, "status", "--json").stdout)
    assert row["health"] == "other-host" and "run this command there" in row["detail"]
    other = cli(bench, "logs", "ticks")
    assert other.returncode == 2 and "runs on host 'elsewhere'" in other.stderr
