"""Watermarks and committed offsets read once, without joining any group (the deploy's offset check).
AdminClient only. No Dagster here."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from loom_dagster.core.kafka.admin import describe_topics, group_offsets, list_offsets
from loom_dagster.core.kafka.cluster import PROBE_TIMEOUT_S, KafkaCluster, probe
from loom_dagster.core.kafka.isolation import in_child_process


class OffsetSnapshot(msgspec.Struct, frozen=True):
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


def _client_died(reason: str, *args: Any, **kwargs: Any) -> OffsetSnapshot:
    raise OffsetSnapshotError(reason)


@in_child_process(on_crash=_client_died, retries=1)
def snapshot_offsets(
    cluster: KafkaCluster, topics: Sequence[str], groups: Sequence[str], *, timeout_s: float = 10.0
) -> OffsetSnapshot:
    """Low and high watermarks of every partition of *topics* and the committed offsets of *groups* there.

    Uses the AdminClient only (``describe_topics``, ``list_offsets``, ``list_consumer_group_offsets``):
    no consumer, no group membership, in a child process (``loom_dagster.core.kafka.isolation``). Everything is bounded by *timeout_s* (plus a fast TCP probe that
    fails at once on a closed port). Partition errors (a fresh topic without a leader yet) are retried
    until the deadline. Raises ``OffsetSnapshotError`` (the cluster's bootstrap is NOT in the text: the
    caller names the brokers, redacted) when unreachable or when a partition never answered.
    """
    deadline = time.monotonic() + timeout_s
    refused = probe(cluster, min(timeout_s, PROBE_TIMEOUT_S))
    if refused is not None:
        raise OffsetSnapshotError(refused)
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(dict[str, Any](cluster.client_config()))
    names = sorted(set(topics))
    try:
        described = describe_topics(admin, names, timeout_s) if names else {}
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
        raw = group_offsets(admin, dict.fromkeys(groups, set(wanted)), left) if wanted else {}
        low_raw = list_offsets(admin, wanted, "earliest", max(0.5, deadline - time.monotonic()))
        high_raw = list_offsets(admin, wanted, "latest", max(0.5, deadline - time.monotonic()))
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
