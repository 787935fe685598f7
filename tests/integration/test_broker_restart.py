"""A broker restart never kills the process that asks Kafka's group coordinator (librdkafka#4605).

A process ticks the real sensors of a code location (lag, job health with its orphan check) and the
deploy's connect checks (offsets, fence) of a deployed flow, and makes the coordinator requests behind
them (fence describe, lag fetch, offset snapshot) in a loop from several threads, while its broker is
stopped (SIGKILL, then SIGTERM) and started again on the same ports. Before the fix the same loop with
the requests made in-process died of SIGABRT at the first restart in every run (``bench/broker_restart.py``
prints both side by side).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from loom_dagster.dev.kafka import ENV_BOOTSTRAP, KafkaBroker
from tests.support.broker_restart import run_restarts
from tests.support.deploy_env import DeployBench

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

RESTARTS = 4


@pytest.fixture()
def own_broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[KafkaBroker]:
    """A broker of this test only (it is restarted), even when the session uses an external one."""
    monkeypatch.delenv(ENV_BOOTSTRAP, raising=False)
    with KafkaBroker() as broker:
        yield broker


def test_sensors_and_deploy_checks_survive_broker_restarts(own_broker: KafkaBroker, tmp_path: Path) -> None:
    bench = DeployBench(own_broker.bootstrap_servers, f"r{uuid.uuid4().hex[:8]}", tmp_path)
    try:
        assert bench.materialize(dg.DagsterInstance.ephemeral()).success
        report = run_restarts(
            own_broker,
            group=f"{bench.prefix}-ticks",
            topic=f"{bench.prefix}.ticks",
            mode="isolated",
            restarts=RESTARTS,
            sensors=(str(bench.config), str(bench.state_dir)),
        )
    finally:
        bench.stop_everything()

    assert not report.died, f"the ticking process died with exit code {report.exit_code}"
    assert report.restarts == RESTARTS
    calls = {t.call for t in report.ticks}
    assert calls == {
        "fence",
        "lag",
        "offsets",
        "sensor:loom_kafka_lag",
        "sensor:loom_job_health",
        "deploy checks",
    }
    # the outages were seen and reported as unreachable brokers, by the lag sensor too
    down = [t for t in report.ticks if not t.ok]
    assert {t.call for t in down} >= {"fence", "lag", "offsets", "sensor:loom_kafka_lag", "deploy checks"}
    kinds = {t.error.split(":")[0] for t in down}
    unreachable = {
        "ConnectionError",
        "OffsetSnapshotError",
        "OffsetCheckError",
        "DeploymentError",
        "KafkaClientCrashed",
    }
    assert kinds <= unreachable, kinds
    # and every call made after the broker was back (and had elected its coordinator) succeeded
    after = report.calls_after_return(settle_s=3.0)
    assert report.clean_after_last_return(settle_s=3.0), [t for t in after if not t.ok][:5] or after[:5]
