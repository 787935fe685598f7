"""Kafka consumer lag for many loom flows at once, evaluated Burrow-style over a window of samples.

No Dagster here: ``loom_dagster.sensors.lag`` turns the results into asset check evaluations.

**Fetching** (``fetch_offsets``): flows are grouped by cluster (bootstrap servers + security / connection
settings). Per cluster, with a number of broker requests that does not depend on the number of flows,
topics or partitions:

* librdkafka ``AdminClient``: connection handshake (``ApiVersion``), its bootstrap ``Metadata``, one
  ``Metadata`` for all source topics (``describe_topics``), one ``ListOffsets`` per partition leader broker
  for the end offsets of every source partition (``list_offsets`` with ``OffsetSpec.latest()``, all
  partitions in one call).
* Committed offsets: confluent-kafka 2.16 / librdkafka accept ONE group per ``list_consumer_group_offsets``
  call (``ValueError`` otherwise), i.e. one ``FindCoordinator`` + one ``OffsetFetch`` per group. On PLAINTEXT
  clusters this module therefore speaks the Kafka protocol itself for these two requests: ``ApiVersions``,
  one batched ``FindCoordinator`` v4 for all groups (KIP-699) and one ``OffsetFetch`` v8 per coordinator
  broker carrying every group (KIP-709, Kafka 3.0+). Secured clusters (SSL/SASL) or older brokers fall back
  to the per-group AdminClient call; the count then grows with the number of groups, and is reported as is.

On a single-broker cluster that is 6 or 7 requests whatever the number of flows (librdkafka sometimes folds
its bootstrap ``Metadata`` into ours). With more brokers it grows with the number of brokers only: one
``ApiVersion`` handshake + ``ListOffsets`` per partition-leader broker, one ``OffsetFetch`` per group
coordinator broker. The count is measured, not assumed: librdkafka's own per-broker request counters (its
statistics, ``tx``) plus the requests sent on the protocol socket. Not counted: one TCP connect per cluster
that fails fast on a closed port before any Kafka client is created.

**Time lag**: the producer timestamp of the message at the committed offset would need a ``Fetch`` per
partition (record batches, possibly compressed): not cheap. The time lag is instead *estimated* from the
window: ``lag / consumption rate`` (committed-offset progress per second over the window). It is ``None``
when the consumer made no progress in the window (then ``stalled_for_s`` says for how long it has not moved).

**Evaluation** (``evaluate_window`` / ``evaluate_flow``): see ``LagStatus``.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import StrEnum
from itertools import pairwise
from typing import Any

from loom_dagster.records import LoomFlow
from loom_dagster.sensors.settings import KafkaLagSettings

MIN_SAMPLES = 3
"""Samples a lagging partition needs in its window before the trend rules (STALL/STOP/WARN) apply."""

CURSOR_VERSION = 1
CURSOR_COMPRESS_ABOVE = 4096
"""Cursors longer than this (characters of JSON) are stored zlib-compressed."""
_ZLIB_PREFIX = "z1:"
_CONNECTION_KEY_PREFIXES = (
    "security.",
    "sasl.",
    "ssl.",
    "ssl_",
    "enable.ssl",
    "client.",
    "socket.",
    "broker.",
    "api.version",
    "oauthbearer",
    "https.",
    "resolve.",
    "connections.",
)
_GROUP_ROUNDS = 6
_PROBE_TIMEOUT_S = 2.0
_STATS_WAIT_S = 0.5


# --------------------------------------------------------------------------- statuses


class LagSeverity(StrEnum):
    """How bad a status is: OK passes, WARN and ERROR fail the check with that severity."""

    OK = "ok"
    WARN = "warn"
    ERROR = "error"


class LagStatus(StrEnum):
    """Status of a partition or a flow (a flow takes the worst of its partitions and the lag thresholds).

    * ``OK``: lag is zero, or the consumer is keeping up (lag not growing while it commits).
    * ``STARTING``: no committed offset yet on a partition with data, within the starting window of a
      fresh deployment (loom commits only after the first table flush); lag = end - the offset the job
      started from. Passes.
    * ``WARN``: the consumer commits but lag grew between every pair of samples of the window
      (falling behind), or the flow's total lag is at least ``warn_lag``.
    * ``ERR``: the flow's total lag is at least ``error_lag``.
    * ``STALL``: the committed offset did not move over the window while new messages arrived.
    * ``STOP``: the committed offset did not move over the window, with messages left to consume and no
      new data arriving (the consumer is gone; nothing to wake it).
    * ``REWIND``: the committed offset went backwards within the window (offset reset, replay).
    * ``NO_COMMITS``: the group has no committed offset on a partition that holds data (not started yet,
      or still none once the starting window of the deployment is over).
    * ``UNAVAILABLE``: the cluster answered but not for this partition (leader election, authorization).
    * ``MISSING_TOPIC``: a source topic does not exist (deleted, or not created yet).
    * ``UNREACHABLE``: no broker of the cluster answered within ``request_timeout_s``.
    """

    OK = "OK"
    STARTING = "STARTING"
    WARN = "WARN"
    NO_COMMITS = "NO_COMMITS"
    REWIND = "REWIND"
    UNAVAILABLE = "UNAVAILABLE"
    ERR = "ERR"
    STALL = "STALL"
    STOP = "STOP"
    MISSING_TOPIC = "MISSING_TOPIC"
    UNREACHABLE = "UNREACHABLE"

    @property
    def rank(self) -> int:
        """Order used to pick the worst status (declaration order)."""
        return _RANKS[self]

    @property
    def severity(self) -> LagSeverity:
        """OK, WARN (worth a look) or ERROR (the flow is not consuming, or cannot be checked)."""
        if self in (LagStatus.OK, LagStatus.STARTING):
            return LagSeverity.OK
        if self in (LagStatus.WARN, LagStatus.NO_COMMITS, LagStatus.REWIND, LagStatus.UNAVAILABLE):
            return LagSeverity.WARN
        return LagSeverity.ERROR


_RANKS = {status: i for i, status in enumerate(LagStatus)}


def worst(statuses: Iterable[LagStatus]) -> LagStatus:
    """The worst of *statuses* (``OK`` when empty)."""
    return max(statuses, key=lambda s: s.rank, default=LagStatus.OK)


# --------------------------------------------------------------------------- what to watch


@dataclass(frozen=True)
class KafkaCluster:
    """A Kafka cluster as a client reaches it: bootstrap servers plus security/connection settings.

    ``config`` may hold secrets (SASL password): it is left out of ``repr``; ``bootstrap`` is the label.
    """

    bootstrap: str
    config: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def client_config(self) -> dict[str, str]:
        """librdkafka configuration reaching this cluster."""
        return {"bootstrap.servers": self.bootstrap, **dict(self.config)}

    @property
    def plaintext(self) -> bool:
        """True if the cluster needs no TLS/SASL (then group offsets are fetched in one batched request)."""
        conf = dict(self.config)
        protocol = conf.get("security.protocol", "plaintext").lower()
        return protocol == "plaintext" and not any(k.startswith(("ssl", "sasl")) for k in conf)

    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every bootstrap server."""
        out = []
        for server in self.bootstrap.split(","):
            server = server.strip().split("://")[-1]
            host, _, port = server.rpartition(":")
            out.append((host.strip("[]") or server, int(port or 9092)))
        return out


