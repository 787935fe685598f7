"""The long-running job runtime (``python -m loom_dagster.runtime``) against a real Kafka broker.

The flow under test is defined here (Kafka -> one step -> Delta, errors to a DLQ topic) and is
imported by the job process as ``tests.integration.test_runtime:runtime_flow``. Delta tables are read in a
child process that leaves through ``os._exit``: deltalake 1.6 + pyarrow sometimes abort at
interpreter exit, which would turn a green pytest run into exit code 134.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loom.core.model import LoomStruct
from loom.streaming import Backend, FromTopic, IntoTable, IntoTopic, Message, Process, RecordStep, StreamFlow

from loom_dagster.core.job.status import (
    EXIT_BAD_INPUT,
    EXIT_DRAIN_TIMEOUT,
    EXIT_FLOW_FAILED,
    EXIT_STARTUP_FAILED,
    EXIT_STOPPED,
    JobStatus,
    read_status,
    write_status,
)
from loom_dagster.core.redact import redact_text as redact
from tests.support.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
IMPORT_PATH = "tests.integration.test_runtime:runtime_flow"
FAIL_AT_START = "LOOM_DAGSTER_RT_TEST_FAIL_AT_START"


# --------------------------------------------------------------------------- the flow


class RtEvent(LoomStruct):
    """Input message (explicit wire name: the same in the test and the job process)."""

    __loom_message_type__ = "loom_dagster.tests.runtime.RtEvent"
    id: int
    name: str


class RtRow(LoomStruct):
    """Row written to Delta."""

    __loom_message_type__ = "loom_dagster.tests.runtime.RtRow"
    id: int
    name: str
    length: int


class ToRow(RecordStep[RtEvent, RtRow]):
    """Copy the event; ``name == "poison"`` fails (-> DLQ); the env var makes the step fail to build."""

    def __init__(self) -> None:
        if os.environ.get(FAIL_AT_START):
            raise RuntimeError(f"{FAIL_AT_START} is set: this step refuses to start")

    def execute(self, message: Message[RtEvent], **kwargs: object) -> RtRow:
        if message.payload.name == "poison":
            raise ValueError("poison message")
        return RtRow(id=message.payload.id, name=message.payload.name, length=len(message.payload.name))


runtime_flow: StreamFlow[RtEvent, RtRow] = StreamFlow(
    name="rt_test",
    source=FromTopic("events", payload=RtEvent),
    process=Process(ToRow, IntoTable(RtRow, name="rt_delta", backend=Backend.DELTA)),
    errors=IntoTopic("rt_dlq"),
)


# --------------------------------------------------------------------------- helpers


def write_config(directory: Path, bootstrap: str, topic: str, *, group: str | None = None) -> Path:
    """A loom config for ``runtime_flow``: big Delta buffer, 1 s max age, at-least-once."""
    config = {
        "kafka": {
            "consumer": {
                "brokers": [bootstrap],
                "group_id": group or f"rt-{topic}",
                "topics": [topic],
                "delivery": "at_least_once",
                "auto_offset_reset": "earliest",
            },
            "producer": {"brokers": [bootstrap], "client_id": "rt-test"},
            "producers": {"rt_dlq": {"brokers": [bootstrap], "topic": f"{topic}.dlq"}},
        },
        "streaming": {
            "runtime": {"workers_per_process": 1},
            "sinks": {
                "rt_delta": {
                    "uri": str(directory / "delta"),
                    "table": "rt_rows",
                    "mode": "append",
                    "buffer_max_records": 1_000_000,
                    "buffer_max_age_s": 1,
                },
            },
        },
    }
    path = directory / "loom.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def produce(bootstrap: str, topic: str, events: list[tuple[int, str]], partitions: int = 1) -> None:
    """Produce loom envelopes of ``RtEvent`` (round-robin over ``partitions``)."""
    from confluent_kafka import Producer
    from loom.streaming.kafka._codec import MsgspecCodec
    from loom.streaming.kafka._message import MessageDescriptor, build_message

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    codec: MsgspecCodec[RtEvent] = MsgspecCodec()
    descriptor = MessageDescriptor(message_type=RtEvent.loom_message_type(), message_version=1)
    for ident, name in events:
        value = codec.encode(build_message(RtEvent(id=ident, name=name), descriptor))
        producer.produce(topic, value, partition=ident % partitions)
    assert producer.flush(30) == 0


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int = 1) -> list[int]:
    """The consumer group's committed offsets (negative = none)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        return [tp.offset for tp in consumer.committed(parts, timeout=10)]
    finally:
        consumer.close()


