"""Delay in seconds: how old the oldest unconsumed message of each lagging partition is, i.e. now minus
the timestamp of the message at the group's committed offset (the next one the group would read).

ONE ``confluent_kafka.Consumer`` per cluster and tick reads every lagging partition at once, built from
the cluster's own client config (``KafkaCluster.client_config``: PLAINTEXT, SSL and SASL alike). It never
joins, and never touches, the flows' groups: it only assigns partitions at explicit offsets (``assign``, no
``subscribe``, so no JoinGroup; no OffsetFetch), under a random ``group.id`` of its own (the Python client
requires one) with ``enable.auto.commit`` off, and it never commits.

Bounded per tick:

* **partitions**: at most ``max_partitions`` are read (``KafkaLagSettings.delay_max_partitions``), chosen
  round-robin over the flows, each flow's most lagging partition first; the rest are *unknown*.
* **time**: one deadline for the whole read (``KafkaLagSettings.delay_timeout_s``); partitions that gave
  no message by then are *unknown* (never 0).
* **requests**: one ``Fetch`` per partition-leader broker per round for all assigned partitions (plus
  the client's handshake, metadata and coordinator lookup); a partition is paused as soon as its first
  message arrives, so it is fetched no further, and ``max.partition.fetch.bytes`` is small (librdkafka
  grows it only for a larger first record batch).

A partition whose end is reached before any message (``PARTITION_EOF``: only aborted transactional
records or control markers were left) has nothing to consume: delay 0. A committed offset already
removed by retention reads from the earliest offset still there (``auto.offset.reset=earliest``): the
oldest unconsumed message that still exists. Timestamps are the records' own (producer ``CreateTime``
or broker ``LogAppendTime``); a producer clock ahead of ours is clamped to 0. No Dagster here.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from loom_dagster.core.kafka.admin import StatsMeter
from loom_dagster.core.kafka.cluster import KafkaCluster

GROUP_PREFIX = "loom-dagster-delay-"
"""Prefix of the reader's own random ``group.id`` (never joined, never committed to)."""
PARTITION_FETCH_BYTES = 64 * 1024
"""``max.partition.fetch.bytes`` of the reader: only the first record of each partition is needed."""
FETCH_BYTES = 8 * 1024 * 1024
"""``fetch.max.bytes`` of the reader: one Fetch response at most (partitions left out come next round)."""

Position = tuple[str, int, int]
"""``(topic, partition, offset)``: the message to read (the first one at or after that offset)."""


class DelayReading(msgspec.Struct, frozen=True):
    """The first message at or after one position: its timestamp and when it was read (epoch seconds),
    or why there is none (``error``: unknown delay). ``eof``: nothing left to consume there (delay 0)."""

    timestamp: float | None = None
    read_at: float | None = None
    offset: int | None = None
    eof: bool = False
    error: str | None = None

    @property
    def delay_s(self) -> float | None:
        """Seconds the message has waited when it was read (0 with nothing to consume; ``None``: unknown)."""
        if self.eof:
            return 0.0
        if self.timestamp is None or self.read_at is None:
            return None
        return max(0.0, self.read_at - self.timestamp)


class ClusterDelays(msgspec.Struct, frozen=True):
    """One cluster's read: the reading of every position asked for, and its cost."""

    bootstrap: str
    readings: Mapping[Position, DelayReading]
    asked: int
    read: int
    seconds: float
    requests: int = 0
    by_api: tuple[tuple[str, int], ...] = ()
    error: str | None = None


class DelayFetch(msgspec.Struct, frozen=True):
    """Every cluster's read of one tick, plus the positions left out by the partition cap."""

    clusters: Mapping[KafkaCluster, ClusterDelays]
    skipped: frozenset[tuple[KafkaCluster, Position]]
    seconds: float
    max_partitions: int
    timeout_s: float

    def reading(self, cluster: KafkaCluster, position: Position) -> DelayReading:
        """The reading of one position (an ``error`` one when it was not read)."""
        if (cluster, position) in self.skipped:
            return DelayReading(error=f"not read: over delay_max_partitions ({self.max_partitions})")
        found = self.clusters.get(cluster)
        if found is None:
            return DelayReading(error="not read")
        return found.readings.get(position) or DelayReading(error="not read")

    @property
    def asked(self) -> int:
        """Positions wanted this tick (read or not)."""
        return sum(c.asked for c in self.clusters.values()) + len(self.skipped)

    @property
    def read(self) -> int:
        """Positions whose delay is known."""
        return sum(c.read for c in self.clusters.values())

    @property
    def requests(self) -> int:
        """Broker requests the readers sent (0 unless counted)."""
        return sum(c.requests for c in self.clusters.values())

    def by_api(self) -> dict[str, int]:
        """Broker requests by API name, over every cluster (empty unless counted)."""
        total: Counter[str] = Counter()
        for cluster in self.clusters.values():
            total.update(dict(cluster.by_api))
        return dict(sorted(total.items()))