@dataclass(frozen=True)
class LagTarget:
    """One flow to watch: a unique name (the sensor uses the asset key), its group, topics and cluster."""

    name: str
    group: str
    topics: tuple[str, ...]
    cluster: KafkaCluster
    idle_tail: int = 0
    """Rows a healthy job may hold in loom table buffers on an idle topic (their offsets stay
    uncommitted until more data arrives): a STOP with at most this much lag is reported OK."""


def cluster_for(consumer_settings: Any) -> KafkaCluster:
    """The cluster of loom ``ConsumerSettings`` (brokers, security, connection keys of ``extra``)."""
    conf: dict[str, str] = {}
    security = getattr(consumer_settings, "security", None)
    if security is not None:
        conf.update({k: _conf_str(v) for k, v in security.to_confluent_config().items()})
    for key, value in (getattr(consumer_settings, "extra", None) or {}).items():
        if key.startswith(_CONNECTION_KEY_PREFIXES):
            conf[key] = _conf_str(value)
    brokers = ",".join(sorted(str(b) for b in consumer_settings.brokers))
    return KafkaCluster(bootstrap=brokers, config=tuple(sorted(conf.items())))


def lag_target(name: str, flow: LoomFlow, consumer_settings: Any, idle_tail: int = 0) -> LagTarget | None:
    """The target of a Kafka-sourced flow (``None`` for a Mongo-sourced one)."""
    if flow.source_kind != "kafka" or not flow.consumer_group or not flow.source_topics:
        return None
    topics = tuple(dict.fromkeys(t.topic for t in flow.source_topics))
    return LagTarget(name, flow.consumer_group, topics, cluster_for(consumer_settings), idle_tail)


def _conf_str(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


STARTING_MARGIN_S = 30.0
"""Least margin added to the largest table-buffer age for the starting window (see ``starting_window_s``)."""


def starting_window_s(buffer_max_age_s: float, interval_s: float) -> float:
    """How long after a deployment's start a partition without commits is ``STARTING``, not ``NO_COMMITS``.

    loom commits a partition's offsets only after its first table flush, at most ``buffer_max_age_s``
    after data arrives (the largest of the flow's table sinks; 0 without tables), then the sensor must
    sample it: the margin is two sensor intervals, at least ``STARTING_MARGIN_S``.
    """
    return max(0.0, buffer_max_age_s) + max(STARTING_MARGIN_S, 2.0 * interval_s)


@dataclass(frozen=True)
class DeploymentStart:
    """When a flow's current deployment started, how long it may go without commits, and the offsets
    its job started from (``(topic, partition) -> offset``, recorded by the deploy)."""

    started_at: float
    window_s: float
    offsets: Mapping[tuple[str, int], int] = field(default_factory=dict)

    def within(self, now: float) -> bool:
        """Whether *now* is inside the starting window."""
        return now - self.started_at <= self.window_s

    def start_offset(self, topic: str, partition: int) -> int | None:
        """The offset the job started from on one partition (``None``: not recorded)."""
        return self.offsets.get((topic, partition))

    @classmethod
    def from_record(cls, started_at: float, extra: Mapping[str, Any], window_s: float) -> DeploymentStart:
        """From a deployment record's ``extra["start_offsets"]`` (``{topic: {"partition": offset}}``:
        JSON keys are strings); a missing or malformed entry gives no offsets."""
        offsets: dict[tuple[str, int], int] = {}
        raw = extra.get("start_offsets")
        if isinstance(raw, Mapping):
            for topic, parts in raw.items():
                if not isinstance(parts, Mapping):
                    continue
                for partition, offset in parts.items():
                    try:
                        offsets[(str(topic), int(partition))] = int(offset)
                    except (TypeError, ValueError):
                        continue
        return cls(float(started_at), float(window_s), offsets)


# --------------------------------------------------------------------------- fetch results


@dataclass(frozen=True)
class PartitionOffsets:
    """End offset and the group's committed offset of one partition (``None``: unknown / no commit)."""

    topic: str
    partition: int
    end: int | None
    committed: int | None
    error: str | None = None


@dataclass(frozen=True)
class TargetOffsets:
    """What one fetch found for one target."""

    target: LagTarget
    partitions: tuple[PartitionOffsets, ...] = ()
    missing_topics: tuple[str, ...] = ()
    unreachable: str | None = None
    taken_at: float = 0.0


@dataclass(frozen=True)
class ClusterFetch:
    """Cost of one cluster's fetch: broker requests (total and by API), seconds, how group offsets came."""

    bootstrap: str
    requests: int
    by_api: tuple[tuple[str, int], ...]
    seconds: float
    groups: int
    partitions: int
    group_offsets: str
    error: str | None = None


@dataclass(frozen=True)
class LagFetch:
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


# --------------------------------------------------------------------------- fetching


def fetch_offsets(
    targets: Sequence[LagTarget], *, timeout_s: float = 10.0, batch_groups: bool = True
) -> LagFetch:
    """End and committed offsets of every source partition of *targets*, one batch per cluster.

    Never raises for broker trouble: an unreachable cluster, a missing topic or a partition error end up
    in the result. ``batch_groups=False`` forces the per-group AdminClient path (for comparison).
    """
    started = time.perf_counter()
    by_cluster: dict[KafkaCluster, list[LagTarget]] = defaultdict(list)
    for target in targets:
        by_cluster[target.cluster].append(target)
    jobs = list(by_cluster.items())
    if len(jobs) <= 1:
        done = [_fetch_cluster(c, ts, timeout_s, batch_groups) for c, ts in jobs]
    else:
        with ThreadPoolExecutor(max_workers=min(8, len(jobs)), thread_name_prefix="loom-lag") as pool:
            done = list(pool.map(lambda job: _fetch_cluster(job[0], job[1], timeout_s, batch_groups), jobs))
    results = {t.target.name: t for _, offsets in done for t in offsets}
    return LagFetch(
        targets=results,
        clusters=tuple(c for c, _ in done),
        seconds=time.perf_counter() - started,
    )


def _fetch_cluster(
    cluster: KafkaCluster, targets: list[LagTarget], timeout_s: float, batch_groups: bool
) -> tuple[ClusterFetch, list[TargetOffsets]]:
    """Metadata, committed offsets, then end offsets (so that lag is never negative) for one cluster."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    groups = len({t.group for t in targets})
    refused = _probe(cluster, min(timeout_s, _PROBE_TIMEOUT_S))
    if refused is not None:
        return _unreachable(cluster, targets, refused, started, groups)
    from confluent_kafka.admin import AdminClient

    meter = _StatsMeter()
    conf: dict[str, Any] = {
        **cluster.client_config(),
        "statistics.interval.ms": 10,
        "stats_cb": meter.on_stats,
    }
    admin = AdminClient(conf)
    try:
        topics = _describe_topics(admin, sorted({t for target in targets for t in target.topics}), timeout_s)
    except Exception as exc:  # transport, authentication, timeout
        meter.settle(admin)
        return _unreachable(cluster, targets, f"metadata request failed: {exc}", started, groups, meter)
    wanted = _wanted_partitions(targets, topics)
    wire: Counter[str] = Counter()
    committed, how = _committed_offsets(cluster, admin, wanted, deadline, batch_groups, wire)
    ends = _end_offsets(admin, wanted, max(0.5, deadline - time.monotonic()))
    meter.settle(admin)
    taken_at = time.time()
    offsets = [_target_offsets(t, topics, committed, ends, taken_at) for t in targets]
    by_api = meter.by_api() + wire
    cost = ClusterFetch(
        bootstrap=cluster.bootstrap,
        requests=meter.total() + sum(wire.values()),
        by_api=tuple(sorted(by_api.items())),
        seconds=time.perf_counter() - started,
        groups=groups,
        partitions=len({tp for parts in wanted.values() for tp in parts}),
        group_offsets=how,
    )
    return cost, offsets


def _unreachable(
    cluster: KafkaCluster,
    targets: list[LagTarget],
    reason: str,
    started: float,
    groups: int,
    meter: _StatsMeter | None = None,
) -> tuple[ClusterFetch, list[TargetOffsets]]:
    """Every target of an unreachable cluster, with the reason."""
    cost = ClusterFetch(
        bootstrap=cluster.bootstrap,
        requests=meter.total() if meter else 0,
        by_api=tuple(sorted(meter.by_api().items())) if meter else (),
        seconds=time.perf_counter() - started,
        groups=groups,
        partitions=0,
        group_offsets="none",
        error=reason,
    )
    now = time.time()
    return cost, [TargetOffsets(t, unreachable=reason, taken_at=now) for t in targets]


def _probe(cluster: KafkaCluster, timeout_s: float) -> str | None:
    """``None`` if some bootstrap server accepts a TCP connection, else why none did (no Kafka request)."""
    errors = []
    for host, port in cluster.addresses():
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return None
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc.strerror or exc}")
    return "no bootstrap server accepts connections (" + "; ".join(errors) + ")"


def _describe_topics(admin: Any, names: list[str], timeout_s: float) -> dict[str, tuple[int, ...] | str]:
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


_Committed = dict[str, dict[tuple[str, int], int | str | None]]
"""Group -> partition -> committed offset, ``None`` (no commit) or an error text."""


def _committed_offsets(
    cluster: KafkaCluster,
    admin: Any,
    wanted: dict[str, set[tuple[str, int]]],
    deadline: float,
    batch_groups: bool,
    wire: Counter[str],
) -> tuple[_Committed, str]:
    """Committed offsets of every group: batched on the wire if possible, else one AdminClient call each."""
    if not wanted:
        return {}, "none"
    how = "per group (AdminClient)"
    if batch_groups and cluster.plaintext:
        try:
            return _GroupOffsetsWire(cluster, deadline, wire).fetch(wanted), "batched OffsetFetch v8"
        except (OSError, ValueError, _ProtocolError, _Unsupported) as exc:
            how = f"per group (AdminClient; batched path failed: {exc})"
    return _group_offsets_admin(admin, wanted, max(0.5, deadline - time.monotonic())), how


def _group_offsets_admin(admin: Any, wanted: dict[str, set[tuple[str, int]]], timeout_s: float) -> _Committed:
    """One ``list_consumer_group_offsets`` call per group (the client refuses several), run concurrently."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

    futures = {}
    for group, parts in wanted.items():
        request = [ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in sorted(parts)])]
        futures[group] = admin.list_consumer_group_offsets(request, request_timeout=timeout_s)[group]
    out: _Committed = {}
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