def delta_ids(table_dir: Path) -> list[int]:
    """Ids in the Delta table, read with deltalake in a child process (see module docstring)."""
    code = (
        "import json, os, sys, deltalake\n"
        "ids = deltalake.DeltaTable(sys.argv[1]).to_pyarrow_table().column('id').to_pylist()\n"
        "sys.stdout.write(json.dumps(ids)); sys.stdout.flush(); os._exit(0)\n"
    )
    if not (table_dir / "_delta_log").exists():
        return []
    done = subprocess.run(
        [sys.executable, "-c", code, str(table_dir)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


class Job:
    """One runtime process started by a test (stopped by PID at teardown if still alive)."""

    def __init__(self, proc: subprocess.Popen[str], status_file: Path, log_file: Path, spawned_at: float):
        self.proc = proc
        self.status_file = status_file
        self.log_file = log_file
        self.spawned_at = spawned_at

    def status(self) -> JobStatus | None:
        return read_status(self.status_file)

    def wait_status(self, check: Callable[[JobStatus], bool], what: str, timeout: float = 60.0) -> JobStatus:
        def probe() -> JobStatus | None:
            status = self.status()
            if status is not None and check(status):
                return status
            assert self.proc.poll() is None, (
                f"job exited ({self.proc.returncode}) while waiting for {what}:\n{self.log_tail()}"
            )
            return None

        return wait_for(probe, timeout, what)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def our_lines(self) -> list[str]:
        return [
            line
            for line in self.log_file.read_text(errors="replace").splitlines()
            if line.startswith("loom-dagster runtime:")
        ]


@pytest.fixture
def start_job(tmp_path: Path) -> Iterator[Callable[..., Job]]:
    """Start ``python -m loom_dagster.runtime`` processes; kill leftovers by PID afterwards."""
    jobs: list[Job] = []

    def start(
        config: Path,
        *extra: str,
        tag: str = "job",
        env: dict[str, str] | None = None,
        import_path: str = IMPORT_PATH,
        ignore_sigint: bool = False,
    ) -> Job:
        status_file = tmp_path / f"{tag}.status.json"
        log_file = tmp_path / f"{tag}.log"
        args = [
            sys.executable,
            "-m",
            "loom_dagster.runtime",
            "--import-path",
            import_path,
            "--config",
            str(config),
            "--environment",
            "development",
            "--status-file",
            str(status_file),
            "--sys-path",
            str(REPO),
            *extra,
        ]
        child_env = {**os.environ, **(env or {})}
        preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
        with log_file.open("w") as log:
            spawned = time.time()
            proc = subprocess.Popen(
                args,
                cwd=REPO,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=preexec,
            )
        job = Job(proc, status_file, log_file, spawned)
        jobs.append(job)
        return job

    yield start
    for job in jobs:
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait(30)


@pytest.fixture(scope="module")
def broker() -> Iterator[Any]:
    """A real broker for this module (the one in $LOOM_DAGSTER_KAFKA_BOOTSTRAP if set)."""
    from loom_dagster.dev.kafka import KafkaBroker

    with KafkaBroker() as running:
        yield running


def new_topic(bootstrap: str, partitions: int = 1) -> str:
    """A fresh input topic (and its DLQ topic)."""
    from loom_dagster.dev.kafka import create_topics

    topic = f"rt-{uuid.uuid4().hex[:10]}"
    create_topics(bootstrap, [topic, f"{topic}.dlq"], partitions=partitions)
    return topic


# --------------------------------------------------------------------------- no broker needed


def test_status_module_imports_neither_loom_nor_bytewax() -> None:
    code = (
        "import sys, loom_dagster.core.job.status, loom_dagster.runtime; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('loom', 'bytewax', 'deltalake')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_read_status_tolerates_missing_partial_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    assert read_status(path) is None
    path.write_text('{"flow": "x", "pid": 1, "sta')
    assert read_status(path) is None
    path.write_text('{"something": "else"}')
    assert read_status(path) is None
    status = JobStatus(flow="orders", pid=42, host="h", state="running", connected_at=1.5, records_in=3)
    write_status(path, status)
    again = read_status(path)
    assert again == status and again.connected and not again.is_final
    assert again.is_stale(max_age_s=5, now=(again.started_at + 100))
    assert not list(tmp_path.glob(".*.tmp")), "the temp file must be renamed away"


def test_redact_masks_url_passwords_and_password_params() -> None:
    text = "http://default:s3cret@ch:8123/db?password=hunter2 sasl.password=abc user@host"
    out = redact(text)
    assert "s3cret" not in out and "hunter2" not in out and "abc" not in out
    assert "http://default:***@ch:8123/db" in out and "user@host" in out


def test_bad_arguments_exit_2_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loom_dagster.runtime",
            "--import-path",
            "a.b:c",
            "--config",
            str(tmp_path),
            "--status-file",
            str(tmp_path / "s.json"),
            "--process-id",
            "2",
            "--addresses",
            "127.0.0.1:1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_BAD_INPUT
    assert "loom-dagster runtime: exit 2: bad arguments: --process-id 2 is not an index" in done.stderr
    assert not (tmp_path / "s.json").exists()


def test_bad_import_path_exits_2_and_records_failed(tmp_path: Path, start_job: Callable[..., Job]) -> None:
    config = write_config(tmp_path, "127.0.0.1:9", "unused")
    job = start_job(config, import_path="tests.no_such_module:flow")
    assert job.proc.wait(60) == EXIT_BAD_INPUT
    lines = job.our_lines()
    assert lines and "exit 2" in lines[-1] and "No module named 'tests.no_such_module'" in lines[-1]
    status = job.status()
    assert status is not None and status.state == "failed" and status.exit_code == EXIT_BAD_INPUT
    assert status.error is not None and "cannot load flow" in status.error
    assert status.connected_at is None


def test_step_failing_at_startup_exits_2(tmp_path: Path, start_job: Callable[..., Job]) -> None:
    config = write_config(tmp_path, "127.0.0.1:9", "unused")
    job = start_job(config, env={FAIL_AT_START: "1"})
    assert job.proc.wait(60) == EXIT_BAD_INPUT
    status = job.status()
    assert status is not None and status.state == "failed" and status.exit_code == EXIT_BAD_INPUT
    assert status.error is not None and "cannot compile flow 'rt_test'" in status.error
    assert FAIL_AT_START in status.error
    assert "exit 2" in job.our_lines()[-1]


def test_unreachable_broker_exits_3_without_connecting(tmp_path: Path, start_job: Callable[..., Job]) -> None:
    from loom_dagster.dev.kafka import pick_free_ports

    config = write_config(tmp_path, f"127.0.0.1:{pick_free_ports(1)[0]}", "orders")
    job = start_job(config)
    assert job.proc.wait(90) == EXIT_STARTUP_FAILED
    status = job.status()
    assert status is not None and status.state == "failed" and status.connected_at is None
    assert status.error is not None and "Failed to get metadata" in status.error
    assert "exit 3" in job.our_lines()[-1]


# --------------------------------------------------------------------------- real broker


@pytest.mark.kafka
def test_consumes_into_delta_then_sigterm_drains_commits_and_restart_adds_nothing(
    tmp_path: Path, broker: Any, start_job: Callable[..., Job]
) -> None:
    bootstrap = broker.bootstrap_servers
    topic = new_topic(bootstrap)
    total = 300
    produce(bootstrap, topic, [(i, f"name-{i}") for i in range(total)] + [(total, "poison")])
    config = write_config(tmp_path, bootstrap, topic)

    job = start_job(config, tag="first")
    status = job.wait_status(lambda s: s.connected_at is not None, "connected_at")
    assert status.state == "running" and status.pid == job.proc.pid and status.flow == "rt_test"
    status = job.wait_status(lambda s: s.records_in == total + 1 and s.errors == 1, "all records counted")
    assert status.last_poll_at is not None and status.heartbeat_at is not None
    time.sleep(0.5)
    staged = total - len(delta_ids(tmp_path / "delta"))

    assert job.stop(signal.SIGTERM) == EXIT_STOPPED
    final = job.status()
    assert final is not None and final.state == "stopped" and final.exit_code == EXIT_STOPPED
    assert final.sinks["rt_delta"].records == total and final.records_out == total
    ids = delta_ids(tmp_path / "delta")
    assert sorted(ids) == list(range(total)), f"{staged} rows were staged at SIGTERM"
    assert committed_offsets(bootstrap, f"rt-{topic}", topic) == [total + 1]

    again = start_job(config, tag="second")
    again.wait_status(lambda s: s.connected_at is not None, "connected_at after restart")
    time.sleep(2.0)
    assert again.stop(signal.SIGTERM) == EXIT_STOPPED
    assert again.status() is not None and again.status().records_in == 0  # type: ignore[union-attr]
    assert sorted(delta_ids(tmp_path / "delta")) == list(range(total)), "a restart must not duplicate rows"


@pytest.mark.kafka
def test_sigint_drains_even_when_inherited_as_ignored(
    tmp_path: Path, broker: Any, start_job: Callable[..., Job]
) -> None:
    bootstrap = broker.bootstrap_servers
    topic = new_topic(bootstrap)
    produce(bootstrap, topic, [(i, f"n{i}") for i in range(50)])
    job = start_job(write_config(tmp_path, bootstrap, topic), ignore_sigint=True)
    job.wait_status(lambda s: s.records_in == 50, "50 records in")
    assert job.stop(signal.SIGINT) == EXIT_STOPPED
    assert sorted(delta_ids(tmp_path / "delta")) == list(range(50))
    assert any("SIGINT received: draining" in line for line in job.our_lines())


@pytest.mark.kafka
def test_two_process_cluster_on_loopback(tmp_path: Path, broker: Any, start_job: Callable[..., Job]) -> None:
    from loom_dagster.dev.kafka import pick_free_ports

    bootstrap = broker.bootstrap_servers
    topic = new_topic(bootstrap, partitions=2)
    total = 200
    produce(bootstrap, topic, [(i, f"n{i}") for i in range(total)], partitions=2)
    config = write_config(tmp_path, bootstrap, topic)
    addresses = ",".join(f"127.0.0.1:{port}" for port in pick_free_ports(2))
    jobs = [
        start_job(config, "--process-id", str(i), "--addresses", addresses, tag=f"p{i}") for i in range(2)
    ]
    statuses = [
        job.wait_status(lambda s: s.connected_at is not None, f"process {i} connected")
        for i, job in enumerate(jobs)
    ]
    assert [s.process_id for s in statuses] == [0, 1]
    wait_for(
        lambda: sum((job.status() or statuses[0]).records_in for job in jobs) == total, 60, "all records"
    )
    for job in jobs:
        job.proc.send_signal(signal.SIGTERM)
    assert [job.proc.wait(60) for job in jobs] == [EXIT_STOPPED, EXIT_STOPPED]
    assert sorted(delta_ids(tmp_path / "delta")) == list(range(total))
    assert sum(committed_offsets(bootstrap, f"rt-{topic}", topic, partitions=2)) == total


@pytest.mark.kafka
def test_cluster_signalled_partly_gives_up_after_drain_timeout(
    tmp_path: Path, broker: Any, start_job: Callable[..., Job]
) -> None:
    """Only one process of a cluster signalled: it cannot finish its drain alone (bytewax waits for
    its peer), so the watchdog ends it with exit 4; the peer, stopped later, cannot drain either (its
    link to the dead process panics): it exits 1 with a final record saying so, instead of hanging or
    claiming a clean stop."""
    from loom_dagster.dev.kafka import pick_free_ports

    bootstrap = broker.bootstrap_servers
    topic = new_topic(bootstrap, partitions=2)
    produce(bootstrap, topic, [(i, f"n{i}") for i in range(40)], partitions=2)
    config = write_config(tmp_path, bootstrap, topic)
    addresses = ",".join(f"127.0.0.1:{port}" for port in pick_free_ports(2))
    jobs = [
        start_job(
            config, "--process-id", str(i), "--addresses", addresses, "--drain-timeout", "3", tag=f"p{i}"
        )
        for i in range(2)
    ]
    for i, job in enumerate(jobs):
        job.wait_status(lambda s: s.connected_at is not None, f"process {i} connected")
    assert jobs[0].stop(signal.SIGTERM, timeout=30) == EXIT_DRAIN_TIMEOUT
    first = jobs[0].status()
    assert first is not None and first.state == "failed" and first.exit_code == EXIT_DRAIN_TIMEOUT
    assert "exit 4" in jobs[0].our_lines()[-1]
    assert jobs[1].proc.poll() is None, "the peer must still run until it is signalled"
    code = jobs[1].stop(signal.SIGTERM, timeout=30)
    second = jobs[1].status()
    assert code == EXIT_FLOW_FAILED, (code, second)
    assert second is not None and second.state == "failed" and second.exit_code == EXIT_FLOW_FAILED
    assert second.error is not None and second.error.startswith("failed while draining after SIGTERM"), second
    assert "exit 1" in jobs[1].our_lines()[-1]
