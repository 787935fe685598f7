"""End and committed offsets of every source partition of many lag targets, one batch per cluster: the
one fetch behind the ``kafka_lag`` sensor and check, ``loom-dagster status`` and ``bench/lag_sensor.py``,
the same for PLAINTEXT and secured (SSL/SASL) clusters.

Flows are grouped by cluster (bootstrap servers + security / connection settings). Per cluster, through
one librdkafka ``AdminClient`` (``loom_dagster.core.kafka.admin``): connection handshake (``ApiVersion``), its
bootstrap ``Metadata``, one ``Metadata`` for all source topics (``describe_topics``), one ``ListOffsets``
per partition leader broker for the end offsets of every source partition, and the committed offsets of
every group: one ``list_consumer_group_offsets`` call per group (librdkafka accepts one group per call),
all in flight at once, i.e. one ``FindCoordinator`` + one ``OffsetFetch`` per group.

On a single-broker cluster that is 4 requests + 2 per group (6 for one flow, 404 for 200, 2,004 for 1,000;
librdkafka sometimes adds a bootstrap ``Metadata``). A batched wire-protocol fetch (one ``OffsetFetch``
for every group, KIP-709) kept it at 7 whatever the number of groups but served PLAINTEXT clusters only:
removed. The count is measured, not assumed: librdkafka's own per-broker request counters (its
statistics, ``tx``). Not counted: one TCP connect per cluster that fails fast on a closed port before any
Kafka client is created.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from loom_dagster.core.kafka.admin import Committed, StatsMeter, describe_topics, group_offsets, list_offsets
from loom_dagster.core.kafka.cluster import PROBE_TIMEOUT_S, KafkaCluster, LagTarget, probe
from loom_dagster.core.kafka.isolation import in_child_process


class PartitionOffsets(msgspec.Struct, frozen=True):
    """End offset and the group's committed offset of one partition (``None``: unknown / no commit)."""

    topic: str
    partition: int
    end: int | None
    committed: int | None
    error: str | None = None


class TargetOffsets(msgspec.Struct, frozen=True):
    """What one fetch found for one target."""

    target: LagTarget
    partitions: tuple[PartitionOffsets, ...] = ()
    missing_topics: tuple[str, ...] = ()
    unreachable: str | None = None
    taken_at: float = 0.0


class ClusterFetch(msgspec.Struct, frozen=True):
    """Cost of one cluster's fetch: broker requests (total and by API) and seconds."""

    bootstrap: str
    requests: int
    by_api: tuple[tuple[str, int], ...]
    seconds: float
    groups: int
    partitions: int
    error: str | None = None
    group_offsets_s: float = 0.0
    """Seconds spent fetching the groups' committed offsets (part of ``seconds``)."""


class LagFetch(msgspec.Struct, frozen=True):
    """One batched fetch for many targets."""

    targets: Mapping[str, TargetOffsets]
    clusters: tuple[ClusterFetch, ...]
    seconds: float

    @property
    def requests(self) -> int:
        """Broker requests made, over every cluster."""
        return sum(c.requests for c in self.clusters)

    def by_api(self) -> dict[str, int]:
        """Broker requests by API name, over every cluster."""
        total: Counter[str] = Counter()
        for cluster in self.clusters:
            total.update(dict(cluster.by_api))
        return dict(sorted(total.items()))


def fetch_offsets(targets: Sequence[LagTarget], *, timeout_s: float = 10.0) -> LagFetch:
    """End and committed offsets of every source partition of *targets*, one batch per cluster.

    Never raises for broker trouble: an unreachable cluster, a missing topic or a partition error end up
    in the result.
    """
    started = time.perf_counter()
    by_cluster: dict[KafkaCluster, list[LagTarget]] = defaultdict(list)
    for target in targets:
        by_cluster[target.cluster].append(target)
    jobs = list(by_cluster.items())
    if len(jobs) <= 1:
        done = [_fetch_cluster(c, ts, timeout_s) for c, ts in jobs]
    else:
        with ThreadPoolExecutor(max_workers=min(8, len(jobs)), thread_name_prefix="loom-lag") as pool:
            done = list(pool.map(lambda job: _fetch_cluster(job[0], job[1], timeout_s), jobs))
    results = {t.target.name: t for _, offsets in done for t in offsets}
    return LagFetch(
        targets=results,
        clusters=tuple(c for c, _ in done),
        seconds=time.perf_counter() - started,
    )


def _fetch_cluster(
    cluster: KafkaCluster, targets: list[LagTarget], timeout_s: float
) -> tuple[ClusterFetch, list[TargetOffsets]]:
    """One cluster's fetch: a TCP probe here (a closed port answers at once), the Kafka requests in a
    child process (``loom_dagster.core.kafka.isolation``: the group offsets are coordinator requests)."""
    started = time.perf_counter()
    refused = probe(cluster, min(timeout_s, PROBE_TIMEOUT_S))
    if refused is not None:
        return _unreachable(cluster, targets, refused, started, len({t.group for t in targets}))
    return _fetch_cluster_requests(cluster, targets, timeout_s)


