"""One job per consumer group, on a real broker: the consumer-group fence (job side and deploy side)
and orphan jobs (a job running with no deployment record here) in the health sensor and the CLI.

Figures measured here are printed (run with ``-s``): SIGKILL -> takeover, and a redeploy's fence wait.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from loom_dagster import DeploymentStore, LoomDeployResource, build_loom_asset_graph
from loom_dagster.asset_check_names import JOB_RUNNING
from loom_dagster.core import procfs
from loom_dagster.core.checks.fence import (
    DEFAULT_SESSION_TIMEOUT_S,
    FenceHeld,
    FenceIdentity,
    check_fence,
    describe_fences,
    fence_group,
    fence_target,
)
from loom_dagster.core.deploy.orphans import FenceTarget, find_orphans
from loom_dagster.core.flows.catalog import compile_spec
from loom_dagster.core.job.status import EXIT_FENCED, read_status
from loom_dagster.core.sensor_settings import JobHealthSettings
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.sensors.health import build_job_health_sensor
from tests.support.deploy_env import DeployBench, bench_fixture, runtime_argv, runtime_pids_for
from tests.support.helpers import run_cli
from tests.support.helpers import step_failure_message as failure_message

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
HOST = socket.gethostname()
_TOOK = re.compile(r"holding the fence .* \(took ([0-9.]+)s\)")


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed console script on *state_dir*."""
    return run_cli(state_dir, *args)


def fence_members(bench: DeployBench) -> list[tuple[int | None, bool]]:
    """(pid, holds) of every member of the ticks flow's fence group."""
    compiled = compile_spec(bench.spec(), "test")
    target = fence_target(compiled)
    assert target is not None
    cluster, group = target
    members = describe_fences(cluster, [fence_group(group)], 10)[fence_group(group)]
    return [(m.identity.pid if m.identity else None, m.holds) for m in members]


def job_running(bench: DeployBench, instance: dg.DagsterInstance, state_dir: Path) -> dg.AssetCheckEvaluation:
    """One tick of the health sensor on *state_dir*; its ``job_running`` evaluation of the ticks flow."""
    graph = build_loom_asset_graph([bench.spec()])
    sensor = build_job_health_sensor(graph, JobHealthSettings(interval_s=5))
    resource = LoomDeployResource(state_dir=str(state_dir), health_timeout_s=60.0)
    result = sensor(dg.build_sensor_context(instance=instance, resources={"loom": resource}))
    assert isinstance(result, dg.SensorResult)
    (check,) = [
        e
        for e in result.asset_events or []
        if isinstance(e, dg.AssetCheckEvaluation) and e.check_name == JOB_RUNNING
    ]
    assert not result.run_requests, "an orphan must not trigger a restart"
    return check


