"""Deploying flows for real: a real Kafka broker, real Delta tables, real Dagster instances, and the
job running detached as ``python -m loom_dagster.runtime``."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from loom_dagster import LoomFlowSpec
from loom_dagster.core import procfs
from loom_dagster.dev.kafka import KafkaBroker
from tests.integration.test_delivery import AtKill, Written, assert_replay_exact, undeploy
from tests.support.deploy_env import TICKS, DeployBench, bench_fixture, runtime_pids_for
from tests.support.helpers import materialization_metadata as _metadata
from tests.support.helpers import step_failure_message as _failure_message
from tests.support.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def test_deploy_redeploy_kill_and_redeploy_lose_nothing(bench: DeployBench) -> None:
    """The README's row "redeploy under continuous production + SIGKILL + re-materialize": N messages
    land in Delta and the output topic; a redeploy under continuous production writes no duplicate; then
    a SIGKILL and a re-materialize lose nothing and duplicate exactly the records the killed job had
    written past its last commit (Delta: a batch flushed but not yet committed; the output topic: the
    records sent since the last commit), counted per id (``tests.integration.test_delivery``)."""
    bench.produce(0, 1000)
    with dg.instance_for_test() as instance:
        first = bench.materialize(instance, LOOM_TEST_VERSION="v1")
        assert first.success, _failure_message(first)
        md = _metadata(first)
        assert md["loom/deployed"] is True
        pid = int(md["loom/pid"])  # type: ignore[call-overload]
        # The Dagster run is over; the job keeps running, detached (its parent is not this process).
        assert procfs.is_alive(pid)
        assert procfs.read_stat(pid).session == pid  # type: ignore[union-attr]
        assert os.getppid() != pid and procfs.read_stat(pid).pgid == pid  # type: ignore[union-attr]
        bench.wait_for_delta(set(bench.produced))
        assert bench.output_messages() >= 1000

        stop = threading.Event()

        def keep_producing() -> None:
            start = 1000
            while not stop.is_set():
                bench.produce(start, 50)
                start += 50
                time.sleep(0.1)

        producer = threading.Thread(target=keep_producing, daemon=True)
        producer.start()
        try:
            time.sleep(2)
            second = bench.materialize(instance, LOOM_TEST_VERSION="v2")
            assert second.success, _failure_message(second)
            md2 = _metadata(second)
            assert int(md2["loom/pid"]) != pid  # type: ignore[call-overload]
            assert not procfs.is_alive(pid)
            assert "plan" in str(md2["loom/previous_deployment"])
            assert float(md2["loom/drain_s"]) < 30  # type: ignore[arg-type]
            time.sleep(2)

            killed = int(md2["loom/pid"])  # type: ignore[call-overload]
            os.kill(killed, signal.SIGKILL)
            wait_for(lambda: not procfs.is_alive(killed), 10, "the SIGKILLed job gone", interval_s=0.02)
            kill = AtKill.read(bench)
            before = list(dict.fromkeys(bench.produced))
            # the redeploy under load wrote nothing twice
            assert max(kill.written.of(before)[0].values()) <= 1
            assert max(kill.written.of(before)[1].values()) <= 1
            third = bench.materialize(instance, LOOM_TEST_VERSION="v3")
            assert third.success, _failure_message(third)
            time.sleep(2)
        finally:
            stop.set()
            producer.join()

    bench.wait_for_delta(set(bench.produced), timeout_s=120)
    undeploy(bench)  # drain: the last staged rows are flushed, so every replay has been written
    figures = assert_replay_exact(
        bench, kill, Written.read(bench), "redeploy under load + SIGKILL + re-materialize"
    )
    assert figures["produced"] >= 2000


RACE = """
import sys, time
from pathlib import Path
import dagster as dg
from loom_dagster import LoomDeployResource, LoomFlowSpec, build_loom_defs
config, state, ready, go = sys.argv[1:5]
defs = build_loom_defs([LoomFlowSpec("tests.flows.delta_only:ticks_flow", config=config, environment="test")])
resource = LoomDeployResource(state_dir=state, health_timeout_s=60.0)
with dg.instance_for_test() as instance:
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.002)
    result = dg.materialize(
        list(defs.assets or []), selection=[dg.AssetKey(["loom", "ticks"])], resources={"loom": resource},
        instance=instance, raise_on_error=False,
    )
if result.success:
    print("deployed")
    sys.exit(0)
failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
print(failure.event_specific_data.error.message)
sys.exit(1)
"""


def test_concurrent_materializations_leave_one_job(bench: DeployBench) -> None:
    """Two run workers (each with its own Dagster instance) materialize the same flow at the same moment
    (both loaded, then released together): exactly one deploys, the other fails at once with the lock's
    message, and exactly one job is left."""
    go = bench.root / "go"
    procs = []
    for n in range(2):
        argv = [
            sys.executable,
            "-c",
            RACE,
            str(bench.config),
            str(bench.state_dir),
            str(bench.root / f"r{n}"),
            str(go),
        ]
        procs.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        )
    try:
        wait_for(
            lambda: all((bench.root / f"r{n}").exists() for n in range(2)), 180, "both run workers loaded"
        )
        go.touch()
        outputs = [(p.wait(timeout=240), p.stdout.read() if p.stdout else "") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    print(f"\n[concurrency] outcomes: {outputs}")
    assert sorted(code for code, _ in outputs) == [0, 1], outputs
    (failure,) = [out for code, out in outputs if code == 1]
    assert "flow 'ticks' is being deployed or stopped by run" in failure, failure
    assert "this request changed nothing" in failure, failure
    (pid,) = runtime_pids_for(bench.state_dir)
    assert bench.alive_pids() == [pid]


def test_failing_start_leaves_nothing_running(bench: DeployBench) -> None:
    """A step that raises at start (set only in the job's environment, so compile passes here): the
    health gate fails with the job's log tail and nothing is left running."""
    with dg.instance_for_test() as instance:
        result = bench.materialize(instance, bench.resource(preflight=False), LOOM_TEST_FAIL_AT_START="1")
    message = _failure_message(result)
    assert "failed its health gate" in message
    assert "LOOM_TEST_FAIL_AT_START is set" in message  # from the job's log tail
    assert "nothing is running now" in message
    assert runtime_pids_for(bench.state_dir) == []


def test_unreachable_broker_is_refused_before_launch(bench: DeployBench) -> None:
    """The offset check reaches the brokers first: an unreachable one fails the run, nothing launched."""
    text = (bench.config / "base.yaml").read_text().replace(bench.bootstrap, "127.0.0.1:9")
    (bench.config / "base.yaml").write_text(text)
    with dg.instance_for_test() as instance:
        started = time.monotonic()
        result = bench.materialize(instance, bench.resource(health_timeout_s=15, connect_timeout_s=3))
        elapsed = time.monotonic() - started
    message = _failure_message(result)
    assert "127.0.0.1:9" in message and "nothing was launched" in message, message
    assert "failed its health gate" not in message
    assert bench.store.current("ticks") is None
    assert runtime_pids_for(bench.state_dir) == []
    assert elapsed < 30, elapsed


def test_unreachable_broker_in_the_jobs_env_is_refused_before_launch(bench: DeployBench) -> None:
    """A broker that only the job would use (set in its own environment) is checked before launch."""
    with dg.instance_for_test() as instance:
        spec = LoomFlowSpec(
            TICKS,
            config=bench.config,
            environment="test",
            env={"LOOM__KAFKA__CONSUMER__BROKERS": '["127.0.0.1:9"]'},
        )
        result = bench.materialize(instance, bench.resource(health_timeout_s=15), spec=spec)
    message = _failure_message(result)
    assert "127.0.0.1:9" in message and "failed its health gate" not in message, message
    assert runtime_pids_for(bench.state_dir) == []
    assert bench.store.current("ticks") is None  # nothing was launched or recorded


def test_bad_new_version_keeps_the_old_job(bench: DeployBench) -> None:
    bench.produce(0, 100)
    with dg.instance_for_test() as instance:
        good = bench.materialize(instance)
        assert good.success, _failure_message(good)
        old_pid = int(_metadata(good)["loom/pid"])  # type: ignore[call-overload]

        # Preflight catches it in a fresh process: the running job is never touched.
        bad = bench.materialize(instance, LOOM_TEST_FAIL_AT_START="1")
        assert "fails before start (nothing was stopped)" in _failure_message(bad)
        assert procfs.is_alive(old_pid)

        # Without preflight: the old job is drained, the new one fails its gate, the old one comes back.
        worse = bench.materialize(instance, bench.resource(preflight=False), LOOM_TEST_FAIL_AT_START="1")
        message = _failure_message(worse)
        assert "failed its health gate" in message and "runs again" in message
    restored = bench.alive_pids()
    assert len(restored) == 1 and restored == runtime_pids_for(bench.state_dir)
    bench.produce(100, 100)
    bench.wait_for_delta(set(bench.produced))


def test_undeploy_job_stops_the_flow(bench: DeployBench) -> None:
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance).success
        assert len(bench.alive_pids()) == 1
        defs = bench.defs()
        job = defs.resolve_job_def("loom_undeploy")
        result = job.execute_in_process(
            run_config={"ops": {"undeploy_loom_flows": {"config": {"flows": ["ticks"]}}}},
            resources={"loom": bench.resource()},
            instance=instance,
        )
        assert result.success
        unknown = job.execute_in_process(
            run_config={"ops": {"undeploy_loom_flows": {"config": {"flows": ["nope"]}}}},
            resources={"loom": bench.resource()},
            instance=instance,
            raise_on_error=False,
        )
        assert not unknown.success
    assert runtime_pids_for(bench.state_dir) == []
    record = bench.store.current("ticks")
    assert record is not None and record.stopped_on_purpose and record.stopped_by


def test_cluster_of_two_processes(bench: DeployBench) -> None:
    """processes=2: a Bytewax cluster on loopback; both processes connect, all rows land once."""
    bench.produce(0, 600)
    with dg.instance_for_test() as instance:
        result = bench.materialize(instance, spec=dataclasses.replace(bench.spec(), processes=2))
    assert result.success, _failure_message(result)
    assert int(_metadata(result)["loom/processes"]) == 2  # type: ignore[call-overload]
    pids = bench.alive_pids()
    assert len(pids) == 2 and sorted(pids) == sorted(runtime_pids_for(bench.state_dir))
    ids = bench.wait_for_delta(set(bench.produced))
    assert not [i for i in bench.produced if ids[i] != 1]
    drain = bench.resource().deployer()
    drain.undeploy("ticks", by="test")
    assert runtime_pids_for(bench.state_dir) == []


def test_cluster_refusal_is_reported_before_launch(bench: DeployBench) -> None:
    """loom refuses CollectBatch + at_least_once on a multi-process cluster: the deploy fails before
    anything is launched, with loom's issue code."""
    spec = LoomFlowSpec(
        "tests.flows.batching:batch_flow", config=bench.config, environment="test", processes=2
    )
    with dg.instance_for_test() as instance:
        result = bench.materialize(instance, spec=spec)
    message = _failure_message(result)
    assert "DELIVERY_KEYED_MULTIPROCESS" in message and "nothing was stopped" in message
    assert runtime_pids_for(bench.state_dir) == []
    assert bench.store.current("ticks") is None
