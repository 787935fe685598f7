"""A sink table's Dagster freshness policy, where a user looks: under the real ``dagster dev`` (webserver,
daemon with its sensor and freshness daemons, run workers) on a real broker and a real Delta table.

The ticks flow (Kafka -> Delta) is deployed through the webserver's GraphQL API with short windows
(warn after 60 s, fail after 80 s: Dagster's smallest window is a minute), the sink health sensor ticking
every 2 s and the freshness daemon every 2 s (``FRESHNESS_DAEMON_INTERVAL_SECONDS``). Over GraphQL the
Delta asset's freshness is HEALTHY once rows land (the sensor reported a materialization), then, with the
flow undeployed, WARNING after the warn window and DEGRADED after the fail window, each measured from its
last materialization; loom's own ``freshness`` check stays passing (``idle``: no source lag), the age being
the policy's. Then the asset page in headless Chromium shows the failed policy; a screenshot goes to
``docs/screenshots/sink-freshness.png``.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from loom_dagster import DeploymentStore
from loom_dagster.asset_check_names import SINK_FRESHNESS
from loom_dagster.core import procfs
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.jobs.undeploy import UNDEPLOY_JOB
from tests.support.browser import CHROMIUM, BrowserError, Chromium
from tests.support.dagster_dev import (
    ROOT,
    dagster_dev,
    graphql,
    launch_job,
    launch_materialization,
    python_file_workspace,
    wait_run,
)
from tests.support.deploy_env import DeployBench
from tests.support.helpers import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

LOCATION = "freshness_test"
SINK = ["delta", "ticks"]
WARN_S, FAIL_S = 60, 80
DAEMON_INTERVAL_S = 2
SCREENSHOT = ROOT / "docs" / "screenshots" / "sink-freshness.png"
FRESHNESS = """
query($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode {
      internalFreshnessPolicy {
        __typename ... on TimeWindowFreshnessPolicy { failWindowSeconds warnWindowSeconds }
      }
      freshnessStatusInfo { freshnessStatus freshnessStatusMetadata { lastMaterializedTimestamp } }
    }
  }
}
"""
POLICIES = "query { assetNodes { assetKey { path } internalFreshnessPolicy { __typename } } }"


def location_file(directory: Path, config: Path) -> Path:
    """The ticks flow with short freshness windows and a fast sink health sensor (the other sensors off:
    nothing restarts the flow once it is undeployed, nothing else writes events)."""
    path = directory / "freshness_location.py"
    path.write_text(
        textwrap.dedent(
            f"""
            from loom_dagster import LoomFlowSpec, LoomSensorSettings, build_loom_defs
            from loom_dagster.core.sensor_settings import (
                JobHealthSettings, KafkaLagSettings, SinkFreshness, SinkHealthSettings,
            )

            defs = build_loom_defs(
                [LoomFlowSpec("tests.flows.delta_only:ticks_flow", config={str(config)!r}, environment="test")],
                sensors=LoomSensorSettings(
                    job_health=JobHealthSettings(enabled=False),
                    kafka_lag=KafkaLagSettings(enabled=False),
                    sink_health=SinkHealthSettings(
                        interval_s=2,
                        default_freshness=SinkFreshness(warn_after_s={WARN_S}, fail_after_s={FAIL_S}),
                    ),
                ),
            )
            """
        )
    )
    return path


def freshness(url: str) -> dict[str, Any]:
    node = graphql(url, FRESHNESS, {"key": {"path": SINK}})["assetNodeOrError"]
    info = node["freshnessStatusInfo"] or {}
    return {
        "policy": node["internalFreshnessPolicy"],
        "status": info.get("freshnessStatus"),
        "last": (info.get("freshnessStatusMetadata") or {}).get("lastMaterializedTimestamp"),
    }


def wait_status(url: str, status: str, timeout_s: float) -> dict[str, Any]:
    return wait_for(
        lambda: (lambda f: f if f["status"] == status else None)(freshness(url)),
        timeout_s,
        f"freshness {status} of {'/'.join(SINK)} (last seen: {freshness(url)})",
        interval_s=0.5,
    )


@pytest.fixture()
def dev(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[tuple[str, Path, DeployBench]]:
    """``dagster dev`` on the ticks location (topics and config from ``DeployBench``); yields its URL,
    DAGSTER_HOME and the bench. Jobs it deployed are stopped by PID afterwards."""
    bench = DeployBench(kafka.bootstrap_servers, topic_prefix, tmp_path)
    workspace = python_file_workspace(tmp_path, location_file(tmp_path, bench.config), LOCATION)
    home = tmp_path / "home"
    home.mkdir()
    instance = (ROOT / "definitions" / "dagster.yaml").read_text()
    (home / "dagster.yaml").write_text(instance + "\nnux:\n  enabled: false\n")
    env = {"FRESHNESS_DAEMON_INTERVAL_SECONDS": str(DAEMON_INTERVAL_S)}
    try:
        with dagster_dev(home, env=env, workspace=str(workspace), timeout_s=240) as url:
            yield url, home, bench
    finally:
        for deployment in DeploymentStore(home / "loom").all():
            for proc in deployment.job.processes:
                if procfs.is_alive(proc.pid, proc.start_ticks):
                    os.kill(proc.pid, signal.SIGKILL)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}")
def test_sink_freshness_passes_then_warns_then_fails_under_dagster_dev(
    dev: tuple[str, Path, DeployBench], tmp_path: Path
) -> None:
    url, home, bench = dev
    timings: dict[str, float] = {}
    with_policy = {
        "/".join(n["assetKey"]["path"])
        for n in graphql(url, POLICIES)["assetNodes"]
        if n["internalFreshnessPolicy"]
    }
    assert with_policy == {"delta/ticks"}  # the sink table, not the flow nor its topics
    before = freshness(url)
    assert before["policy"] == {
        "__typename": "TimeWindowFreshnessPolicy",
        "failWindowSeconds": FAIL_S,
        "warnWindowSeconds": WARN_S,
    }
    assert before["last"] is None  # nothing materialized yet: the policy cannot pass

    run_id = launch_materialization(url, [["loom", "ticks"]], location=LOCATION)
    assert wait_run(url, run_id, timeout_s=240) == "SUCCESS"
    started = time.monotonic()
    bench.produce(0, 50)
    bench.wait_for_delta({f"id-{i}" for i in range(50)})  # rows landed (nudged out of loom's buffer)
    timings["rows produced -> in Delta"] = time.monotonic() - started
    fresh = wait_status(url, "HEALTHY", 60)
    timings["rows produced -> HEALTHY"] = time.monotonic() - started
    assert fresh["last"] is not None

    stop = launch_job(
        url, UNDEPLOY_JOB, {"ops": {"undeploy_loom_flows": {"config": {"flows": ["ticks"]}}}}, LOCATION
    )
    assert wait_run(url, stop, timeout_s=120) == "SUCCESS"
    last = freshness(url)["last"]  # the flow is stopped: no new data, no new materialization
    assert isinstance(last, float)

    warned = wait_status(url, "WARNING", WARN_S + 30)
    warned_after = time.time() - last
    assert warned["last"] == last
    failed = wait_status(url, "DEGRADED", FAIL_S + 30)
    failed_after = time.time() - last
    assert failed["last"] == last
    timings["WARNING after last materialization"] = warned_after
    timings["DEGRADED after last materialization"] = failed_after
    # Seen within the daemon interval (+ a GraphQL poll and a loaded machine's slack) of each window.
    assert WARN_S <= warned_after < FAIL_S, timings
    assert FAIL_S <= failed_after < FAIL_S + 20, timings

    try:
        check_asset_page(url, tmp_path)
    finally:
        print("\n[freshness] " + ", ".join(f"{k}: {v:.1f}s" for k, v in timings.items()))

    # loom's own check leaves the age to the policy: idle and passing (no writing flow has data waiting)
    with _instance(home) as instance:
        key = dg.AssetCheckKey(dg.AssetKey(SINK), SINK_FRESHNESS)
        record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
        assert record.evaluation is not None
        assert record.evaluation.passed
        assert record.evaluation.metadata["loom/freshness"].value == "idle"


def _instance(home: Path) -> dg.DagsterInstance:
    from dagster._core.instance.ref import InstanceRef

    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))


def check_asset_page(url: str, tmp_path: Path) -> None:
    """The Delta table's asset page shows the failed policy, its windows and the last materialization."""
    with Chromium(window_size=(1600, 1000)) as browser:
        browser.add_init_script("try { localStorage.setItem('communityNux', '\"1\"') } catch (e) {}")
        try:
            browser.open(f"{url}/assets/{'/'.join(SINK)}", timeout=90)
            browser.wait_for(
                "(() => { const t = document.body.innerText; return t.includes('Freshness policy')"
                " && t.includes('Fails if more than') && t.includes('Last materialized'); })()",
                timeout=90,
                what="the asset page's freshness policy section",
            )
            browser.wait_stable("document.body.innerText.length", quiet=2.0, timeout=30)
            text = browser.text()
            status = text[text.find("Freshness policy") :][:40]  # the Status pane, next to the checks
            assert status.split("\n")[1] == "Failed", f"Status pane: {status!r}\n{browser.describe()}"
            section = text[text.rfind("Freshness policy") :][:400]  # the Definition pane's section
            assert section.split("\n")[1] == "Failed", f"Definition pane: {section!r}"
            assert "Last materialized" in section, section
            assert "Fails if more than a minute since last materialization" in section, section
            assert "Warns if more than a minute since last materialization" in section, section
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            browser.screenshot(SCREENSHOT)
        except (AssertionError, TimeoutError, BrowserError):
            print(f"failure screenshot: {browser.screenshot(tmp_path / 'failure.png')}")
            raise
