"""``loom_reset_offsets`` on a real broker with real jobs and a real Delta table: the counts it reports
(reprocessed / skipped per partition) are what the relaunched job then re-reads (multiplicity of ids in
Delta) or never reads; a dry run and a refusal change nothing.

The ticks flow flushes its Delta buffer after every record here (``buffer_max_records: 1``): no tail
waits in a buffer for more data, so no marker messages are needed and every count is exact.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from loom_dagster import build_loom_defs
from loom_dagster.core.deploy.launch_records import LaunchedJob, LaunchRequest
from loom_dagster.core.deploy.store import Deployment, DeploymentStore
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.jobs.reset_offsets import RESET_OFFSETS_JOB, RESET_OFFSETS_OP
from tests.conftest import ticks_config, write_yaml
from tests.support.deploy_env import DeployBench, bench_fixture
from tests.support.helpers import step_failure_message as _failure

TIMEOUT_S = 120.0
TIMINGS: list[tuple[float, float]] = []
"""(drain, health gate) seconds of every applied rewind, for the printed figures."""


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    for bench in bench_fixture(kafka, tmp_path, topic_prefix):
        ticks_config(
            bench.root / "config",
            brokers=bench.bootstrap,
            prefix=bench.prefix,
            delta_uri=bench.delta_uri,
            buffer_max_records=1,
        )
        yield bench


def _reset(bench: DeployBench, instance: dg.DagsterInstance, **config: Any) -> dg.ExecuteInProcessResult:
    job = build_loom_defs([bench.spec()]).resolve_job_def(RESET_OFFSETS_JOB)
    return job.execute_in_process(
        run_config={"ops": {RESET_OFFSETS_OP: {"config": {"flow": "ticks", **config}}}},
        resources={"loom": bench.resource()},
        instance=instance,
        raise_on_error=False,
    )


def _report(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    """The job's output, checked against the observation it logged on the flow asset."""
    assert result.success, _failure(result)
    report: dict[str, Any] = result.output_for_node(RESET_OFFSETS_OP)
    (observation,) = result.asset_observations_for_node(RESET_OFFSETS_OP)
    assert observation.asset_key == dg.AssetKey(["loom", "ticks"])
    md = {k: v.value for k, v in observation.metadata.items()}
    assert md["loom/reprocessed"] == report["reprocessed"] and md["loom/skipped"] == report["skipped"]
    assert md["loom/partitions"] == report
    assert "| topic | partition |" in str(md["loom/partition_table"])
    if "loom/drain_s" in md:
        TIMINGS.append((float(md["loom/drain_s"]), float(md.get("loom/health_gate_s", 0.0))))
    return report


def _topic(bench: DeployBench) -> str:
    return f"{bench.prefix}.ticks"


def _committed(bench: DeployBench) -> dict[int, int]:
    """The flow group's committed offset per partition (-1: none)."""
    admin = AdminClient({"bootstrap.servers": bench.bootstrap})
    request = [
        ConsumerGroupTopicPartitions(
            f"{bench.prefix}-ticks", [TopicPartition(_topic(bench), p) for p in range(bench.partitions)]
        )
    ]
    result = admin.list_consumer_group_offsets(request)[f"{bench.prefix}-ticks"].result(timeout=30)
    return {tp.partition: tp.offset for tp in result.topic_partitions}


def _ends(bench: DeployBench) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bench.bootstrap, "group.id": f"{bench.prefix}-probe"})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(_topic(bench), p), timeout=30)[1]
            for p in range(bench.partitions)
        }
    finally:
        consumer.close()


