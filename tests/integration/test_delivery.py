"""The README's "Delivery guarantees (measured)" table, row by row, on a real broker and real Delta tables:
each test counts, per produced id, the rows in Delta and the messages on the output topic, and asserts
no id is lost and the exact number of duplicates the row states.

Where a row says records "can repeat" (a SIGKILL), the number is not a guess: after the kill the test
reads the group's committed offsets and what the killed job had already written, and asserts that the
restarted job wrote again exactly the records at or past the committed offset (those it re-reads), no
more and no fewer (:func:`expected_after_replay`). Run with ``-s`` for the figures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import msgspec
import pytest
from confluent_kafka import Consumer, TopicPartition

from loom_dagster.core import procfs
from loom_dagster.core.job.status import EXIT_STOPPED, read_status
from loom_dagster.dev.kafka import KafkaBroker
from tests.conftest import ticks_config
from tests.support.deploy_env import DeployBench, bench_fixture, runtime_argv, runtime_pids_for
from tests.support.helpers import step_failure_message, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
STAGE_ALL = {"buffer_max_records": 1_000_000, "buffer_max_age_s": 3600.0}
"""Table buffers that never flush while the job runs: every row a job has read is staged at a drain or
a kill (the largest tail each row of the table can be about)."""


# --------------------------------------------------------------------------- reading what was written


def topic_positions(
    bootstrap: str, topic: str, field: str = "id", timeout_s: float = 30.0
) -> dict[str, list[tuple[int, int]]]:
    """Every message now on *topic*: the payload's *field* -> [(partition, offset), ...] (loom's msgpack
    envelope)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"delivery-probe-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    found: dict[str, list[tuple[int, int]]] = {}
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=timeout_s).topics[topic].partitions)
        ends: dict[int, int] = {}
        starts = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            if high > low:
                ends[p] = high
                starts.append(TopicPartition(topic, p, low))
        if not starts:
            return found
        consumer.assign(starts)
        done: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(done) < len(ends):
            assert time.monotonic() < deadline, f"could not read {topic} to its end in {timeout_s}s"
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            ident = str(msgspec.msgpack.decode(msg.value())["payload"][field])
            found.setdefault(ident, []).append((msg.partition(), msg.offset()))
            if msg.offset() + 1 >= ends[msg.partition()]:
                done.add(msg.partition())
        return found
    finally:
        consumer.close()


def topic_counts(bootstrap: str, topic: str, field: str = "id") -> Counter[str]:
    """Messages on *topic* per payload id (its *field*)."""
    return Counter({ident: len(where) for ident, where in topic_positions(bootstrap, topic, field).items()})


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offset per partition (0 where it never committed)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=15)
        return {tp.partition: max(tp.offset, 0) for tp in parts}
    finally:
        consumer.close()


@dataclass
class Written:
    """What the flow wrote, per produced id: rows in Delta and messages on the output topic."""

    delta: Counter[str]
    output: Counter[str]

    @classmethod
    def read(cls, bench: DeployBench) -> Written:
        return cls(bench.delta_ids(), topic_counts(bench.bootstrap, f"{bench.prefix}.ticks.out"))

    def lost(self, produced: list[str]) -> dict[str, int]:
        """Produced ids missing from Delta / the output topic."""
        return {
            "delta": sum(1 for i in produced if self.delta[i] == 0),
            "output": sum(1 for i in produced if self.output[i] == 0),
        }

    def duplicates(self, produced: list[str]) -> dict[str, int]:
        """Rows / messages beyond the first, over the produced ids (nudge markers excluded)."""
        return {
            "delta": sum(max(self.delta[i] - 1, 0) for i in produced),
            "output": sum(max(self.output[i] - 1, 0) for i in produced),
        }

    def of(self, produced: list[str]) -> tuple[Counter[str], Counter[str]]:
        """Both counters restricted to the produced ids (absent ids count 0)."""
        return (
            Counter({i: self.delta[i] for i in produced}),
            Counter({i: self.output[i] for i in produced}),
        )


