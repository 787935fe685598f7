"""The code location's deploy op (``loom_deploy``, one op for every flow) runs in the Dagster pool
``loom_deploy``: under the real ``dagster dev`` (webserver, daemon, run workers) with the example's
instance settings (``definitions/dagster.yaml``: ``concurrency: pools: {default_limit: 1}``), two
materializations of one flow launched together both succeed, the second's deploy step waiting for the
first's to finish instead of failing on the flow lock. (With that limit, the location's deploys, of any
flows, run one at a time; see the README, "Concurrency".)"""

from __future__ import annotations

import os
import shutil
import signal
import textwrap
from pathlib import Path

import pytest

from loom_dagster import DeploymentStore
from loom_dagster.core import procfs
from loom_dagster.dev.kafka import KafkaBroker
from tests.conftest import make_topics, ticks_config
from tests.support.dagster_dev import ROOT, dagster_dev, graphql, launch_materialization, wait_run

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
LOCATION = "pool_test"
POOL = "loom_deploy"
STEP = "loom_deploy"
LOGS = """
query($id: ID!) {
  logsForRun(runId: $id) {
    __typename
    ... on EventConnection { events { __typename ... on MessageEvent { message timestamp stepKey } } }
  }
}
"""


def location_file(directory: Path, config: Path) -> Path:
    """A code location with the ticks flow (its sensors stopped: only the two runs act)."""
    path = directory / "pool_location.py"
    path.write_text(
        textwrap.dedent(
            f"""
            from loom_dagster import LoomFlowSpec, LoomSensorSettings, build_loom_defs

            defs = build_loom_defs(
                [LoomFlowSpec(
                    "tests.flows.delta_only:ticks_flow", config={str(config)!r}, environment="test"
                )],
                sensors=LoomSensorSettings(default_status_running=False),
            )
            """
        )
    )
    return path


def step_events(url: str, run_id: str) -> list[dict[str, str]]:
    """The run's events of its deploy step: type, message, timestamp (ms)."""
    data = graphql(url, LOGS, {"id": run_id})["logsForRun"]
    assert data["__typename"] == "EventConnection", data
    return [e for e in data["events"] if e.get("stepKey") == STEP]


def first(events: list[dict[str, str]], typename: str) -> float:
    (found,) = [float(e["timestamp"]) for e in events if e["__typename"] == typename][:1]
    return found


def test_second_materialization_waits_for_the_flow_pool(
    kafka: KafkaBroker, tmp_path: Path, topic_prefix: str
) -> None:
    bootstrap = kafka.bootstrap_servers
    make_topics(bootstrap, topic_prefix, ["ticks", "ticks.out", "ticks.dlq"], 3)
    config = ticks_config(
        tmp_path / "config", brokers=bootstrap, prefix=topic_prefix, delta_uri=str(tmp_path / "delta")
    )
    workspace = tmp_path / "workspace.yaml"
    workspace.write_text(
        textwrap.dedent(
            f"""
            load_from:
              - python_file:
                  relative_path: {location_file(tmp_path, config)}
                  working_directory: {ROOT}
                  location_name: {LOCATION}
            """
        )
    )
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ROOT / "definitions" / "dagster.yaml", home / "dagster.yaml")
    store = DeploymentStore(home / "loom")
    try:
        with dagster_dev(home, workspace=str(workspace)) as url:
            runs = [launch_materialization(url, [["loom", "ticks"]], location=LOCATION) for _ in range(2)]
            statuses = [wait_run(url, run_id, timeout_s=300) for run_id in runs]
            events = {run_id: step_events(url, run_id) for run_id in runs}
        assert statuses == ["SUCCESS", "SUCCESS"], (statuses, home / "dagster-dev.log")
        blocked = [
            run_id
            for run_id in runs
            if any(e.get("message") == f"Step blocked by limit for pool {POOL}" for e in events[run_id])
        ]
        assert len(blocked) == 1, {r: [e.get("message") for e in events[r]][:12] for r in runs}
        (waiter,) = blocked
        (holder,) = [r for r in runs if r != waiter]
        held_until = first(events[holder], "ExecutionStepSuccessEvent")
        waited_from = first(events[waiter], "ExecutionStepStartEvent")
        print(
            f"\n[pool] the second deploy step started {(waited_from - held_until) / 1000:.2f}s after the "
            "first one finished"
        )
        assert waited_from >= held_until, (waited_from, held_until)
        # both deployed, one after the other: the second replaced the first's job
        history = store.history("ticks")
        assert [d.run_id for d in history] == [holder, waiter], [d.run_id for d in history]
        current = store.current("ticks")
        assert current is not None
        alive = [p.pid for p in current.job.processes if procfs.is_alive(p.pid, p.start_ticks)]
        assert len(alive) == 1
        assert not any(procfs.is_alive(p.pid, p.start_ticks) for p in history[0].job.processes)
    finally:
        for deployment in [*store.history("ticks"), *filter(None, [store.current("ticks")])]:
            for proc in deployment.job.processes:
                if procfs.is_alive(proc.pid, proc.start_ticks):
                    os.kill(proc.pid, signal.SIGKILL)
