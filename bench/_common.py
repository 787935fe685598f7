"""Shared bench helpers: a broker (started here unless LOOM_DAGSTER_KAFKA_BOOTSTRAP is set) and a
committed-offset poller."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    """Sum of the group's committed offsets over the topic's partitions (0 where none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return sum(max(tp.offset, 0) for tp in parts)
    except KafkaException:  # e.g. NOT_COORDINATOR while the broker loads the offsets topic: ask again
        return 0
    finally:
        consumer.close()


def wait_committed(
    bootstrap: str, group: str, topic: str, partitions: int, target: int, timeout_s: float
) -> tuple[float, int]:
    """Block until the group has committed at least *target* offsets in total; return (when, how many)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        committed = committed_total(bootstrap, group, topic, partitions)
        if committed >= target:
            return time.monotonic(), committed
        time.sleep(0.05)
    raise TimeoutError(f"group {group} did not commit {target} offsets in {timeout_s}s")
