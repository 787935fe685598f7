"""The redeploy schedule: skips flows whose plan and config are unchanged, redeploys changed ones."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from loom_dagster import LoomDagsterError, build_loom_asset_graph
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.schedules import build_redeploy_schedule
from tests.support.deploy_env import DeployBench, bench_fixture

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def _tick(bench: DeployBench, instance: dg.DagsterInstance) -> list[dg.RunRequest] | dg.SkipReason:
    schedule = build_redeploy_schedule(build_loom_asset_graph([bench.spec()]), "0 3 * * *")
    context = dg.build_schedule_context(
        instance=instance,
        resources={"loom": bench.resource()},
        scheduled_execution_time=datetime.datetime(2026, 11, 28, 3, tzinfo=datetime.UTC),
    )
    result = schedule.evaluate_tick(context)
    if result.skip_message:
        return dg.SkipReason(result.skip_message)
    return list(result.run_requests or [])


def test_skips_unchanged_and_redeploys_changed(bench: DeployBench) -> None:
    with dg.instance_for_test() as instance:
        first = _tick(bench, instance)
        assert isinstance(first, list) and len(first) == 1  # never deployed
        assert first[0].tags["loom/reason"] == "never deployed"
        assert bench.materialize(instance).success

        unchanged = _tick(bench, instance)
        assert isinstance(unchanged, dg.SkipReason)
        assert "ticks: unchanged (plan" in (unchanged.skip_message or "")

        cfg = bench.config / "base.yaml"
        cfg.write_text(cfg.read_text().replace("buffer_max_records: 1000", "buffer_max_records: 900"))
        changed = _tick(bench, instance)
        assert isinstance(changed, list) and len(changed) == 1
        (request,) = changed
        assert request.asset_selection == [dg.AssetKey(["loom", "ticks"])]
        assert request.tags["loom/reason"].startswith("changed: plan")
        assert request.tags["loom/redeploy"] == "scheduled"

        bench.resource().deployer().undeploy("ticks", by="test")
        stopped = _tick(bench, instance)
        assert isinstance(stopped, dg.SkipReason) and "undeployed by test" in (stopped.skip_message or "")


def test_unknown_flow_is_refused(bench: DeployBench) -> None:
    with pytest.raises(LoomDagsterError, match="names unknown flow"):
        build_redeploy_schedule(build_loom_asset_graph([bench.spec()]), "0 3 * * *", flows=["nope"])
