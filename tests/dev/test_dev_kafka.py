"""The dev Kafka broker: produce/consume, survive a restart, and the detached CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from loom_dagster.dev.kafka import ENV_BOOTSTRAP, KafkaBroker, create_topics, pid_is_broker

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def broker() -> Iterator[KafkaBroker]:
    """A broker for this module (the one in $LOOM_DAGSTER_KAFKA_BOOTSTRAP if set)."""
    with KafkaBroker() as running:
        yield running


def produce(bootstrap: str, topic: str, values: list[str], producer: Producer | None = None) -> None:
    """Produce ``values`` (key = value) and fail unless every delivery succeeded."""
    producer = producer or Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    errors: list[str] = []

    def on_delivery(err: object, _msg: object) -> None:
        if err is not None:
            errors.append(str(err))

    for value in values:
        producer.produce(topic, key=value.encode(), value=value.encode(), on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(60) == 0, "messages still in flight after 60 s"
    assert errors == []


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 60.0) -> list[str]:
    """Read ``topic`` from the beginning with a fresh group until ``expected`` messages arrived."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    values: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(values) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            value = msg.value()
            assert value is not None
            values.append(value.decode())
    finally:
        consumer.close()
    return values


def partitions_of(bootstrap: str, topic: str) -> int:
    """Partition count of ``topic`` as the broker reports it."""
    from confluent_kafka.admin import AdminClient

    return len(
        AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10).topics[topic].partitions
    )


@pytest.fixture(scope="module")
def filled_topic(broker: KafkaBroker) -> Iterator[tuple[str, Producer, list[str]]]:
    """A fresh 3-partition topic holding 100 messages, and the producer that wrote them."""
    topic = f"dev-kafka-{uuid.uuid4().hex[:8]}"
    create_topics(broker.bootstrap_servers, [topic], partitions=3)
    create_topics(broker.bootstrap_servers, [topic], partitions=3)  # idempotent
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "acks": "all"})
    values = [f"m{i:03d}" for i in range(100)]
    produce(broker.bootstrap_servers, topic, values, producer)
    yield topic, producer, values


def test_produce_and_consume(broker: KafkaBroker, filled_topic: tuple[str, Producer, list[str]]) -> None:
    topic, _, values = filled_topic
    assert partitions_of(broker.bootstrap_servers, topic) == 3
    assert sorted(consume_all(broker.bootstrap_servers, topic, 100)) == values


def test_restart_keeps_messages(broker: KafkaBroker, filled_topic: tuple[str, Producer, list[str]]) -> None:
    if broker.external:
        pytest.skip(f"{ENV_BOOTSTRAP} is set: an external broker is not restarted")
    topic, producer, values = filled_topic
    old_pid, bootstrap = broker.pid, broker.bootstrap_servers
    broker.restart()
    assert broker.bootstrap_servers == bootstrap
    assert broker.pid not in (None, old_pid)

    assert sorted(consume_all(bootstrap, topic, 100)) == values
    more = [f"n{i:03d}" for i in range(10)]
    produce(bootstrap, topic, more, producer)  # the pre-restart producer reconnects
    assert sorted(consume_all(bootstrap, topic, 110)) == sorted(values + more)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "loom_dagster.dev.kafka", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.mark.skipif(bool(os.environ.get(ENV_BOOTSTRAP)), reason="uses an external broker")
def test_cli_detached_start_status_stop(tmp_path: Path) -> None:
    state = tmp_path / "state"
    started = _cli("start", "--state-dir", str(state))
    assert started.returncode == 0, started.stderr
    record = json.loads((state / "kafka.json").read_text())
    pid = record["pid"]
    try:
        assert started.stdout.strip() == record["bootstrap"]
        assert pid_is_broker(pid, record["start_ticks"])  # outlived the CLI process
        create_topics(record["bootstrap"], ["cli-topic"])
        status = _cli("status", "--state-dir", str(state))
        assert status.returncode == 0, status.stdout + status.stderr
        assert json.loads(status.stdout)["reachable"] is True
    finally:
        stopped = _cli("stop", "--state-dir", str(state))
    assert stopped.returncode == 0, stopped.stderr
    assert not pid_is_broker(pid, record["start_ticks"])
    assert not Path(record["data_dir"]).exists()
    assert not (state / "kafka.json").exists()
    assert _cli("status", "--state-dir", str(state)).returncode == 1