def _end_offsets(
    admin: Any, wanted: dict[str, set[tuple[str, int]]], timeout_s: float
) -> dict[tuple[str, int], int | str]:
    """End offsets (read-committed, as loom's consumer sees them) of every partition in ONE call."""
    partitions = sorted({tp for parts in wanted.values() for tp in parts})
    return _list_offsets(admin, partitions, "latest", timeout_s)


def _list_offsets(
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


@dataclass(frozen=True)
class OffsetSnapshot:
    """Watermarks of some topics and the committed offsets of some groups, read once without joining any
    group (``snapshot_offsets``). Keys are ``(topic, partition)``; ``None``: the group has no commit there."""

    partitions: Mapping[str, tuple[int, ...]]
    missing_topics: tuple[str, ...]
    low: Mapping[tuple[str, int], int]
    high: Mapping[tuple[str, int], int]
    committed: Mapping[str, Mapping[tuple[str, int], int | None]]

    def committed_offset(self, group: str, topic: str, partition: int) -> int | None:
        """*group*'s committed offset on one partition (``None``: no commit, or group not asked)."""
        return self.committed.get(group, {}).get((topic, partition))


class OffsetSnapshotError(ConnectionError):
    """The cluster could not be reached, or did not answer for every partition within the timeout."""


def snapshot_offsets(
    cluster: KafkaCluster, topics: Sequence[str], groups: Sequence[str], *, timeout_s: float = 10.0
) -> OffsetSnapshot:
    """Low and high watermarks of every partition of *topics* and the committed offsets of *groups* there.

    Uses the AdminClient only (``describe_topics``, ``list_offsets``, ``list_consumer_group_offsets``):
    no consumer, no group membership. Everything is bounded by *timeout_s* (plus a fast TCP probe that
    fails at once on a closed port). Partition errors (a fresh topic without a leader yet) are retried
    until the deadline. Raises ``OffsetSnapshotError`` (the cluster's bootstrap is NOT in the text: the
    caller names the brokers, redacted) when unreachable or when a partition never answered.
    """
    deadline = time.monotonic() + timeout_s
    refused = _probe(cluster, min(timeout_s, _PROBE_TIMEOUT_S))
    if refused is not None:
        raise OffsetSnapshotError(refused)
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(dict[str, Any](cluster.client_config()))
    names = sorted(set(topics))
    try:
        described = _describe_topics(admin, names, timeout_s) if names else {}
    except Exception as exc:  # transport, authentication, timeout
        raise OffsetSnapshotError(f"metadata request failed: {exc}") from exc
    bad = {t: m for t, m in described.items() if isinstance(m, str) and "UNKNOWN_TOPIC" not in m}
    if bad:
        raise OffsetSnapshotError(
            "topic metadata failed: " + "; ".join(f"{t}: {m}" for t, m in sorted(bad.items()))
        )
    partitions = {t: m for t, m in described.items() if isinstance(m, tuple)}
    missing = tuple(t for t in names if t not in partitions)
    wanted = sorted((t, p) for t, parts in partitions.items() for p in parts)
    low, high, committed = _snapshot_rounds(admin, wanted, sorted(set(groups)), deadline)
    return OffsetSnapshot(partitions, missing, low, high, committed)


def _snapshot_rounds(
    admin: Any, wanted: list[tuple[str, int]], groups: list[str], deadline: float
) -> tuple[
    dict[tuple[str, int], int], dict[tuple[str, int], int], dict[str, dict[tuple[str, int], int | None]]
]:
    """Committed offsets first, then watermarks (so that end >= committed); retried while errors remain."""
    while True:
        left = max(0.5, deadline - time.monotonic())
        raw = _group_offsets_admin(admin, dict.fromkeys(groups, set(wanted)), left) if wanted else {}
        low_raw = _list_offsets(admin, wanted, "earliest", max(0.5, deadline - time.monotonic()))
        high_raw = _list_offsets(admin, wanted, "latest", max(0.5, deadline - time.monotonic()))
        errors = [f"{t}[{p}]: {v}" for (t, p), v in {**low_raw, **high_raw}.items() if isinstance(v, str)]
        errors += [
            f"group {g} {t}[{p}]: {v}"
            for g, offs in raw.items()
            for (t, p), v in offs.items()
            if isinstance(v, str)
        ]
        if not errors:
            committed = {
                g: {tp: v for tp, v in raw.get(g, {}).items() if not isinstance(v, str)} for g in groups
            }
            low = {tp: v for tp, v in low_raw.items() if isinstance(v, int)}
            high = {tp: v for tp, v in high_raw.items() if isinstance(v, int)}
            return low, high, committed
        if time.monotonic() + 0.2 >= deadline:
            shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
            raise OffsetSnapshotError(f"offsets not available for every partition: {shown}")
        time.sleep(0.2)


def _target_offsets(
    target: LagTarget,
    topics: Mapping[str, tuple[int, ...] | str],
    committed: _Committed,
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


class _StatsMeter:
    """Counts the requests a librdkafka client really sent, from its statistics (``tx`` per broker)."""

    def __init__(self) -> None:
        self._latest: dict[str, Any] | None = None

    def on_stats(self, raw: str) -> None:
        """librdkafka ``stats_cb``."""
        self._latest = json.loads(raw)

    def settle(self, client: Any) -> None:
        """Wait for statistics taken after now (librdkafka's ``ts`` is CLOCK_MONOTONIC, like ``time.monotonic``)."""
        done = time.monotonic()
        deadline = done + _STATS_WAIT_S
        while time.monotonic() < deadline:
            client.poll(0.005)
            if self._latest is not None and self._latest.get("ts", 0) / 1e6 >= done:
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


# --------------------------------------------------------------------------- Kafka protocol (PLAINTEXT)

_API_OFFSET_FETCH = 9
_API_FIND_COORDINATOR = 10
_API_VERSIONS = 18
_ERRORS = {
    3: "UNKNOWN_TOPIC_OR_PARTITION",
    14: "COORDINATOR_LOAD_IN_PROGRESS",
    15: "COORDINATOR_NOT_AVAILABLE",
    16: "NOT_COORDINATOR",
    29: "TOPIC_AUTHORIZATION_FAILED",
    30: "GROUP_AUTHORIZATION_FAILED",
    69: "GROUP_ID_NOT_FOUND",
    88: "UNSTABLE_OFFSET_COMMIT",
}
_RETRIABLE = {14, 15, 16}


class _ProtocolError(RuntimeError):
    """A response could not be read."""


class _Unsupported(RuntimeError):
    """The broker lacks batched FindCoordinator (v4) or multi-group OffsetFetch (v8)."""


def _error_name(code: int) -> str:
    return _ERRORS.get(code, f"Kafka error {code}")


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _compact_str(text: str) -> bytes:
    raw = text.encode()
    return _uvarint(len(raw) + 1) + raw


def _compact_array(items: Sequence[bytes]) -> bytes:
    return _uvarint(len(items) + 1) + b"".join(items)


class _Reader:
    """Reads the fields of one response."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def _take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise _ProtocolError("response shorter than expected")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def i16(self) -> int:
        return int(struct.unpack(">h", self._take(2))[0])

    def i32(self) -> int:
        return int(struct.unpack(">i", self._take(4))[0])

    def i64(self) -> int:
        return int(struct.unpack(">q", self._take(8))[0])

    def uvarint(self) -> int:
        shift = value = 0
        while True:
            byte = self._take(1)[0]
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    def count(self) -> int:
        """Length of a compact array (null counts as empty)."""
        return max(0, self.uvarint() - 1)

    def compact_str(self) -> str | None:
        size = self.uvarint()
        return None if size == 0 else self._take(size - 1).decode()

    def tags(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()
            self._take(self.uvarint())


class _Connection:
    """One PLAINTEXT connection speaking just enough of the Kafka protocol; counts what it sends."""

    def __init__(self, address: tuple[str, int], deadline: float, counter: Counter[str]) -> None:
        self.address = address
        self._deadline, self._counter, self._corr = deadline, counter, 0
        self._sock = socket.create_connection(address, timeout=self._remaining())

    def _remaining(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request timeout reached")
        return left

    def call(self, api: int, version: int, body: bytes, label: str) -> _Reader:
        """Send one request and read its response (flexible headers except for ApiVersions)."""
        self._corr += 1
        flexible = api != _API_VERSIONS
        client = b"loom-dagster-lag"
        header = struct.pack(">hhih", api, version, self._corr, len(client)) + client
        frame = header + (b"\x00" if flexible else b"") + body
        self._sock.settimeout(self._remaining())
        self._sock.sendall(struct.pack(">i", len(frame)) + frame)
        self._counter[label] += 1
        reader = _Reader(self._recv(struct.unpack(">i", self._recv(4))[0]))
        if reader.i32() != self._corr:
            raise _ProtocolError("correlation id mismatch")
        if flexible:
            reader.tags()
        return reader

    def _recv(self, size: int) -> bytes:
        chunks, left = [], size
        while left:
            self._sock.settimeout(self._remaining())
            chunk = self._sock.recv(min(left, 1 << 20))
            if not chunk:
                raise _ProtocolError("broker closed the connection")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._sock.close()


class _GroupOffsetsWire:
    """Committed offsets of many groups: ApiVersions, one FindCoordinator v4, one OffsetFetch v8 per
    coordinator broker (plus bounded retries while a coordinator loads)."""

    def __init__(self, cluster: KafkaCluster, deadline: float, counter: Counter[str]) -> None:
        self._cluster, self._deadline, self._counter = cluster, deadline, counter
        self._conns: dict[tuple[str, int], _Connection] = {}

    def fetch(self, wanted: dict[str, set[tuple[str, int]]]) -> _Committed:
        """Group -> partition -> committed offset / None / error text."""
        try:
            bootstrap = self._bootstrap()
            self._check_versions(bootstrap)
            return self._rounds(bootstrap, wanted)
        finally:
            for conn in self._conns.values():
                conn.close()

    def _bootstrap(self) -> _Connection:
        errors = []
        for address in self._cluster.addresses():
            try:
                return self._connect(address)
            except OSError as exc:
                errors.append(f"{address}: {exc}")
        raise OSError("; ".join(errors))

    def _connect(self, address: tuple[str, int]) -> _Connection:
        conn = self._conns.get(address)
        if conn is None:
            conn = self._conns[address] = _Connection(address, self._deadline, self._counter)
        return conn

    def _check_versions(self, conn: _Connection) -> None:
        reader = conn.call(_API_VERSIONS, 0, b"", "ApiVersion")
        error = reader.i16()
        versions = {}
        for _ in range(max(0, reader.i32())):
            api, _low, high = reader.i16(), reader.i16(), reader.i16()
            versions[api] = high
        if error or versions.get(_API_FIND_COORDINATOR, -1) < 4 or versions.get(_API_OFFSET_FETCH, -1) < 8:
            raise _Unsupported("broker lacks FindCoordinator v4 / OffsetFetch v8")

    def _rounds(self, bootstrap: _Connection, wanted: dict[str, set[tuple[str, int]]]) -> _Committed:
        out: _Committed = {}
        pending = sorted(wanted)
        errors: dict[str, str] = {}
        for attempt in range(_GROUP_ROUNDS):
            retry: list[str] = []
            by_coordinator: dict[tuple[str, int], list[str]] = defaultdict(list)
            for group, where in self._find_coordinators(bootstrap, pending).items():
                if isinstance(where, int):
                    errors[group] = _error_name(where)
                    if where in _RETRIABLE:
                        retry.append(group)
                else:
                    by_coordinator[where].append(group)
            for address, groups in by_coordinator.items():
                fetched = self._offset_fetch(self._connect(address), {g: wanted[g] for g in groups})
                for group, (offsets, code) in fetched.items():
                    if code in _RETRIABLE:
                        retry.append(group)
                        errors[group] = _error_name(code)
                    elif code:
                        errors[group] = _error_name(code)
                    else:
                        out[group] = offsets
            pending = sorted(set(retry))
            if not pending or time.monotonic() + 0.05 * 2**attempt >= self._deadline:
                break
            time.sleep(0.05 * 2**attempt)
        for group in wanted:
            if group not in out:
                out[group] = {
                    tp: f"group offsets failed: {errors.get(group, 'timeout')}" for tp in wanted[group]
                }
        return out

    def _find_coordinators(self, conn: _Connection, groups: list[str]) -> dict[str, tuple[str, int] | int]:
        """Group -> coordinator ``(host, port)`` or error code, in one FindCoordinator v4 request."""
        body = b"\x00" + _compact_array([_compact_str(g) for g in groups]) + b"\x00"
        reader = conn.call(_API_FIND_COORDINATOR, 4, body, "FindCoordinator")
        reader.i32()  # throttle
        out: dict[str, tuple[str, int] | int] = {}
        for _ in range(reader.count()):
            key = reader.compact_str() or ""
            reader.i32()  # node id
            host, port, code = reader.compact_str() or "", reader.i32(), reader.i16()
            reader.compact_str()  # error message
            reader.tags()
            out[key] = code if code else (host, port)
        return out

    def _offset_fetch(
        self, conn: _Connection, wanted: dict[str, set[tuple[str, int]]]
    ) -> dict[str, tuple[dict[tuple[str, int], int | str | None], int]]:
        """Group -> (partition -> offset/None/error, group error code), in one OffsetFetch v8 request."""
        groups = [_compact_str(g) + _topics_field(parts) + b"\x00" for g, parts in wanted.items()]
        body = _compact_array(groups) + b"\x00" + b"\x00"  # groups, require_stable=false, tags
        reader = conn.call(_API_OFFSET_FETCH, 8, body, "OffsetFetch")
        reader.i32()  # throttle
        out = {}
        for _ in range(reader.count()):
            group = reader.compact_str() or ""
            offsets: dict[tuple[str, int], int | str | None] = {}
            for _ in range(reader.count()):
                topic = reader.compact_str() or ""
                for _ in range(reader.count()):
                    partition, offset = reader.i32(), reader.i64()
                    reader.i32()  # leader epoch
                    reader.compact_str()  # metadata
                    code = reader.i16()
                    reader.tags()
                    offsets[(topic, partition)] = (
                        _error_name(code) if code else (offset if offset >= 0 else None)
                    )
                reader.tags()
            code = reader.i16()
            reader.tags()
            out[group] = (offsets, code)
        return out


def _topics_field(parts: set[tuple[str, int]]) -> bytes:
    """OffsetFetch v8 topics of one group: name + partition indexes."""
    by_topic: dict[str, list[int]] = defaultdict(list)
    for topic, partition in sorted(parts):
        by_topic[topic].append(partition)
    topics = [
        _compact_str(t) + _compact_array([struct.pack(">i", p) for p in ps]) + b"\x00"
        for t, ps in by_topic.items()
    ]
    return _compact_array(topics)


# --------------------------------------------------------------------------- samples and windows


@dataclass(frozen=True)
class LagSample:
    """One observation of a partition: when, its end offset, the group's committed offset."""

    ts: float
    end: int
    committed: int | None

    @property
    def lag(self) -> int | None:
        """Messages behind (``None`` without a committed offset; never negative)."""
        return None if self.committed is None else max(0, self.end - self.committed)


@dataclass(frozen=True)
class PartitionWindow:
    """The last samples of one partition (oldest first) and since when its committed offset is unchanged."""

    topic: str
    partition: int
    samples: tuple[LagSample, ...] = ()
    since: float | None = None

    def add(self, sample: LagSample, size: int, max_age_s: float | None = None) -> PartitionWindow:
        """This window with *sample* appended, capped to *size* samples and *max_age_s* seconds."""
        previous = self.samples[-1] if self.samples else None
        moved = previous is None or previous.committed != sample.committed
        kept = [s for s in self.samples if max_age_s is None or sample.ts - s.ts <= max_age_s]
        samples = tuple([*kept, sample][-max(1, size) :])
        return PartitionWindow(self.topic, self.partition, samples, sample.ts if moved else self.since)


@dataclass(frozen=True)
class LagWindows:
    """Windows of every watched partition, by target name: what a sensor cursor carries between ticks."""

    flows: Mapping[str, Mapping[tuple[str, int], PartitionWindow]] = field(default_factory=dict)

    def for_target(self, name: str) -> Mapping[tuple[str, int], PartitionWindow]:
        """The windows of one target (empty if unseen)."""
        return self.flows.get(name, {})

    def to_json(self) -> str:
        """Compact JSON for a cursor (see ``_encode_flow``): ``{"v": 1, "f": {name: {"t": [...], "p": {...}}}}``."""
        flows = {name: _encode_flow(parts) for name, parts in sorted(self.flows.items())}
        return json.dumps({"v": CURSOR_VERSION, "f": flows}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> LagWindows:
        """Inverse of ``to_json``; an empty, foreign or older cursor gives empty windows."""
        try:
            data = json.loads(text) if text else {}
            if not isinstance(data, dict) or data.get("v") != CURSOR_VERSION:
                return cls()
            return cls({name: _decode_flow(raw) for name, raw in data["f"].items()})
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            return cls()

    def to_cursor(self) -> str:
        """``to_json``, zlib-compressed (``z1:`` + base64) when longer than ``CURSOR_COMPRESS_ABOVE``.

        Dagster keeps the cursor on every tick row (7 days for skipped ticks), so its size counts.
        """
        text = self.to_json()
        if len(text) <= CURSOR_COMPRESS_ABOVE:
            return text
        return _ZLIB_PREFIX + base64.b64encode(zlib.compress(text.encode(), 9)).decode()

    @classmethod
    def from_cursor(cls, cursor: str | None) -> LagWindows:
        """Inverse of ``to_cursor``; an unreadable cursor gives empty windows."""
        if cursor and cursor.startswith(_ZLIB_PREFIX):
            try:
                cursor = zlib.decompress(base64.b64decode(cursor[len(_ZLIB_PREFIX) :])).decode()
            except (ValueError, zlib.error):
                return cls()
        return cls.from_json(cursor)


def _encode_flow(parts: Mapping[tuple[str, int], PartitionWindow]) -> dict[str, Any]:
    """One flow's windows, small: the partitions of a flow are sampled at the same ticks.

    ``t``: the flow's tick times in centiseconds, the first absolute, then deltas. ``p``: per
    ``"topic:partition"`` a row ``[since - first tick, end, end - committed, Δend, end - committed, ...]``
    with one (end, lag) pair per tick: the first end absolute, then deltas; ``null`` pairs for ticks without
    a sample, a ``null`` lag for no committed offset.
    """
    ticks = sorted({_centis(s.ts) for w in parts.values() for s in w.samples})
    index = {t: i for i, t in enumerate(ticks)}
    rows: dict[str, list[int | None]] = {}
    for (topic, partition), window in sorted(parts.items()):
        if not window.samples:
            continue
        row: list[int | None] = [None] * (1 + 2 * len(ticks))
        row[0] = None if window.since is None else _centis(window.since) - ticks[0]
        previous: int | None = None
        for sample in window.samples:
            at = 1 + 2 * index[_centis(sample.ts)]
            row[at] = sample.end if previous is None else sample.end - previous
            row[at + 1] = None if sample.committed is None else sample.end - sample.committed
            previous = sample.end
        rows[f"{topic}:{partition}"] = row
    deltas = [b - a for a, b in pairwise(ticks)]
    return {"t": ticks[:1] + deltas, "p": rows}


def _decode_flow(raw: Mapping[str, Any]) -> dict[tuple[str, int], PartitionWindow]:
    """Inverse of ``_encode_flow``."""
    ticks: list[int] = []
    for value in raw["t"]:
        ticks.append(int(value) + (ticks[-1] if ticks else 0))
    out: dict[tuple[str, int], PartitionWindow] = {}
    for key, row in raw["p"].items():
        topic, _, part = key.rpartition(":")
        samples: list[LagSample] = []
        previous: int | None = None
        for i, tick in enumerate(ticks):
            end, lag = row[1 + 2 * i], row[2 + 2 * i]
            if end is None:
                continue
            previous = int(end) if previous is None else previous + int(end)
            samples.append(LagSample(tick / 100, previous, None if lag is None else previous - int(lag)))
        since = None if row[0] is None else (ticks[0] + int(row[0])) / 100
        out[(topic, int(part))] = PartitionWindow(topic, int(part), tuple(samples), since)
    return out


def _centis(ts: float) -> int:
    return int(round(ts * 100))


def advance_windows(
    windows: LagWindows,
    fetch: LagFetch,
    *,
    size: int,
    at: float | None = None,
    max_age_s: float | None = None,
) -> LagWindows:
    """Windows with this fetch's samples appended (timestamp *at*, default the fetch time).

    Targets not in the fetch are dropped; partitions without an end offset keep their window unchanged.
    """
    flows: dict[str, dict[tuple[str, int], PartitionWindow]] = {}
    for name, offsets in fetch.targets.items():
        previous = windows.for_target(name)
        current: dict[tuple[str, int], PartitionWindow] = {}
        for part in offsets.partitions:
            key = (part.topic, part.partition)
            window = previous.get(key) or PartitionWindow(part.topic, part.partition)
            if part.end is not None and part.error is None:
                sample = LagSample(offsets.taken_at if at is None else at, part.end, part.committed)
                window = window.add(sample, size, max_age_s)
            current[key] = window
        flows[name] = current
    return LagWindows(flows)


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class PartitionLag:
    """One partition's evaluation."""

    topic: str
    partition: int
    end: int | None
    committed: int | None
    lag: int | None
    status: LagStatus
    reason: str
    samples: int = 0
    consume_rate: float | None = None
    produce_rate: float | None = None
    time_lag_s: float | None = None
    stalled_for_s: float | None = None


@dataclass(frozen=True)
class FlowLag:
    """One flow's evaluation: its status (worst partition, then the total-lag thresholds) and why."""

    name: str
    group: str
    status: LagStatus
    reason: str
    total_lag: int
    partitions: tuple[PartitionLag, ...] = ()
    missing_topics: tuple[str, ...] = ()
    consume_rate: float | None = None
    produce_rate: float | None = None
    time_lag_s: float | None = None
    stalled_for_s: float | None = None

    @property
    def severity(self) -> LagSeverity:
        """Severity of the status."""
        return self.status.severity

    @property
    def passed(self) -> bool:
        """True for ``OK`` and ``STARTING`` (severity OK)."""
        return self.status.severity is LagSeverity.OK

    def counts(self) -> dict[str, int]:
        """How many partitions are in each status."""
        return dict(Counter(p.status.value for p in self.partitions))


def evaluate_window(
    window: PartitionWindow,
    *,
    now: float | None = None,
    min_samples: int = MIN_SAMPLES,
    start: DeploymentStart | None = None,
) -> PartitionLag:
    """Burrow's rules on one partition's window (oldest sample first).

    Order: no sample -> UNAVAILABLE; no committed offset -> STARTING within *start*'s window, else
    NO_COMMITS (OK if the partition is empty; lag from the recorded start offset when known);
    committed offset went back -> REWIND; then, over the trailing run of samples with lag > 0 (after any
    rewind), when it has at least *min_samples* samples: committed offset unchanged over its last
    *min_samples* or more samples -> STALL if the end offset grew meanwhile, else STOP; lag grew between
    every pair (and overall) while committing -> WARN. A sample with zero lag ends any run, so a consumer
    that caught up in between is OK (Burrow's rule 1). The worst status found wins.

    Unlike Burrow, STALL/STOP need *min_samples* unchanged samples, not a full window (faster verdicts),
    and STALL vs STOP is told apart by new data arriving (Burrow uses commit timestamps, which
    ``OffsetFetch`` does not return). ``time_lag_s`` = lag / consumption rate over the window; ``None``
    while stalled or stopped (see ``stalled_for_s``).
    """
    if not window.samples:
        return PartitionLag(
            window.topic, window.partition, None, None, None, LagStatus.UNAVAILABLE, "no sample"
        )
    last = window.samples[-1]
    now = last.ts if now is None else now
    rewind, since_rewind = _split_at_rewind(window.samples)
    consume, produce = _rates(window.samples, since_rewind)
    base = PartitionLag(
        window.topic,
        window.partition,
        last.end,
        last.committed,
        last.lag,
        LagStatus.OK,
        "",
        samples=len(window.samples),
        consume_rate=consume,
        produce_rate=produce,
    )
    if last.committed is None:
        return _without_commits(base, last.end, now, start)
    found: list[tuple[LagStatus, str]] = []
    if rewind is not None:
        found.append((LagStatus.REWIND, f"committed offset went back from {rewind[0]} to {rewind[1]}"))
    run = _lagging_run(since_rewind)
    min_samples = max(2, min_samples)
    if len(run) >= min_samples:
        trend = _trend(run, consume, min_samples)
        if trend is not None:
            found.append(trend)
    status, reason = max(found, key=lambda f: f[0].rank, default=(LagStatus.OK, _ok_reason(last)))
    unmoved = window.since is not None and window.since < last.ts
    stalled = now - window.since if unmoved and last.lag and window.since is not None else None
    stuck = status in (LagStatus.STALL, LagStatus.STOP)
    time_lag = 0.0 if not last.lag else (last.lag / consume if consume and not stuck else None)
    return replace(base, status=status, reason=reason, time_lag_s=time_lag, stalled_for_s=stalled)


def _without_commits(base: PartitionLag, end: int, now: float, start: DeploymentStart | None) -> PartitionLag:
    """A partition the group never committed on: empty (OK), STARTING in the window, else NO_COMMITS."""
    if end == 0:
        return replace(base, reason="empty partition, nothing to commit yet")
    offset = start.start_offset(base.topic, base.partition) if start is not None else None
    lag = None if offset is None else max(0, end - offset)
    origin = "start offset not recorded" if offset is None else f"started at offset {offset}, lag {lag}"
    if start is not None and start.within(now):
        age = max(0.0, now - start.started_at)
        reason = (
            f"no commit yet, deployed {age:.0f} s ago ({origin}; loom commits after the first table "
            f"flush, expected within {start.window_s:.0f} s); end {end}"
        )
        return replace(base, lag=lag, status=LagStatus.STARTING, reason=reason)
    since = "" if start is None else f" {max(0.0, now - start.started_at):.0f} s after the deployment;"
    reason = f"no committed offset yet (not started);{since} end {end}" + (
        f" ({origin})" if offset is not None else ""
    )
    return replace(base, lag=lag, status=LagStatus.NO_COMMITS, reason=reason)


def _ok_reason(last: LagSample) -> str:
    return "caught up" if not last.lag else f"lag {last.lag}, consumer progressing"


def _split_at_rewind(samples: Sequence[LagSample]) -> tuple[tuple[int, int] | None, list[LagSample]]:
    """The latest backwards move ``(from, to)`` of the committed offset (or None), and the samples with a
    committed offset since then."""
    usable = [s for s in samples if s.committed is not None]
    rewind, start = None, 0
    for i, (a, b) in enumerate(pairwise(usable), start=1):
        if (b.committed or 0) < (a.committed or 0):
            rewind, start = (a.committed or 0, b.committed or 0), i
    return rewind, usable[start:]


def _lagging_run(since_rewind: Sequence[LagSample]) -> list[LagSample]:
    """The trailing samples with lag > 0."""
    run: list[LagSample] = []
    for sample in reversed(since_rewind):
        if not sample.lag:
            break
        run.append(sample)
    return run[::-1]


def _trend(run: list[LagSample], consume: float | None, min_samples: int) -> tuple[LagStatus, str] | None:
    """STALL / STOP / WARN from a run of lagging samples, or None if the consumer keeps up."""
    flat = _constant_suffix(run)
    if len(flat) >= min_samples:
        first, last = flat[0], flat[-1]
        span = last.ts - first.ts
        if last.end > first.end:
            return LagStatus.STALL, (
                f"committed offset {last.committed} unchanged over {len(flat)} samples ({span:.0f} s) while "
                f"{last.end - first.end} new messages arrived; lag {last.lag}"
            )
        return LagStatus.STOP, (
            f"committed offset {last.committed} unchanged over {len(flat)} samples ({span:.0f} s) with "
            f"{last.lag} messages left and no new data"
        )
    lags = [s.lag or 0 for s in run]
    if all(b >= a for a, b in pairwise(lags)) and lags[-1] > lags[0]:
        rate = f" at {consume:.1f} msg/s" if consume else ""
        return LagStatus.WARN, f"consuming{rate} but lag grew at every sample: {lags[0]} -> {lags[-1]}"
    return None


def _constant_suffix(run: list[LagSample]) -> list[LagSample]:
    """The trailing samples of *run* sharing the latest committed offset."""
    flat = [run[-1]]
    for sample in reversed(run[:-1]):
        if sample.committed != run[-1].committed:
            break
        flat.append(sample)
    return flat[::-1]


def _rates(samples: Sequence[LagSample], usable: Sequence[LagSample]) -> tuple[float | None, float | None]:
    """Committed-offset progress (over *usable*: since any rewind) and end-offset growth per second."""
    consume = None
    if len(usable) >= 2 and usable[-1].ts > usable[0].ts:
        consume = ((usable[-1].committed or 0) - (usable[0].committed or 0)) / (usable[-1].ts - usable[0].ts)
    produce = None
    if len(samples) >= 2 and samples[-1].ts > samples[0].ts:
        produce = max(0, samples[-1].end - samples[0].end) / (samples[-1].ts - samples[0].ts)
    return consume, produce


def evaluate_flow(
    offsets: TargetOffsets,
    windows: Mapping[tuple[str, int], PartitionWindow],
    settings: KafkaLagSettings,
    *,
    now: float | None = None,
    min_samples: int = MIN_SAMPLES,
    start: DeploymentStart | None = None,
) -> FlowLag:
    """A flow's status: UNREACHABLE / MISSING_TOPIC first, else the worst partition, then the thresholds.

    *start*: the flow's current deployment (``STARTING`` instead of ``NO_COMMITS`` within its window).
    """
    target = offsets.target
    if offsets.unreachable is not None:
        return FlowLag(target.name, target.group, LagStatus.UNREACHABLE, offsets.unreachable, 0)
    parts = tuple(_partition_lag(p, windows, now, min_samples, start) for p in offsets.partitions)
    total = sum(p.lag or 0 for p in parts)
    parts = _forgive_idle_tail(parts, total, target.idle_tail)
    status, reason = _flow_status(parts, offsets.missing_topics, total, settings)
    lagging = [p for p in parts if p.lag]
    times = [p.time_lag_s for p in lagging if p.time_lag_s is not None]
    stalled = [p.stalled_for_s for p in lagging if p.stalled_for_s is not None]
    return FlowLag(
        name=target.name,
        group=target.group,
        status=status,
        reason=reason,
        total_lag=total,
        partitions=parts,
        missing_topics=offsets.missing_topics,
        consume_rate=_sum_known(p.consume_rate for p in parts),
        produce_rate=_sum_known(p.produce_rate for p in parts),
        time_lag_s=max(times) if times else (0.0 if not lagging else None),
        stalled_for_s=max(stalled) if stalled else None,
    )


def _forgive_idle_tail(
    parts: tuple[PartitionLag, ...], total: int, idle_tail: int
) -> tuple[PartitionLag, ...]:
    """loom flushes a table buffer only when more data arrives, so on an idle topic a healthy job keeps
    up to a buffer of rows (and their offsets) uncommitted: STOP within that tail is reported OK."""
    stopped = [p for p in parts if p.status is LagStatus.STOP]
    if not stopped or total > idle_tail or any(p.status is LagStatus.STALL for p in parts):
        return parts
    reason = (
        f"idle: {total} message(s) wait in loom's table buffer (up to {idle_tail}) until more data "
        "arrives; they are committed after the next flush"
    )
    return tuple(
        replace(p, status=LagStatus.OK, reason=reason) if p.status is LagStatus.STOP else p for p in parts
    )


def _partition_lag(
    part: PartitionOffsets,
    windows: Mapping[tuple[str, int], PartitionWindow],
    now: float | None,
    min_samples: int,
    start: DeploymentStart | None = None,
) -> PartitionLag:
    """Evaluate one partition, or mark it UNAVAILABLE when this fetch failed for it."""
    if part.error is not None or part.end is None:
        lag = None if part.end is None or part.committed is None else max(0, part.end - part.committed)
        reason = part.error or "no end offset"
        return PartitionLag(
            part.topic, part.partition, part.end, part.committed, lag, LagStatus.UNAVAILABLE, reason
        )
    window = windows.get((part.topic, part.partition))
    if window is None or not window.samples:
        window = PartitionWindow(part.topic, part.partition).add(
            LagSample(now if now is not None else time.time(), part.end, part.committed), 1
        )
    return evaluate_window(window, now=now, min_samples=min_samples, start=start)


def _flow_status(
    parts: Sequence[PartitionLag], missing: Sequence[str], total: int, settings: KafkaLagSettings
) -> tuple[LagStatus, str]:
    """Worst of: missing topics, partition statuses, total-lag thresholds; with a one-line reason."""
    found: list[tuple[LagStatus, str]] = []
    if missing:
        found.append((LagStatus.MISSING_TOPIC, f"source topic(s) missing: {', '.join(missing)}"))
    if not parts and not missing:
        found.append((LagStatus.UNAVAILABLE, "no partition answered"))
    for status in sorted({p.status for p in parts}, key=lambda s: -s.rank):
        if status is LagStatus.OK:
            continue
        bad = [p for p in parts if p.status is status]
        example = bad[0]
        found.append(
            (
                status,
                f"{len(bad)}/{len(parts)} partition(s) {status.value}, e.g. "
                f"{example.topic}[{example.partition}]: {example.reason}",
            )
        )
    if total >= settings.error_lag:
        found.append((LagStatus.ERR, f"total lag {total} >= error_lag {settings.error_lag}"))
    elif total >= settings.warn_lag:
        found.append((LagStatus.WARN, f"total lag {total} >= warn_lag {settings.warn_lag}"))
    if not found:
        return LagStatus.OK, f"total lag {total} over {len(parts)} partition(s)"
    status = worst(s for s, _ in found)
    reasons = [r for s, r in sorted(found, key=lambda f: -f[0].rank)]
    return status, "; ".join(reasons)


def _sum_known(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


# --------------------------------------------------------------------------- one call for a sensor tick


@dataclass(frozen=True)
class LagReport:
    """A tick: every flow's evaluation, the advanced windows (next cursor) and the fetch's cost."""

    flows: tuple[FlowLag, ...]
    windows: LagWindows
    fetch: LagFetch


def check_lag(
    targets: Sequence[LagTarget],
    settings: KafkaLagSettings,
    windows: LagWindows | None = None,
    *,
    at: float | None = None,
    batch_groups: bool = True,
    starts: Mapping[str, DeploymentStart] | None = None,
) -> LagReport:
    """Fetch once for every target, advance the windows (``None``: a one-shot check) and evaluate.

    *at* overrides the sample timestamp (tests inject time instead of sleeping). *starts*: the current
    deployment of each target (by target name), for the ``STARTING`` window.
    """
    fetch = fetch_offsets(targets, timeout_s=settings.request_timeout_s, batch_groups=batch_groups)
    advanced = advance_windows(
        windows or LagWindows(),
        fetch,
        size=settings.window,
        at=at,
        max_age_s=max(1, settings.window) * settings.interval_s * 3.0,
    )
    flows = []
    for target in targets:
        offsets = fetch.targets[target.name]
        now = at if at is not None else offsets.taken_at
        flows.append(
            evaluate_flow(
                offsets,
                advanced.for_target(target.name),
                settings,
                now=now,
                min_samples=min(MIN_SAMPLES, max(2, settings.window)),
                start=(starts or {}).get(target.name),
            )
        )
    return LagReport(tuple(flows), advanced, fetch)
