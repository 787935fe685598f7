"""The example code location under the real ``dagster dev`` (webserver + daemon + run workers), with a
real broker and a real ClickHouse engine: deploy from the UI's API, the job outlives ``dagster dev``,
the sensors run by default, and the daemon's health sensor restarts a SIGKILLed job."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from definitions.setup_dev import TOPICS, create_clickhouse_table
from loom_dagster import DeploymentStore
from loom_dagster.core import procfs
from loom_dagster.dev.kafka import KafkaBroker, create_topics
from loom_dagster.dev.produce import produce, sample_orders
from tests.support.dagster_dev import ROOT, dagster_dev, graphql, launch_materialization, wait_run
from tests.support.helpers import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

SENSORS = """
query {
  sensorsOrError(repositorySelector: {repositoryLocationName: "definitions.definitions", repositoryName: "__repository__"}) {
    ... on Sensors { results { name sensorState { status } } }
  }
}
"""
CHECKS = """
query { assetNodes { assetKey { path } assetChecksOrError { ... on AssetChecks { checks { name } } } } }
"""


def _alive(store: DeploymentStore, flow: str) -> list[int]:
    current = store.current(flow)
    if current is None:
        return []
    return [p.pid for p in current.job.processes if procfs.is_alive(p.pid, p.start_ticks)]


def test_example_deploys_survives_restart_and_is_healed_by_the_daemon(
    kafka: KafkaBroker, clickhouse: Any, tmp_path: Path
) -> None:
    create_topics(kafka.bootstrap_servers, TOPICS, partitions=3)
    create_clickhouse_table(clickhouse.url)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ROOT / "definitions" / "dagster.yaml", home / "dagster.yaml")
    env = {
        "LOOM_KAFKA_BOOTSTRAP": kafka.bootstrap_servers,
        "LOOM_CLICKHOUSE_URL": clickhouse.url,
        "LOOM_DATA_DIR": str(tmp_path / "data"),
        "LOOM_ENV": "development",
    }
    store = DeploymentStore(home / "loom")
    try:
        with dagster_dev(home, env=env) as url:
            sensors = graphql(url, SENSORS)["sensorsOrError"]["results"]
            assert {s["name"]: s["sensorState"]["status"] for s in sensors} == {
                "loom_job_health": "RUNNING",
                "loom_kafka_lag": "RUNNING",
                "loom_sink_health": "RUNNING",
            }
            checks = {
                "/".join(n["assetKey"]["path"]): {c["name"] for c in n["assetChecksOrError"]["checks"]}
                for n in graphql(url, CHECKS)["assetNodes"]
            }
            assert checks["loom/orders_enrichment"] == {"deploy_checks", "job_running", "kafka_lag"}
            assert checks["delta/orders_enriched"] == {"freshness"}

            run_id = launch_materialization(url, [["loom", "orders_enrichment"]])
            assert wait_run(url, run_id) == "SUCCESS"
            (pid,) = _alive(store, "orders_enrichment")
        # dagster dev (webserver, daemon, code server) is gone; the job is not.
        assert procfs.is_alive(pid)
        produce(kafka.bootstrap_servers, "orders", sample_orders(200), key=lambda o: o.customer_id)

        with dagster_dev(home, env=env):
            assert _alive(store, "orders_enrichment") == [pid]  # not started twice
            os.kill(pid, signal.SIGKILL)
            restarted = wait_for(
                lambda: [p for p in _alive(store, "orders_enrichment") if p != pid],
                150,
                "the health sensor restart",
            )
            assert len(restarted) == 1
        produce(kafka.bootstrap_servers, "orders", sample_orders(200, start=200), key=lambda o: o.customer_id)
        history = store.history("orders_enrichment")
        # The sensor's run restarted the recorded deployment (its config snapshot), not a new deploy.
        assert len(history) == 2 and history[-1].restarts == 1 and history[-1].run_id == run_id
        assert history[-1].job.request.config_files == history[0].job.request.config_files
    finally:
        for deployment in store.all():
            for proc in deployment.job.processes:
                if procfs.is_alive(proc.pid, proc.start_ticks):
                    os.kill(proc.pid, signal.SIGKILL)