def start_runtime(bench: DeployBench, directory: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``python -m loom_dagster.runtime`` by hand with the bench's config (its own session)."""
    directory.mkdir(parents=True, exist_ok=True)
    status = directory / f"{name}.json"
    argv = runtime_argv(bench.config, status, "--flow-name", "ticks", "--run-id", name)
    log = open(directory / f"{name}.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, status


def fence_seconds(log_path: Path) -> float:
    """How long the job waited for its fence, from its log line."""
    found = _TOOK.findall(log_path.read_text(errors="replace"))
    assert found, f"no fence line in {log_path}"
    return float(found[-1])


def no_duplicates(ids: Counter[str]) -> None:
    twice = {i: n for i, n in ids.items() if n > 1}
    assert not twice, f"{len(twice)} id(s) written more than once, e.g. {sorted(twice.items())[:5]}"


def test_client_id_names_the_job() -> None:
    identity = FenceIdentity("orders;v=2", "host-1.example", 4242, 123456, "run/9")
    client_id = identity.client_id()
    assert client_id.startswith("loom-fence;") and FenceIdentity.parse(client_id) == identity
    assert FenceIdentity.parse("rdkafka") is None and FenceIdentity.parse("loom-fence;flow=x") is None
    assert identity.describe() == "pid 4242 on host host-1.example (flow 'orders;v=2', run run/9)"


def test_wiped_state_dir_orphan_is_reported_refused_and_stopped(bench: DeployBench) -> None:
    """The state dir vanishes under a running job: sensor + CLI name it, a redeploy is refused, no
    duplicates after more messages, and ``loom-dagster stop`` stops it without a record."""
    bench.produce(0, 300)
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance).success
        bench.wait_for_delta(set(bench.produced))
        (orphan,) = bench.alive_pids()
        shutil.rmtree(bench.state_dir)

        check = job_running(bench, instance, bench.state_dir)
        assert not check.passed and check.severity is dg.AssetCheckSeverity.ERROR
        text = check.description or ""
        assert f"orphan job: pid {orphan} on host {HOST} consumes group '{bench.prefix}-ticks'" in text, text
        assert "no deployment record here" in text and "loom-dagster stop ticks" in text, text

        status = cli(bench.state_dir, "status", "--json")
        assert status.returncode == 0, status.stderr
        (row,) = [r for r in json.loads(status.stdout) if r["flow"] == "ticks" and r["pids"] == [orphan]]
        assert row["health"] == "orphan" and row["host"] == HOST
        assert row["found_by"] == "process"  # no record left to name the group: the process table finds it
        table = cli(bench.state_dir, "status").stdout
        assert f"orphan job: pid {orphan} on host {HOST}" in table, table

        with pytest.raises(FenceHeld) as held:
            check_fence(compile_spec(bench.spec(), "test"), None, timeout_s=10)
        assert f"pid {orphan} on host {HOST}" in str(held.value) and f"kill {orphan}" in str(held.value)

        refused = bench.materialize(instance)
        message = failure_message(refused)
        assert f"pid {orphan} on host {HOST}" in message, message
        assert runtime_pids_for(bench.state_dir) == [orphan]

    bench.produce(300, 300)
    no_duplicates(bench.wait_for_delta(set(bench.produced)))
    assert bench.output_messages() == len(bench.delta_ids())

    stopped = cli(bench.state_dir, "stop", "ticks")
    assert stopped.returncode == 0, stopped.stderr
    assert f"ticks: stopped orphan job pid {orphan}" in stopped.stdout
    assert not procfs.is_alive(orphan)
    assert fence_members(bench) == []  # its drain released the fence
    missing = cli(bench.state_dir, "stop", "ticks")
    assert missing.returncode == 2 and "no deployment of flow 'ticks'" in missing.stderr


def test_two_state_dirs_run_one_job(bench: DeployBench, tmp_path: Path) -> None:
    """A second state dir deploying the same flow is refused; a second runtime started by hand (as
    if both raced past the pre-launch check) exits 5 before consuming anything."""
    other = tmp_path / "other-state"
    bench.produce(0, 200)
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance).success
        (holder,) = bench.alive_pids()
        with pytest.raises(FenceHeld):
            check_fence(compile_spec(bench.spec(), "test"), None, timeout_s=10)
        refused = bench.materialize(instance, LoomDeployResource(state_dir=str(other), health_timeout_s=60.0))
        assert f"pid {holder} on host {HOST}" in failure_message(refused)
        assert runtime_pids_for(other) == []
        check = job_running(bench, instance, other)
        assert not check.passed and f"orphan job: pid {holder} on host {HOST}" in (check.description or "")
        assert job_running(bench, instance, bench.state_dir).passed  # the owner sees its own job
    rows = [r for r in json.loads(cli(bench.state_dir, "status", "--json").stdout) if r["flow"] == "ticks"]
    assert [(r["health"], r["pids"]) for r in rows] == [("healthy", [holder])]

    started = time.monotonic()
    proc, status_path = start_runtime(bench, tmp_path / "by-hand", "second")
    assert proc.wait(60) == EXIT_FENCED
    elapsed = time.monotonic() - started
    status = read_status(status_path)
    assert status is not None and status.exit_code == EXIT_FENCED and status.state == "failed"
    assert status.connected_at is None and status.records_in == 0
    assert f"already consumed by pid {holder} on host {HOST}" in (status.error or ""), status.error
    print(f"\nsecond runtime refused (exit 5) {elapsed:.2f}s after spawn")
    assert [pid for pid, holds in fence_members(bench) if holds] == [holder]
    bench.produce(200, 200)
    no_duplicates(bench.wait_for_delta(set(bench.produced)))


def test_sigkilled_holder_is_replaced_after_the_session_timeout(bench: DeployBench) -> None:
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance).success
        (pid,) = bench.alive_pids()
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while procfs.is_alive(pid):
            time.sleep(0.02)
        assert (pid, True) in fence_members(bench)  # a dead holder keeps it until its session expires
        check_fence(compile_spec(bench.spec(), "test"), bench.store.current("ticks"), timeout_s=10)
        assert bench.materialize(instance).success
        takeover = time.monotonic() - killed
    current = bench.store.current("ticks")
    assert current is not None
    waited = fence_seconds(Path(current.job.log_path))
    print(f"\nSIGKILL -> new job connected: {takeover:.1f}s; its fence wait {waited:.1f}s")
    assert DEFAULT_SESSION_TIMEOUT_S - 4 < takeover < DEFAULT_SESSION_TIMEOUT_S + 20, takeover
    assert waited > 2.0, waited
    bench.produce(0, 200)
    no_duplicates(bench.wait_for_delta(set(bench.produced)))


def test_clean_stop_releases_the_fence_at_once(bench: DeployBench) -> None:
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance).success
        (first,) = bench.alive_pids()
        assert fence_members(bench) == [(first, True)]
        assert bench.materialize(instance, LOOM_TEST_VERSION="v2").success  # redeploy: drain first
        (second,) = bench.alive_pids()
        assert second != first and fence_members(bench) == [(second, True)]
        current = bench.store.current("ticks")
        assert current is not None
        waited = fence_seconds(Path(current.job.log_path))
        print(f"\nredeploy: the new job waited {waited:.2f}s for the fence")
        assert waited < 2.0, waited
        stopped = cli(bench.state_dir, "stop", "ticks")
        assert stopped.returncode == 0 and f"ticks: stopped (pids {second})" in stopped.stdout
        assert fence_members(bench) == [] and runtime_pids_for(bench.state_dir) == []
        target = fence_target(compile_spec(bench.spec(), "test"))
        assert target is not None
        fence = FenceTarget("ticks", target[1], target[0])
        assert find_orphans(DeploymentStore(bench.state_dir), flows=["ticks"], targets=[fence]).orphans == ()