def _client_died(
    reason: str, cluster: KafkaCluster, targets: list[LagTarget], timeout_s: float
) -> tuple[ClusterFetch, list[TargetOffsets]]:
    """Every target unreachable, with why the child process running the Kafka client died."""
    del timeout_s
    return _unreachable(cluster, targets, reason, time.perf_counter(), len({t.group for t in targets}))


@in_child_process(on_crash=_client_died, retries=1)
def _fetch_cluster_requests(
    cluster: KafkaCluster, targets: list[LagTarget], timeout_s: float
) -> tuple[ClusterFetch, list[TargetOffsets]]:
    """Metadata, committed offsets, then end offsets (so that lag is never negative) for one cluster."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    groups = len({t.group for t in targets})
    from confluent_kafka.admin import AdminClient

    meter = StatsMeter()
    conf: dict[str, Any] = {
        **cluster.client_config(),
        "statistics.interval.ms": 10,
        "stats_cb": meter.on_stats,
    }
    admin = AdminClient(conf)
    try:
        topics = describe_topics(admin, sorted({t for target in targets for t in target.topics}), timeout_s)
    except Exception as exc:  # transport, authentication, timeout
        meter.settle(admin)
        return _unreachable(cluster, targets, f"metadata request failed: {exc}", started, groups, meter)
    wanted = _wanted_partitions(targets, topics)
    group_started = time.perf_counter()
    committed = group_offsets(admin, wanted, max(0.5, deadline - time.monotonic())) if wanted else {}
    group_s = time.perf_counter() - group_started
    ends = _end_offsets(admin, wanted, max(0.5, deadline - time.monotonic()))
    meter.settle(admin)
    taken_at = time.time()
    offsets = [_target_offsets(t, topics, committed, ends, taken_at) for t in targets]
    cost = ClusterFetch(
        bootstrap=cluster.bootstrap,
        requests=meter.total(),
        by_api=tuple(sorted(meter.by_api().items())),
        seconds=time.perf_counter() - started,
        groups=groups,
        partitions=len({tp for parts in wanted.values() for tp in parts}),
        group_offsets_s=group_s,
    )
    return cost, offsets


def _unreachable(
    cluster: KafkaCluster,
    targets: list[LagTarget],
    reason: str,
    started: float,
    groups: int,
    meter: StatsMeter | None = None,
) -> tuple[ClusterFetch, list[TargetOffsets]]:
    """Every target of an unreachable cluster, with the reason."""
    cost = ClusterFetch(
        bootstrap=cluster.bootstrap,
        requests=meter.total() if meter else 0,
        by_api=tuple(sorted(meter.by_api().items())) if meter else (),
        seconds=time.perf_counter() - started,
        groups=groups,
        partitions=0,
        error=reason,
    )
    now = time.time()
    return cost, [TargetOffsets(t, unreachable=reason, taken_at=now) for t in targets]


def _wanted_partitions(
    targets: list[LagTarget], topics: Mapping[str, tuple[int, ...] | str]
) -> dict[str, set[tuple[str, int]]]:
    """Group -> every existing source partition of the targets consuming with it."""
    wanted: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for target in targets:
        for topic in target.topics:
            parts = topics.get(topic)
            if isinstance(parts, tuple):
                wanted[target.group].update((topic, p) for p in parts)
    return wanted


def _end_offsets(
    admin: Any, wanted: dict[str, set[tuple[str, int]]], timeout_s: float
) -> dict[tuple[str, int], int | str]:
    """End offsets (read-committed, as loom's consumer sees them) of every partition in ONE call."""
    partitions = sorted({tp for parts in wanted.values() for tp in parts})
    return list_offsets(admin, partitions, "latest", timeout_s)


def _target_offsets(
    target: LagTarget,
    topics: Mapping[str, tuple[int, ...] | str],
    committed: Committed,
    ends: Mapping[tuple[str, int], int | str],
    taken_at: float,
) -> TargetOffsets:
    """Assemble one target's partitions from the cluster-wide answers."""
    missing, parts = [], []
    group = committed.get(target.group, {})
    for topic in target.topics:
        meta = topics.get(topic)
        if meta is None:
            missing.append(topic)
            continue
        if isinstance(meta, str):
            if "UNKNOWN_TOPIC" in meta:
                missing.append(topic)
            else:
                parts.append(PartitionOffsets(topic, -1, None, None, f"topic metadata error: {meta}"))
            continue
        for p in meta:
            parts.append(_partition_offsets(topic, p, ends.get((topic, p)), group.get((topic, p))))
    return TargetOffsets(target, tuple(parts), tuple(missing), None, taken_at)


def _partition_offsets(
    topic: str, partition: int, end: int | str | None, committed: int | str | None
) -> PartitionOffsets:
    """One partition from its end-offset and committed-offset answers (an ``str`` is an error)."""
    errors = [v for v in (end, committed) if isinstance(v, str)]
    if end is None and not errors:
        errors.append("no end offset returned")
    return PartitionOffsets(
        topic,
        partition,
        end if isinstance(end, int) else None,
        committed if isinstance(committed, int) else None,
        "; ".join(errors) or None,
    )