@dataclass
class AtKill:
    """The state a SIGKILLed job left: the group's committed offsets and what it had written."""

    committed: dict[int, int]
    written: Written

    @classmethod
    def read(cls, bench: DeployBench) -> AtKill:
        committed = committed_offsets(bench.bootstrap, f"{bench.prefix}-ticks", f"{bench.prefix}.ticks", 3)
        return cls(committed, Written.read(bench))


def input_positions(bench: DeployBench) -> dict[str, tuple[int, int]]:
    """Each produced id's (partition, offset) on the input topic (each was produced exactly once)."""
    found = topic_positions(bench.bootstrap, f"{bench.prefix}.ticks")
    twice = {i: found[i] for i in bench.produced if len(found.get(i, ())) != 1}
    assert not twice, f"ids not on the input topic exactly once: {list(twice.items())[:5]}"
    return {i: found[i][0] for i in bench.produced}


def expected_after_replay(
    kill: AtKill, positions: dict[str, tuple[int, int]], produced: list[str]
) -> tuple[Counter[str], Counter[str], set[str]]:
    """Per id, the Delta rows and output messages there must be once the restarted job has re-read and
    written everything: what the killed job wrote, plus one for each record at or past the committed
    offset of its partition (re-read from there). Also returns those replayed ids."""
    replayed = {i for i in produced if positions[i][1] >= kill.committed[positions[i][0]]}
    delta = Counter({i: kill.written.delta[i] + (i in replayed) for i in produced})
    output = Counter({i: kill.written.output[i] + (i in replayed) for i in produced})
    return delta, output, replayed


def assert_replay_exact(bench: DeployBench, kill: AtKill, final: Written, label: str) -> dict[str, int]:
    """Lost = 0 and duplicates = exactly what :func:`expected_after_replay` predicts; the figures."""
    produced = list(dict.fromkeys(bench.produced))
    positions = input_positions(bench)
    want_delta, want_output, replayed = expected_after_replay(kill, positions, produced)
    # Below the committed offsets everything had been written before the kill (at-least-once).
    below = [i for i in produced if i not in replayed]
    assert all(kill.written.delta[i] >= 1 and kill.written.output[i] >= 1 for i in below)
    got_delta, got_output = final.of(produced)
    assert final.lost(produced) == {"delta": 0, "output": 0}
    assert got_delta == want_delta, _diff(got_delta, want_delta)
    assert got_output == want_output, _diff(got_output, want_output)
    figures = {
        "produced": len(produced),
        "replayed": len(replayed),
        "delta_dups": final.duplicates(produced)["delta"],
        "output_dups": final.duplicates(produced)["output"],
        "delta_written_past_commit": sum(1 for i in replayed if kill.written.delta[i]),
        "output_written_past_commit": sum(1 for i in replayed if kill.written.output[i]),
    }
    assert figures["delta_dups"] == figures["delta_written_past_commit"]
    assert figures["output_dups"] == figures["output_written_past_commit"]
    print(f"\n[delivery] {label}: {figures}")
    return figures


def _diff(got: Counter[str], want: Counter[str]) -> str:
    wrong = {i: (got[i], want[i]) for i in want if got[i] != want[i]}
    return f"{len(wrong)} id(s) (got, expected), e.g. {sorted(wrong.items())[:8]}"


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def configure(bench: DeployBench, *, extra_sink: str = "", **buffers: float) -> None:
    """Rewrite the bench's config with other table-buffer settings (same topics, group and table)."""
    ticks_config(
        bench.config,
        brokers=bench.bootstrap,
        prefix=bench.prefix,
        delta_uri=bench.delta_uri,
        extra_sink=extra_sink,
        **buffers,  # type: ignore[arg-type]
    )


def wait_output(bench: DeployBench, ids: list[str], copies: int = 1, timeout_s: float = 90.0) -> None:
    """Wait until the output topic holds each of *ids* at least *copies* times (the job processed them)."""
    topic = f"{bench.prefix}.ticks.out"

    def enough() -> bool:
        counts = topic_counts(bench.bootstrap, topic)
        return all(counts[i] >= copies for i in ids)

    wait_for(enough, timeout_s, f"{len(ids)} ids x{copies} on the output topic", interval_s=0.5)


