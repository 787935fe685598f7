"""AdminClient requests shared by the lag fetch and the offset snapshot, each ONE call for many
partitions or groups, and a meter of the requests librdkafka really sent. No Dagster here."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

_STATS_WAIT_S = 0.5
_TS = re.compile(r'"ts":\s*(\d+)')


Committed = dict[str, dict[tuple[str, int], int | str | None]]
"""Group -> partition -> committed offset, ``None`` (no commit) or an error text."""


def describe_topics(admin: Any, names: list[str], timeout_s: float) -> dict[str, tuple[int, ...] | str]:
    """Partition ids of every source topic, or its metadata error, in ONE Metadata request.

    ``describe_topics`` asks only for our topics (``list_topics()`` would build Python objects for every
    partition of the cluster) and never auto-creates a deleted topic. Raises ``ConnectionError`` when no
    topic got an answer from the cluster (unreachable, authentication failure, timeout).
    """
    from confluent_kafka import TopicCollection

    futures = admin.describe_topics(TopicCollection(names), request_timeout=timeout_s)
    out: dict[str, tuple[int, ...] | str] = {}
    failures: list[str] = []
    for name, future in futures.items():
        try:
            out[name] = tuple(sorted(p.id for p in future.result().partitions))
        except Exception as exc:  # KafkaException per topic
            text = str(exc)
            out[name] = text
            if "UNKNOWN_TOPIC" not in text:
                failures.append(text)
    if failures and len(failures) == len(out):
        raise ConnectionError(failures[0])
    return out


def group_offsets(admin: Any, wanted: dict[str, set[tuple[str, int]]], timeout_s: float) -> Committed:
    """One ``list_consumer_group_offsets`` call per group (the client refuses several), run concurrently."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

    futures = {}
    for group, parts in wanted.items():
        request = [ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in sorted(parts)])]
        futures[group] = admin.list_consumer_group_offsets(request, request_timeout=timeout_s)[group]
    out: Committed = {}
    for group, future in futures.items():
        try:
            result = future.result()
        except Exception as exc:
            out[group] = {tp: f"group offsets failed: {exc}" for tp in wanted[group]}
            continue
        out[group] = {
            (tp.topic, tp.partition): (str(tp.error) if tp.error else (tp.offset if tp.offset >= 0 else None))
            for tp in result.topic_partitions
        }
    return out


def list_offsets(
    admin: Any, partitions: Sequence[tuple[str, int]], which: str, timeout_s: float
) -> dict[tuple[str, int], int | str]:
    """The ``earliest`` (low watermark) or ``latest`` (read-committed end) offset of every partition in ONE
    ``list_offsets`` call; an ``str`` value is that partition's error."""
    from confluent_kafka import IsolationLevel, TopicPartition
    from confluent_kafka.admin import OffsetSpec

    if not partitions:
        return {}
    spec = OffsetSpec.earliest() if which == "earliest" else OffsetSpec.latest()
    request = {TopicPartition(t, p): spec for t, p in partitions}
    futures = admin.list_offsets(
        request, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=timeout_s
    )
    out: dict[tuple[str, int], int | str] = {}
    for tp, future in futures.items():
        try:
            out[(tp.topic, tp.partition)] = int(future.result().offset)
        except Exception as exc:
            label = "end" if which == "latest" else "earliest"
            out[(tp.topic, tp.partition)] = f"{label} offset failed: {exc}"
    return out


class StatsMeter:
    """Counts the requests a librdkafka client really sent, from its statistics (``tx`` per broker).

    Statistics arrive every few milliseconds and, for a consumer, hold every assigned partition: only the
    latest text is kept, and it is parsed when asked for.
    """

    def __init__(self) -> None:
        self._raw: str | None = None
        self._parsed: dict[str, Any] | None = None

    def on_stats(self, raw: str) -> None:
        """librdkafka ``stats_cb``."""
        self._raw, self._parsed = raw, None

    @property
    def _latest(self) -> dict[str, Any] | None:
        if self._parsed is None and self._raw is not None:
            self._parsed = json.loads(self._raw)
        return self._parsed

    def _taken_at(self) -> float:
        """The latest statistics' ``ts`` in seconds (a top-level key near the start of the text)."""
        found = _TS.search(self._raw or "", 0, 400)
        return int(found.group(1)) / 1e6 if found else 0.0

    def settle(self, client: Any) -> None:
        """Wait for statistics taken after now (librdkafka's ``ts`` is CLOCK_MONOTONIC, like ``time.monotonic``)."""
        done = time.monotonic()
        deadline = done + _STATS_WAIT_S
        while time.monotonic() < deadline:
            client.poll(0.005)
            if self._raw is not None and self._taken_at() >= done:
                return

    def total(self) -> int:
        """Requests sent, over every broker connection."""
        brokers = (self._latest or {}).get("brokers", {})
        return sum(int(b.get("tx", 0)) for b in brokers.values())

    def by_api(self) -> Counter[str]:
        """Requests by API name (librdkafka does not break down every API; the rest is ``other``)."""
        out: Counter[str] = Counter()
        for broker in (self._latest or {}).get("brokers", {}).values():
            named = {k: int(v) for k, v in (broker.get("req") or {}).items() if v}
            out.update(named)
            rest = int(broker.get("tx", 0)) - sum(named.values())
            if rest > 0:
                out["other"] += rest
        return out
