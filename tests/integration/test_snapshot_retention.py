"""The README's "Where things live": ``flows/<flow>/snapshots/<time>-<hash>/`` holds the config files a
deployment runs, private (directory 0700, files 0600), and only the last 10 snapshots are kept, plus any
that a recorded deployment (the current one, or one of the last 10 in the history) still runs.

Real deploys on a real broker make the recorded snapshots; the store's own ``snapshot_config`` (what
every deploy calls) adds the newer ones that push the old ones out."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from loom_dagster.core.deploy.store import read_config_files
from loom_dagster.dev.kafka import KafkaBroker
from tests.support.deploy_env import DeployBench, bench_fixture
from tests.support.helpers import step_failure_message

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
KEPT = 10


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def snapshots_dir(bench: DeployBench) -> Path:
    return bench.state_dir / "flows" / "ticks" / "snapshots"


def snapshot_dirs(bench: DeployBench) -> list[Path]:
    return sorted(d for d in snapshots_dir(bench).iterdir() if d.is_dir())


def recorded_snapshot(bench: DeployBench) -> Path:
    """The snapshot directory the current deployment runs."""
    current = bench.store.current("ticks")
    assert current is not None
    (directory,) = {Path(f).parent for f in current.job.request.config_files}
    return directory


def modes(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_private(directory: Path) -> None:
    assert modes(directory) == 0o700, f"{directory}: {modes(directory):04o}"
    files = list(directory.iterdir())
    assert files, directory
    for file in files:
        assert modes(file) == 0o600, f"{file}: {modes(file):04o}"


def test_snapshots_are_private_and_the_last_ten_plus_the_recorded_ones_are_kept(bench: DeployBench) -> None:
    with dg.instance_for_test() as instance:
        first = bench.materialize(instance, LOOM_TEST_VERSION="v1")
        assert first.success, step_failure_message(first)
        recorded = recorded_snapshot(bench)
        current = bench.store.current("ticks")
        assert current is not None
        # flows/<flow>/snapshots/<time>-<hash>/: the label is the config hash the deployment checked
        assert recorded.parent == snapshots_dir(bench)
        assert recorded.name.endswith("-" + current.config_hash[:12]), recorded.name
        assert modes(snapshots_dir(bench)) == 0o700
        assert_private(recorded)
        assert [Path(f).name for f in current.job.request.config_files] == ["00-base.yaml"]
        assert (
            Path(current.job.request.config_files[0]).read_text() == (bench.config / "base.yaml").read_text()
        )

        # Twelve newer snapshots (as twelve deploys would take): the oldest unrecorded ones go, the
        # recorded one stays although it is the oldest of all.
        files = read_config_files([str(bench.config / "base.yaml")])
        added = [
            Path(bench.store.snapshot_config("ticks", files, f"fill{n:02d}")[0]).parent for n in range(12)
        ]
        assert snapshot_dirs(bench) == sorted([recorded, *added[-KEPT:]])
        for directory in snapshot_dirs(bench):
            assert_private(directory)

        # A redeploy records a new snapshot; the first deployment is history now, still recorded: kept.
        second = bench.materialize(instance, LOOM_TEST_VERSION="v2")
        assert second.success, step_failure_message(second)
        newest = recorded_snapshot(bench)
        assert newest not in [recorded, *added]
        assert snapshot_dirs(bench) == sorted([recorded, *added[-(KEPT - 1) :], newest])
        previous = bench.store.history("ticks")[0]
        assert {Path(f).parent for f in previous.job.request.config_files} == {recorded}
        print(f"\n[snapshots] kept {len(snapshot_dirs(bench))}: the last {KEPT} + the recorded first one")