def fetch_delays(
    wanted: Sequence[tuple[KafkaCluster, Position]],
    *,
    timeout_s: float = 5.0,
    max_partitions: int = 2_000,
    count_requests: bool = False,
) -> DelayFetch:
    """Read the first message at or after every wanted position, one consumer per cluster, all clusters
    at once, within *timeout_s* in total; only the first *max_partitions* positions (in the given order:
    put the most important first) are read, the others are reported skipped.

    *count_requests* turns on librdkafka statistics to count the requests sent (the bench and tests;
    with many partitions the statistics themselves cost CPU, so the sensor leaves it off). Never
    raises for broker trouble: errors end up in the readings.
    """
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    unique = list(dict.fromkeys(wanted))
    chosen, rest = unique[: max(0, max_partitions)], unique[max(0, max_partitions) :]
    by_cluster: dict[KafkaCluster, list[Position]] = defaultdict(list)
    for cluster, position in chosen:
        by_cluster[cluster].append(position)
    jobs = list(by_cluster.items())
    if len(jobs) <= 1:
        done = [_read_cluster(c, ps, deadline, timeout_s, count_requests) for c, ps in jobs]
    else:
        with ThreadPoolExecutor(max_workers=min(8, len(jobs)), thread_name_prefix="loom-delay") as pool:
            done = list(
                pool.map(lambda job: _read_cluster(job[0], job[1], deadline, timeout_s, count_requests), jobs)
            )
    return DelayFetch(
        clusters={cluster: result for (cluster, _), result in zip(jobs, done, strict=True)},
        skipped=frozenset(rest),
        seconds=time.perf_counter() - started,
        max_partitions=max_partitions,
        timeout_s=timeout_s,
    )


def reader_config(cluster: KafkaCluster) -> dict[str, Any]:
    """The reader's librdkafka config: the cluster's own (security included) + a consumer that never
    commits, stops at the first message of each partition and sees what loom's consumer sees."""
    return {
        **cluster.client_config(),
        "group.id": f"{GROUP_PREFIX}{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "enable.partition.eof": True,
        "max.partition.fetch.bytes": PARTITION_FETCH_BYTES,
        "fetch.max.bytes": FETCH_BYTES,
        "fetch.wait.max.ms": 100,
    }


def _read_cluster(
    cluster: KafkaCluster, positions: list[Position], deadline: float, timeout_s: float, count_requests: bool
) -> ClusterDelays:
    """One consumer: assign every partition at its lowest wanted offset, poll until each wanted offset
    has its first message (then seek to the partition's next wanted offset, or pause it) or the deadline."""
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    started = time.perf_counter()
    pending: dict[tuple[str, int], list[int]] = defaultdict(list)
    for topic, partition, offset in positions:
        pending[(topic, partition)].append(offset)
    for wanted in pending.values():
        wanted.sort()
    readings: dict[Position, DelayReading] = {}
    errors: dict[tuple[str, int], str] = {}
    sought: set[tuple[str, int]] = set()
    client_error: list[str] = []  # the latest client-level error (connection, authentication)

    def on_error(err: Any) -> None:
        client_error[:] = [str(err)]

    meter = StatsMeter() if count_requests else None
    conf = reader_config(cluster)
    conf["error_cb"] = on_error
    if meter is not None:
        conf.update({"statistics.interval.ms": 10, "stats_cb": meter.on_stats})
    try:
        consumer = Consumer(conf)
    except Exception as exc:  # a bad client config: every position unknown, with the reason
        return _unread(cluster, positions, f"delay reader not created: {exc}", started)
    try:
        consumer.assign([TopicPartition(t, p, wanted[0]) for (t, p), wanted in pending.items()])
        while pending and time.monotonic() < deadline:
            msg = consumer.poll(max(0.0, min(0.1, deadline - time.monotonic())))
            if msg is None:
                continue
            key = (msg.topic() or "", msg.partition() or 0)
            found = pending.get(key)
            if found is None:
                continue
            offsets = found
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    for offset in offsets:
                        readings[(*key, offset)] = DelayReading(read_at=time.time(), eof=True)
                    del pending[key]
                    consumer.pause([TopicPartition(*key)])
                else:
                    errors[key] = str(error)
                continue
            at = msg.offset() or 0
            if key in sought and at < offsets[0]:  # fetched before the seek
                continue
            kind, stamp = msg.timestamp()
            read_at = time.time()
            reading = (
                DelayReading(stamp / 1000.0, read_at, at)
                if kind != 0 and stamp >= 0  # 0: TIMESTAMP_NOT_AVAILABLE
                else DelayReading(read_at=read_at, offset=at, error="the message has no timestamp")
            )
            while offsets and offsets[0] <= at:
                readings[(*key, offsets.pop(0))] = reading
            if offsets:  # another group's position on the same partition, further on
                try:
                    consumer.seek(TopicPartition(*key, offsets[0]))
                    sought.add(key)
                    continue
                except KafkaException as exc:
                    for offset in offsets:
                        readings[(*key, offset)] = DelayReading(error=f"seek failed: {exc}")
            del pending[key]
            consumer.pause([TopicPartition(*key)])
        if meter is not None:
            meter.settle(consumer)
    finally:
        consumer.close()
    why = f"not read within delay_timeout_s ({timeout_s:g} s)"
    for (topic, partition), offsets in pending.items():
        reason = errors.get((topic, partition)) or (client_error[0] if client_error else None)
        for offset in offsets:
            readings[(topic, partition, offset)] = DelayReading(error=f"{why}: {reason}" if reason else why)
    return ClusterDelays(
        bootstrap=cluster.bootstrap,
        readings=readings,
        asked=len(positions),
        read=sum(r.delay_s is not None for r in readings.values()),
        seconds=time.perf_counter() - started,
        requests=meter.total() if meter is not None else 0,
        by_api=tuple(sorted(meter.by_api().items())) if meter is not None else (),
    )


def _unread(cluster: KafkaCluster, positions: list[Position], reason: str, started: float) -> ClusterDelays:
    return ClusterDelays(
        bootstrap=cluster.bootstrap,
        readings={p: DelayReading(error=reason) for p in positions},
        asked=len(positions),
        read=0,
        seconds=time.perf_counter() - started,
        error=reason,
    )