def _wait_committed_at_end(bench: DeployBench, timeout_s: float = TIMEOUT_S) -> dict[int, int]:
    """Until the running job has committed everything (so that a report's "committed" is the end)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        committed, ends = _committed(bench), _ends(bench)
        if committed == ends:
            return committed
        time.sleep(0.5)
    raise AssertionError(f"committed {committed} never reached the end {ends}")


def _wait_growth(bench: DeployBench, before: Counter[str], expected: int) -> int:
    """Rows written again for ids that were in Delta before, once *expected* of them arrived and the job
    has committed to the end (so that nothing more is coming)."""
    deadline = time.monotonic() + TIMEOUT_S
    growth = 0
    while time.monotonic() < deadline:
        now = bench.delta_ids()
        growth = sum(now[i] - n for i, n in before.items())
        if growth >= expected and _committed(bench) == _ends(bench):
            time.sleep(1.0)
            now = bench.delta_ids()
            return sum(now[i] - n for i, n in before.items())
        time.sleep(0.5)
    raise AssertionError(f"only {growth} of {expected} re-read rows reached Delta")


def _deploy(bench: DeployBench, instance: dg.DagsterInstance) -> None:
    started = time.monotonic()
    result = bench.materialize(instance)
    assert result.success
    print(f"\n[rewind] deploy took {time.monotonic() - started:.1f}s")


@pytest.mark.kafka
@pytest.mark.slow
def test_rewind_to_datetime_shift_earliest_and_dry_run(bench: DeployBench) -> None:
    """Two batches a few seconds apart; the boundary time re-reads exactly the second batch; shift_by -4
    on partitions 0 and 2 re-reads 4 there; earliest re-reads everything. A dry run changes nothing."""
    topic = _topic(bench)
    bench.produce(0, 30)
    time.sleep(1.5)
    boundary = datetime.now(UTC).isoformat()
    time.sleep(1.5)
    bench.produce(30, 30)
    first, second = [f"id-{i}" for i in range(30)], [f"id-{i}" for i in range(30, 60)]
    timings: dict[str, float] = {}
    with dg.instance_for_test() as instance:
        _deploy(bench, instance)
        bench.wait_for_delta(set(bench.produced), timeout_s=TIMEOUT_S, nudge=False)
        ends = _wait_committed_at_end(bench)
        pids = bench.alive_pids()

        # dry run: the report, and nothing changed
        started = time.monotonic()
        dry = _report(_reset(bench, instance, to_datetime=boundary, dry_run=True))
        timings["dry_run"] = time.monotonic() - started
        assert dry["reprocessed"] == 30 and dry["skipped"] == 0
        assert sum(r["end"] - r["new"] for r in dry["partitions"]) == 30
        assert _committed(bench) == ends and bench.alive_pids() == pids
        record = bench.store.current("ticks")
        assert record is not None and record.restarts == 0 and "rewinds" not in record.extra

        # to_datetime: the second batch, exactly once more
        before = bench.delta_ids()
        started = time.monotonic()
        report = _report(_reset(bench, instance, to_datetime=boundary))
        timings["to_datetime"] = time.monotonic() - started
        assert report["reprocessed"] == 30 and report["skipped"] == 0
        assert [r["committed"] for r in report["partitions"]] == [ends[p] for p in range(bench.partitions)]
        assert bench.alive_pids() != pids and len(bench.alive_pids()) == 1
        assert _wait_growth(bench, before, report["reprocessed"]) == 30
        ids = bench.delta_ids()
        assert all(ids[i] == 1 for i in first) and all(ids[i] == 2 for i in second)
        record = bench.store.current("ticks")
        assert record is not None and record.restarts == 1 and not record.stopped_on_purpose
        (entry,) = record.extra["rewinds"]
        assert entry["reprocessed"] == 30 and entry["target"] == f"to_datetime {boundary}"

        # shift_by -4 on partitions 0 and 2 only
        before = bench.delta_ids()
        started = time.monotonic()
        report = _report(_reset(bench, instance, shift_by=-4, partitions={topic: [0, 2]}))
        timings["shift_by"] = time.monotonic() - started
        rows = {r["partition"]: r for r in report["partitions"]}
        assert sorted(rows) == [0, 2]
        expected = sum(min(4, ends[p] - rows[p]["low"]) for p in rows)
        assert report["reprocessed"] == expected and report["skipped"] == 0
        assert all(rows[p]["new"] == ends[p] - min(4, ends[p]) for p in rows)
        assert _wait_growth(bench, before, expected) == expected
        assert _committed(bench) == ends

        # earliest: everything once more
        before = bench.delta_ids()
        started = time.monotonic()
        report = _report(_reset(bench, instance, earliest=True))
        timings["earliest"] = time.monotonic() - started
        assert report["reprocessed"] == 60 and all(r["new"] == 0 for r in report["partitions"])
        assert _wait_growth(bench, before, 60) == 60
        record = bench.store.current("ticks")
        assert record is not None and record.restarts == 3 and len(record.extra["rewinds"]) == 3
        assert record.extra["start_offsets"] == {topic: {str(p): 0 for p in range(bench.partitions)}}
    print(
        f"\n[rewind] reprocessed: to_datetime 30 (second batch), shift_by -4 on 2 partitions {expected}, "
        f"earliest 60; seconds per run: "
        + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
        + "; (drain, health gate) s: "
        + ", ".join(f"({d:.2f}, {g:.2f})" for d, g in TIMINGS)
    )


@pytest.mark.kafka
@pytest.mark.slow
def test_latest_on_a_stopped_flow_refusals_and_errors(bench: DeployBench, tmp_path: Path) -> None:
    """Errors and refusals change nothing; ``latest`` on a flow stopped on purpose skips exactly what was
    produced meanwhile (never read after it is deployed again) and leaves it stopped."""
    topic = _topic(bench)
    with dg.instance_for_test() as instance:
        never = _failure(_reset(bench, instance, earliest=True))
        assert "has never been deployed" in never

        bench.produce(0, 20)
        _deploy(bench, instance)
        bench.wait_for_delta(set(bench.produced), timeout_s=TIMEOUT_S, nudge=False)
        ends = _wait_committed_at_end(bench)
        pids = bench.alive_pids()

        errors = {
            "no target": _failure(_reset(bench, instance)),
            "two targets": _failure(_reset(bench, instance, earliest=True, shift_by=-1)),
            "no timezone": _failure(_reset(bench, instance, to_datetime="2026-03-01T12:00:00")),
            "not a datetime": _failure(_reset(bench, instance, to_datetime="yesterday")),
            "unknown topic": _failure(_reset(bench, instance, earliest=True, topics=["nope"])),
            "unknown partition": _failure(_reset(bench, instance, earliest=True, partitions={topic: [7]})),
        }
        assert "exactly one of" in errors["no target"] and "got none" in errors["no target"]
        assert "earliest and shift_by" in errors["two targets"]
        assert "has no timezone" in errors["no timezone"]
        assert "not an ISO 8601 datetime" in errors["not a datetime"]
        assert "nope are not source topics" in errors["unknown topic"]
        assert "has no partition 7" in errors["unknown partition"]
        assert "(its partitions: 0, 1, 2)" in errors["unknown partition"]
        unknown_flow = (
            build_loom_defs([bench.spec()])
            .resolve_job_def(RESET_OFFSETS_JOB)
            .execute_in_process(
                run_config={"ops": {RESET_OFFSETS_OP: {"config": {"flow": "nope", "earliest": True}}}},
                resources={"loom": bench.resource()},
                instance=instance,
                raise_on_error=False,
            )
        )
        assert "unknown flow 'nope'" in _failure(unknown_flow)

        # refused while some other consumer is a member of the group (the broker would refuse the reset)
        stranger = Consumer(
            {
                "bootstrap.servers": bench.bootstrap,
                "group.id": f"{bench.prefix}-ticks",
                "client.id": "stranger",
                "enable.auto.commit": False,
            }
        )
        try:
            stranger.subscribe([topic])
            deadline = time.monotonic() + 30
            while not stranger.assignment() and time.monotonic() < deadline:
                stranger.poll(0.2)
            member = _failure(_reset(bench, instance, earliest=True))
        finally:
            stranger.close()
        assert "has active member(s): stranger@" in member and "nothing was changed" in member
        assert _committed(bench) == ends and bench.alive_pids() == pids

        # refused at once while another deploy holds the flow's lock
        with bench.store.lock("ticks", holder="test holding the lock"):
            started = time.monotonic()
            refused = _failure(_reset(bench, instance, earliest=True))
            refused_s = time.monotonic() - started
        assert "deploy lock is held" in refused and "nothing was changed" in refused
        assert _committed(bench) == ends and bench.alive_pids() == pids
        record = bench.store.current("ticks")
        assert record is not None and record.restarts == 0 and "rewinds" not in record.extra

        # stopped on purpose; produced meanwhile; latest skips exactly that and does not relaunch
        bench.resource().deployer().undeploy("ticks", by="test")
        assert bench.alive_pids() == []
        bench.produce(100, 15)
        skipped_ids = {f"id-{i}" for i in range(100, 115)}
        report = _report(_reset(bench, instance, latest=True))
        assert report["skipped"] == 15 and report["reprocessed"] == 0
        assert sum(r["end"] - r["committed"] for r in report["partitions"]) == 15
        assert _committed(bench) == _ends(bench) and bench.alive_pids() == []
        record = bench.store.current("ticks")
        assert record is not None and record.stopped_on_purpose and len(record.extra["rewinds"]) == 1

        _deploy(bench, instance)
        bench.produce(200, 10)
        ids = bench.wait_for_delta({f"id-{i}" for i in range(200, 210)}, timeout_s=TIMEOUT_S, nudge=False)
        assert not skipped_ids & set(ids)
        assert all(ids[f"id-{i}"] == 1 for i in range(200, 210))
    print(f"\n[rewind] latest skipped 15 produced while stopped; lock refusal took {refused_s:.2f}s")


def test_flow_that_is_not_kafka_sourced(tmp_path: Path) -> None:
    """A record whose source is not Kafka is refused before anything is compiled or contacted."""
    store = DeploymentStore(tmp_path / "state")
    store.save(
        Deployment.decode(
            b'{"flow_name": "ticks", "plan_hash": "p", "config_hash": "c", "deployed_at": 1, '
            b'"extra": {"source": {"kind": "mongo"}}, "job": {"flow_name": "ticks", "launcher": "local", '
            b'"host": "h", "processes": [], "log_path": "", "started_at": 1, "request": {"flow_name": '
            b'"ticks", "import_path": "m:f", "config_files": [], "environment": "test", "plan_hash": "p", '
            b'"config_hash": "c"}}}'
        )
    )
    from loom_dagster import LoomDeployResource
    from loom_dagster.core.deploy.rewind import RewindError, RewindRequest, rewind_flow

    deployer = LoomDeployResource(state_dir=str(tmp_path / "state")).deployer()
    with pytest.raises(RewindError, match="reads from a mongo source, not Kafka"):
        rewind_flow(deployer, RewindRequest("ticks", earliest=True), by="test")


def test_flow_with_bytewax_recovery_is_refused(tmp_path: Path) -> None:
    """A job that resumes from Bytewax recovery state would ignore new group offsets: refused, no broker
    contacted (the brokers here do not exist)."""
    base = ticks_config(tmp_path / "config", brokers="127.0.0.1:9", prefix="t", delta_uri=str(tmp_path / "d"))
    overlay = write_yaml(
        tmp_path / "config" / "recovery.yaml",
        f"""
        streaming:
          runtime: {{recovery: {{db_dir: "{tmp_path / "recovery"}"}}}}
        """,
    )
    store = DeploymentStore(tmp_path / "state")
    request = LaunchRequest(
        flow_name="ticks",
        import_path="tests.flows.delta_only:ticks_flow",
        config_files=(str(base / "base.yaml"), str(overlay)),
        environment="test",
        plan_hash="p",
        config_hash="c",
        sys_path=(str(Path(__file__).resolve().parents[2]),),
    )
    job = LaunchedJob(
        flow_name="ticks",
        launcher="local",
        host="h",
        processes=(),
        log_path="",
        started_at=1.0,
        request=request,
    )
    store.save(Deployment(flow_name="ticks", job=job, plan_hash="p", config_hash="c", deployed_at=1.0))
    from loom_dagster.core.deploy.rewind import RewindError, RewindRequest, plan_rewind

    with pytest.raises(RewindError, match="runs with Bytewax recovery"):
        plan_rewind(store, RewindRequest("ticks", earliest=True))
