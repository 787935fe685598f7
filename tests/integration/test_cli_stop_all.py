"""``loom-dagster stop --all``: every flow deployed in the state directory is drained and stopped (its
staged rows flushed and committed), recorded as stopped on purpose, and a second ``stop --all`` says
each is already stopped."""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from confluent_kafka import Consumer, TopicPartition

from loom_dagster import LoomFlowSpec, build_loom_defs
from loom_dagster.core import procfs
from loom_dagster.core.job.status import read_status
from loom_dagster.dev.kafka import KafkaBroker
from tests.conftest import make_topics, shapes_config, ticks_config
from tests.support.deploy_env import DeployBench, bench_fixture, runtime_pids_for
from tests.support.helpers import run_cli, step_failure_message, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
STAGE_ALL = {"buffer_max_records": 1_000_000, "buffer_max_age_s": 3600.0}


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=15)
        return sum(max(tp.offset, 0) for tp in parts)
    finally:
        consumer.close()


def test_stop_all_drains_and_stops_every_flow(bench: DeployBench, monkeypatch: pytest.MonkeyPatch) -> None:
    ticks_config(
        bench.config, brokers=bench.bootstrap, prefix=bench.prefix, delta_uri=bench.delta_uri, **STAGE_ALL
    )  # type: ignore[arg-type]
    monkeypatch.setenv("LOOM_TEST_SINKS", "delta,topic")
    make_topics(bench.bootstrap, bench.prefix, ["events", "events.out", "events.dlq"], 1)
    events_config = shapes_config(bench.root / "events", brokers=bench.bootstrap, prefix=bench.prefix)
    events = LoomFlowSpec(
        "tests.flows.shapes:make_flow",
        config=events_config,
        environment="test",
        env={"LOOM_TEST_SINKS": "delta,topic"},
    )
    with dg.instance_for_test() as instance:
        ticks = bench.materialize(instance)
        assert ticks.success, step_failure_message(ticks)
        defs = build_loom_defs([events])
        second = dg.materialize(
            list(defs.assets or []),  # type: ignore[arg-type]
            selection=[dg.AssetKey(["loom", "events"])],
            resources={"loom": bench.resource()},
            instance=instance,
            raise_on_error=False,
        )
        assert second.success, step_failure_message(second)
    records = {d.flow_name: d for d in bench.store.all()}
    assert sorted(records) == ["events", "ticks"]
    pids = {name: [p.pid for p in d.job.processes] for name, d in records.items()}
    assert sorted(runtime_pids_for(bench.state_dir)) == sorted(pids["events"] + pids["ticks"])

    bench.produce(0, 400)  # staged in the ticks job's table buffer until its drain
    status_path = Path(records["ticks"].job.processes[0].status_path or "")

    def read_all() -> bool:
        status = read_status(status_path)
        return status is not None and status.records_in >= 400

    wait_for(read_all, 60, "the ticks job reading the 400 messages")
    assert bench.delta_ids() == Counter()

    stopped = run_cli(bench.state_dir, "stop", "--all")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.splitlines() == [
        f"events: stopped (pids {pids['events'][0]})",
        f"ticks: stopped (pids {pids['ticks'][0]})",
    ], stopped.stdout
    assert runtime_pids_for(bench.state_dir) == []
    assert not any(procfs.is_alive(pid) for pid in pids["events"] + pids["ticks"])
    by = f"loom-dagster CLI on {socket.gethostname()}"
    for name in ("events", "ticks"):
        record = bench.store.current(name)
        assert record is not None and record.stopped_on_purpose and record.stopped_by == by, record
    # drained, not killed: the 400 staged rows were flushed once and their offsets committed
    assert bench.delta_ids() == Counter({i: 1 for i in bench.produced})
    assert committed_total(bench.bootstrap, f"{bench.prefix}-ticks", f"{bench.prefix}.ticks", 3) == 400

    again = run_cli(bench.state_dir, "stop", "--all")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        f"events: already stopped (by {by})",
        f"ticks: already stopped (by {by})",
    ]
    rows = json.loads(run_cli(bench.state_dir, "status", "--all", "--json", "--no-lag").stdout)
    assert sorted((r["flow"], r["health"]) for r in rows) == [("events", "stopped"), ("ticks", "stopped")]
