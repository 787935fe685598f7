"""A deployment runs exactly what was deployed: its config files are copied at deploy time, and every
later launch of it (a restart by the health sensor, a rollback) reads the copy, never the live file."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from loom_dagster import build_loom_asset_graph
from loom_dagster.asset_check_names import RESTART_TAG
from loom_dagster.core import procfs
from loom_dagster.core.deploy.store import DeploymentStore
from loom_dagster.core.sensor_settings import JobHealthSettings
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.sensors.health import build_job_health_sensor
from tests.support.deploy_env import DeployBench, bench_fixture

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def _failure(result: dg.ExecuteInProcessResult) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return failures[0].step_failure_data.error.message if failures else ""  # type: ignore[union-attr]


def test_in_place_config_edit_breaking_the_broker(bench: DeployBench) -> None:
    bench.produce(0, 300)
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance).success
        bench.wait_for_delta(set(bench.produced))
        (pid,) = bench.alive_pids()
        snapshot = bench.store.current("ticks").job.request.config_files  # type: ignore[union-attr]
        assert all("/snapshots/" in f for f in snapshot)

        live = bench.config / "base.yaml"
        live.write_text(live.read_text().replace(bench.bootstrap, "127.0.0.1:9"))

        # A redeploy picks up the edit, and refuses it before draining anything.
        refused = bench.materialize(instance, bench.resource(connect_timeout_s=3))
        assert not refused.success and "127.0.0.1:9" in _failure(refused)
        assert bench.alive_pids() == [pid]

        # The job dies; the health sensor's restart brings back the deployed version, with its own config.
        os.kill(pid, signal.SIGKILL)
        while procfs.is_alive(pid):
            time.sleep(0.05)
        bench.produce(300, 300)
        graph = build_loom_asset_graph([bench.spec()])
        sensor = build_job_health_sensor(graph, JobHealthSettings())
        tick = sensor(
            dg.build_sensor_context(instance=instance, cursor=None, resources={"loom": bench.resource()})
        )
        assert isinstance(tick, dg.SensorResult)
        (request,) = tick.run_requests or []
        assert request.tags[RESTART_TAG] == "true"
        defs = bench.defs()
        restarted = dg.materialize(
            list(defs.assets or []),  # type: ignore[arg-type]
            selection=[dg.AssetKey(["loom", "ticks"])],
            resources={"loom": bench.resource()},
            instance=instance,
            tags=request.tags,
            raise_on_error=False,
        )
        assert restarted.success, _failure(restarted)
        current = bench.store.current("ticks")
        assert current is not None and current.restarts == 1
        assert current.job.request.config_files == snapshot
        assert bench.bootstrap in Path(snapshot[0]).read_text()
        assert "127.0.0.1:9" in live.read_text()
        ids = bench.wait_for_delta(set(bench.produced))
    lost = set(bench.produced) - set(ids)
    duplicated = {i for i in bench.produced if ids[i] > 1}
    assert not lost and not duplicated, (len(lost), len(duplicated))


def test_snapshots_are_private_and_durable_whatever_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copies may hold secrets as the originals do: every directory on the way 0700 (the state dir,
    flows/, the flow's, snapshots/, the snapshot's), every copy 0600 and fsynced before it is used."""
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    before = os.umask(0o022)
    try:
        store = DeploymentStore(tmp_path / "state")
        (copy,) = store.snapshot_config("ticks", [("00-base.yaml", b"password: hunter2\n")], "abc")
    finally:
        os.umask(before)
    path = Path(copy)
    assert path.read_bytes() == b"password: hunter2\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (path.parent, *path.parent.parents):
        if directory == tmp_path:
            break
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert any(p.startswith(f"{path.parent}/.00-base.yaml.") for p in synced) and str(path.parent) in synced