def undeploy(bench: DeployBench) -> None:
    """Drain and stop the recorded job (flush + the runtime's final commit); nothing left running."""
    bench.resource().deployer().undeploy("ticks", by="test")
    assert runtime_pids_for(bench.state_dir) == []


def materialize_ok(bench: DeployBench, instance: dg.DagsterInstance, **env: str) -> int:
    """Materialize the ticks flow; return the pid of the job it left running."""
    result = bench.materialize(instance, **env)
    assert result.success, step_failure_message(result)
    (pid,) = bench.alive_pids()
    return pid


class HandJob:
    """``python -m loom_dagster.runtime`` started by the test with the bench's config (its own session)."""

    def __init__(self, bench: DeployBench, name: str, *extra: str) -> None:
        directory = bench.root / "by-hand"
        directory.mkdir(parents=True, exist_ok=True)
        self.status_file = directory / f"{name}.json"
        self.log_path = directory / f"{name}.log"
        argv = runtime_argv(bench.config, self.status_file, *extra)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_records_in(self, count: int, timeout_s: float = 90.0) -> None:
        def seen() -> bool:
            assert self.proc.poll() is None, self.log_path.read_text(errors="replace")[-3000:]
            status = read_status(self.status_file)
            return status is not None and status.records_in >= count

        wait_for(seen, timeout_s, f"{count} records read by the job")

    def stop(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


# --------------------------------------------------------------------------- the table's rows


def test_redeploy_drains_and_commits_the_flushed_tail(bench: DeployBench) -> None:
    """Row "redeploy (SIGTERM -> drain, with the runtime's final offset commit)": 0 lost, 0 duplicates,
    with every row the old job read still staged in its table buffer at the redeploy."""
    configure(bench, **STAGE_ALL)
    with dg.instance_for_test() as instance:
        materialize_ok(bench, instance, LOOM_TEST_VERSION="v1")
        bench.produce(0, 500)
        wait_output(bench, bench.produced)
        assert bench.delta_ids() == Counter(), "every row must still be staged at the redeploy"
        materialize_ok(bench, instance, LOOM_TEST_VERSION="v2")
    # the drain flushed the 500 staged rows and the final commit covered them
    assert bench.delta_ids() == Counter({i: 1 for i in bench.produced})
    ends = committed_offsets(bench.bootstrap, f"{bench.prefix}-ticks", f"{bench.prefix}.ticks", 3)
    assert sum(ends.values()) == 500, ends
    bench.produce(500, 200)
    wait_output(bench, bench.produced)
    undeploy(bench)
    final = Written.read(bench)
    print(
        f"\n[delivery] redeploy with final commit: 500 staged at the drain, "
        f"duplicates {final.duplicates(bench.produced)}"
    )
    assert final.lost(bench.produced) == {"delta": 0, "output": 0}
    assert final.duplicates(bench.produced) == {"delta": 0, "output": 0}


def test_plain_sigint_drain_without_the_final_commit_reappends_the_tail(bench: DeployBench) -> None:
    """Row "loom's plain SIGINT drain (--no-final-commit)": 0 lost; the whole flushed tail (here 400 of
    400 staged rows) is written again after every restart, to Delta and to the output topic."""
    configure(bench, **STAGE_ALL)
    bench.produce(0, 400)
    jobs: list[HandJob] = []
    try:
        for n in range(1, 4):  # a first run, then two restarts
            job = HandJob(bench, f"run{n}", "--no-final-commit")
            jobs.append(job)
            job.wait_records_in(400)
            assert job.stop(signal.SIGINT) == EXIT_STOPPED
            written = Written.read(bench)
            assert written.of(bench.produced) == (
                Counter({i: n for i in bench.produced}),
                Counter({i: n for i in bench.produced}),
            ), (n, written.duplicates(bench.produced))
            committed = committed_offsets(
                bench.bootstrap, f"{bench.prefix}-ticks", f"{bench.prefix}.ticks", 3
            )
            assert committed == {0: 0, 1: 0, 2: 0}, committed  # the flushed tail was never committed
            print(f"\n[delivery] plain SIGINT drain, run {n}: {written.duplicates(bench.produced)}")
    finally:
        for job in jobs:
            job.kill()


def test_no_flush_on_shutdown_repeats_the_tail_on_the_output_topic_only(bench: DeployBench) -> None:
    """Row "flush_on_shutdown: false": 0 lost; Delta 0 duplicates; the output topic gets the staged tail
    (here all 300 records) again."""
    configure(
        bench,
        buffer_max_records=1_000_000,
        buffer_max_age_s=5.0,
        extra_sink="\n              flush_on_shutdown: false",
    )
    with dg.instance_for_test() as instance:
        materialize_ok(bench, instance, LOOM_TEST_VERSION="v1")
        bench.produce(0, 300)
        wait_output(bench, bench.produced)
        assert bench.delta_ids() == Counter(), "every row must still be staged at the redeploy"
        materialize_ok(bench, instance, LOOM_TEST_VERSION="v2")  # the drain drops the staged rows
        assert bench.delta_ids() == Counter()
        # the new job re-reads the tail; a nudge 5 s later flushes its buffer
        bench.wait_for_delta(set(bench.produced))
        wait_output(bench, bench.produced, copies=2)
    final = Written.read(bench)
    print(f"\n[delivery] flush_on_shutdown false: tail 300, {final.duplicates(bench.produced)}")
    assert final.lost(bench.produced) == {"delta": 0, "output": 0}
    assert final.duplicates(bench.produced) == {"delta": 0, "output": 300}


def test_sigkill_then_rematerialize_repeats_only_the_uncommitted_output_tail(bench: DeployBench) -> None:
    """Row "SIGKILL of the job, then re-materialize": 0 lost; Delta 0 duplicates (the staged rows were
    never flushed nor committed: re-read once); the output topic repeats the un-committed tail (here 500
    of 500), exactly the records past the committed offsets."""
    configure(bench, **STAGE_ALL)
    with dg.instance_for_test() as instance:
        pid = materialize_ok(bench, instance)
        bench.produce(0, 500)
        wait_output(bench, bench.produced)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not procfs.is_alive(pid), 10, "the SIGKILLed job gone", interval_s=0.02)
        kill = AtKill.read(bench)
        assert kill.committed == {0: 0, 1: 0, 2: 0} and kill.written.delta == Counter(), kill
        materialize_ok(bench, instance)
        wait_output(bench, bench.produced, copies=2)
    undeploy(bench)
    figures = assert_replay_exact(bench, kill, Written.read(bench), "SIGKILL with 500 staged")
    assert figures["delta_dups"] == 0 and figures["output_dups"] == 500


