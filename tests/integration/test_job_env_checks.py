"""The pre-launch checks see what the job will see: a flow's ``env=`` reaches only the job's environment,
so a broker overridden there (``LOOM__KAFKA__CONSUMER__BROKERS``, the 12-factor way in containers) must be
checked before the running job is drained, not discovered by the health gate after it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from loom_dagster.dev.kafka import KafkaBroker, pick_free_ports
from tests.support.deploy_env import DeployBench, bench_fixture
from tests.support.helpers import step_failure_message

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def test_broker_overridden_in_the_jobs_env_is_refused_before_the_drain(bench: DeployBench) -> None:
    instance = dg.DagsterInstance.ephemeral()
    assert bench.materialize(instance).success
    (pid,) = bench.alive_pids()
    (closed,) = pick_free_ports(1)
    broken = {"LOOM__KAFKA__CONSUMER__BROKERS": f'["127.0.0.1:{closed}"]'}

    result = bench.materialize(instance, **broken)

    message = step_failure_message(result)
    assert f"127.0.0.1:{closed}" in message, message
    assert "nothing was" in message.lower(), message
    assert bench.alive_pids() == [pid], "the running job was drained for a version that cannot connect"
    current = bench.store.current("ticks")
    assert current is not None and current.job.processes[0].pid == pid


def test_config_value_read_from_the_jobs_env_is_what_gets_checked(bench: DeployBench) -> None:
    """The same override through ``${oc.env:...}`` in the config file, set only in ``env=``."""
    base = bench.config / "base.yaml"
    written = f'brokers: ["{bench.bootstrap}"]\n    group_id'
    from_env = 'brokers: ["${oc.env:TICKS_BROKER,' + bench.bootstrap + '}"]\n    group_id'
    base.write_text(base.read_text().replace(written, from_env, 1))
    assert "${oc.env:TICKS_BROKER," in base.read_text()
    instance = dg.DagsterInstance.ephemeral()
    assert bench.materialize(instance, TICKS_BROKER=bench.bootstrap).success
    (pid,) = bench.alive_pids()
    (closed,) = pick_free_ports(1)

    result = bench.materialize(instance, TICKS_BROKER=f"127.0.0.1:{closed}")

    assert f"127.0.0.1:{closed}" in step_failure_message(result)
    assert bench.alive_pids() == [pid]