def test_refused_versions_keep_the_running_job_and_lose_nothing(
    kafka: KafkaBroker, clickhouse: Any, tmp_path: Path, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row "a version with an unreachable broker, a missing source topic or an unreachable sink": each is
    refused before the drain, the running job keeps its pid, and the 600 messages produced around the
    refusals land exactly once in Delta, ClickHouse and the output topic."""
    import clickhouse_connect

    from loom_dagster import LoomDeployResource, LoomFlowSpec, build_loom_defs
    from loom_dagster.dev.produce import produce
    from tests.conftest import make_topics, shapes_config
    from tests.flows.shapes import Event

    sinks = "delta,ch,topic"
    monkeypatch.setenv("LOOM_TEST_SINKS", sinks)
    bootstrap, prefix = kafka.bootstrap_servers, topic_prefix
    make_topics(bootstrap, prefix, ["events", "events.out", "events.dlq"], 2)
    client = clickhouse_connect.get_client(host="127.0.0.1", port=clickhouse.port, username="default")
    client.command(f"CREATE DATABASE IF NOT EXISTS {prefix}")
    config = shapes_config(
        tmp_path / "config",
        brokers=bootstrap,
        prefix=prefix,
        ch_table=f"{prefix}.events",
        ch_url=f"http://default:@127.0.0.1:{clickhouse.port}",
    )
    state = tmp_path / "state"
    resource = LoomDeployResource(
        state_dir=str(state), health_timeout_s=60, create_missing_tables=True, connect_timeout_s=5
    )
    spec = LoomFlowSpec(
        "tests.flows.shapes:make_flow", config=config, environment="test", env={"LOOM_TEST_SINKS": sinks}
    )
    defs = build_loom_defs([spec])
    produced: list[str] = []

    def send(start: int, count: int) -> None:
        events = [Event(event_id=f"e{i}", value=i) for i in range(start, start + count)]
        produce(bootstrap, f"{prefix}.events", events, key=lambda e: e.event_id)
        produced.extend(e.event_id for e in events)

    def materialize(instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            list(defs.assets or []),  # type: ignore[arg-type]
            selection=[dg.AssetKey(["loom", "events"])],
            resources={"loom": resource},
            instance=instance,
            raise_on_error=False,
        )

    try:
        with dg.instance_for_test() as instance:
            deployed = materialize(instance)
            assert deployed.success, step_failure_message(deployed)
            (pid,) = runtime_pids_for(state)
            send(0, 300)
            base = config / "base.yaml"
            good = base.read_text()
            for broken, expected in (
                (good.replace(bootstrap, "127.0.0.1:9"), "127.0.0.1:9"),
                (good.replace(f"topics: [{prefix}.events]", f"topics: [{prefix}.nope]"), "does not exist"),
                (good.replace(f"127.0.0.1:{clickhouse.port}", "127.0.0.1:9"), "unreachable"),
            ):
                base.write_text(broken)
                refused = materialize(instance)
                message = step_failure_message(refused)
                assert expected in message, message
                assert runtime_pids_for(state) == [pid] and procfs.is_alive(pid)
            base.write_text(good)
        send(300, 300)
        out = f"{prefix}.events.out"
        wait_for(
            lambda: all(topic_counts(bootstrap, out, "event_id")[i] for i in produced),
            90,
            "600 on the output topic",
        )
        resource.deployer().undeploy("events", by="test")  # drain: flush the staged rows, final commit
        assert procfs.is_alive(pid) is False
        from deltalake import DeltaTable

        counts = {
            "delta": Counter(
                DeltaTable(str(config / "delta" / "events")).to_pyarrow_table().column("event_id").to_pylist()
            ),
            "clickhouse": Counter(
                {
                    str(k): int(n)
                    for k, n in client.query(
                        f"SELECT event_id, count() FROM {prefix}.events GROUP BY event_id"
                    ).result_rows
                }
            ),
            "output": topic_counts(bootstrap, out, "event_id"),
        }
    finally:
        client.close()
        for leftover in runtime_pids_for(state):
            os.kill(leftover, signal.SIGKILL)
    lost = {name: sum(1 for i in produced if c[i] == 0) for name, c in counts.items()}
    dups = {name: sum(max(c[i] - 1, 0) for i in produced) for name, c in counts.items()}
    print(f"\n[delivery] refused versions: produced {len(produced)}, lost {lost}, duplicates {dups}")
    assert lost == {"delta": 0, "clickhouse": 0, "output": 0}
    assert dups == {"delta": 0, "clickhouse": 0, "output": 0}


def test_without_the_fence_two_jobs_in_one_group_write_everything_twice(bench: DeployBench) -> None:
    """The fence row's "without the fence every message was written twice": two runtimes of one flow
    in one consumer group, started with ``--no-fence``, each read every message (loom's source assigns
    every partition to itself), so every id lands twice in Delta and on the output topic."""
    jobs = [HandJob(bench, f"unfenced{n}", "--no-fence") for n in range(2)]
    try:
        bench.produce(0, 300)
        for job in jobs:
            job.wait_records_in(300)
        assert [job.stop(signal.SIGTERM) for job in jobs] == [EXIT_STOPPED, EXIT_STOPPED]
    finally:
        for job in jobs:
            job.kill()
    written = Written.read(bench)
    print(f"\n[delivery] two unfenced jobs in one group: {written.duplicates(bench.produced)}")
    assert written.of(bench.produced) == (
        Counter({i: 2 for i in bench.produced}),
        Counter({i: 2 for i in bench.produced}),
    )
