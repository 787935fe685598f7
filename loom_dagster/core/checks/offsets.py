"""Offset safety on redeploy: where the new job starts on every source partition, and whether a change of
consumer group, source topics or ``auto_offset_reset`` makes it re-read or skip messages.

No Dagster here. loom's Kafka source ``assign()``s every partition and starts from, in order: Bytewax
recovery state, the group's committed offset, else ``auto_offset_reset`` (``earliest``: the low
watermark; ``latest``: the end at assignment). A committed offset outside ``[low, end]`` (deleted by
retention) also falls back to ``auto_offset_reset``, as librdkafka does.

``plan_offsets`` reads, on the broker (AdminClient only: never joins a group, every call bounded by a
timeout), the low/end watermarks of the new plan's topics and the committed offsets of the new and the
previous group, and measures per topic what a reset would do:

* ``earliest``: re-reads what the previous group had already processed (low .. its committed offset);
  on a topic (or partition) the previous group never read, everything up to the end.
* ``latest``: skips what the previous group had not processed yet (its committed offset .. end); on a
  topic (or partition) the previous group never read, everything it holds.

A first deploy or an unchanged group/topics/reset never needs acceptance; a change that moves at least
one message does (``OffsetPlan.requires_acceptance``). ``start_offsets`` is computed for every deploy;
for ``latest`` it is the end measured now (messages produced between now and the job's start are
skipped too and not counted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.kafka.cluster import cluster_for
from loom_dagster.core.kafka.snapshot import OffsetSnapshot, OffsetSnapshotError, snapshot_offsets
from loom_dagster.core.redact import redact_text

if TYPE_CHECKING:
    from loom_dagster.core.flows.catalog import CompiledFlow

DEPLOY_OP = "loom_deploy"
"""The deploy op of a code location (``loom_dagster.assets.DEPLOY_OP``, without importing Dagster)."""
MAX_LISTED_PARTITIONS = 8
"""Partitions spelled out per topic in a detail line; the rest are counted."""


class OffsetCheckError(DeploymentError):
    """The broker could not be read to measure the new job's start offsets; nothing was touched."""


@dataclass(frozen=True)
class TopicReset:
    """The partitions of one topic that will start from ``auto_offset_reset`` and what that moves.

    ``messages``: re-read (``earliest``) or skipped (``latest``) messages, summed over ``partitions``.
    """

    topic: str
    partitions: tuple[int, ...]
    reset: str
    messages: int
    detail: str
    caused_by: str = ""
    """The change that makes these partitions reset (empty: they would have started from the reset
    anyway, e.g. the group never committed there, so no acceptance is needed for them)."""


@dataclass(frozen=True)
class OffsetPlan:
    """Where the new job starts on its source topics, and what changed since the previous deployment."""

    group_id: str
    auto_offset_reset: str
    changes: tuple[str, ...]
    resets: tuple[TopicReset, ...]
    start_offsets: dict[str, dict[int, int]]
    previous_group_id: str | None = None
    brokers: str = ""
    missing_topics: tuple[str, ...] = field(default=())

    @property
    def requires_acceptance(self) -> bool:
        """A change of group/topics/reset that makes some partition re-read or skip at least one message."""
        return bool(self.changes) and any(r.messages > 0 and r.caused_by for r in self.resets)

    @property
    def reset_messages(self) -> int:
        """Messages re-read or skipped because of a change, over every topic."""
        return sum(r.messages for r in self.resets if r.caused_by)

    def describe(self, flow_name: str) -> str:
        """What changed, the per-topic numbers measured on the broker and, if needed, the remedy."""
        lines = [self._headline(flow_name)]
        lines += [f"  - {change}" for change in self.changes]
        if self.resets:
            lines.append(
                f"Measured on brokers {self.brokers} (new group '{self.group_id}', "
                f"auto_offset_reset={self.auto_offset_reset}):"
            )
            lines += [f"  - {r.topic}: {r.detail}" for r in self.resets]
        if self.missing_topics:
            lines.append(f"Source topic(s) not found on the brokers: {', '.join(self.missing_topics)}.")
        if self.requires_acceptance:
            lines.append(self._remedy(flow_name))
        return redact_text("\n".join(lines))

    def _headline(self, flow_name: str) -> str:
        moved = "re-read" if self.auto_offset_reset == "earliest" else "skip"
        if self.requires_acceptance:
            return (
                f"Deploy of flow '{flow_name}' refused unless accepted: the new version would start from "
                f"auto_offset_reset={self.auto_offset_reset} and {moved} {self.reset_messages} message(s), "
                "because its Kafka source changed:"
            )
        if self.changes:
            return f"Flow '{flow_name}': the Kafka source changed, no message is re-read or skipped:"
        return f"Flow '{flow_name}': consumer group '{self.group_id}' on its source topics as before."

    def _remedy(self, flow_name: str) -> str:
        restore = []
        if self.previous_group_id and self.previous_group_id != self.group_id:
            restore.append(
                f"the previous consumer group '{self.previous_group_id}' (kafka.consumer.group_id)"
            )
        if any(c.startswith(("source topic", "auto_offset_reset")) for c in self.changes):
            restore.append(
                "the previous topics / auto_offset_reset (kafka.consumer.topics, auto_offset_reset)"
            )
        fix = (
            "To deploy anyway, set accept_offset_reset: true in the run config "
            f"(ops -> {DEPLOY_OP} -> config; it applies to every flow the run deploys)"
        )
        return fix + (f"; or restore {' and '.join(restore)} in the flow's config." if restore else ".")

    def metadata(self) -> dict[str, object]:
        """JSON-able summary for the materialization: group, reset, changes, counts, start offsets."""
        key = "re_read" if self.auto_offset_reset == "earliest" else "skipped"
        return {
            "group_id": self.group_id,
            "previous_group_id": self.previous_group_id,
            "auto_offset_reset": self.auto_offset_reset,
            "changes": list(self.changes),
            "requires_acceptance": self.requires_acceptance,
            "resets": {
                r.topic: {
                    "partitions": list(r.partitions),
                    key: r.messages,
                    "caused_by": r.caused_by or None,
                    "detail": redact_text(r.detail),
                }
                for r in self.resets
            },
            "start_offsets": {
                t: {str(p): o for p, o in parts.items()} for t, parts in self.start_offsets.items()
            },
            "missing_topics": list(self.missing_topics),
        }


@dataclass(frozen=True)
class SourceFacts:
    """The facts of a Kafka source that decide where a job starts (``reset`` ``None``: unknown)."""

    kind: str
    group_id: str | None
    topics: tuple[str, ...]
    reset: str | None
    brokers: tuple[str, ...] = ()


def previous_facts(previous_source: Mapping[str, Any] | None) -> SourceFacts | None:
    """The previous deployment's source facts (``source_summary`` in a deployment record), or ``None``."""
    if not previous_source:
        return None
    reset = previous_source.get("auto_offset_reset")
    return SourceFacts(
        kind=str(previous_source.get("kind") or "kafka"),
        group_id=str(previous_source["group_id"]) if previous_source.get("group_id") else None,
        topics=tuple(str(t) for t in previous_source.get("topics") or ()),
        reset=str(reset) if reset else None,
        brokers=tuple(sorted(str(b) for b in previous_source.get("brokers") or ())),
    )


def source_changes(previous: SourceFacts | None, new: SourceFacts) -> tuple[str, ...]:
    """What changed between two sources that can move the start offsets (empty on a first deploy)."""
    if previous is None:
        return ()
    if previous.kind != "kafka":
        return (f"source kind changed: {previous.kind} -> kafka",)
    changes = []
    if previous.group_id != new.group_id:
        changes.append(f"consumer group changed: {previous.group_id} -> {new.group_id}")
    added = [t for t in new.topics if t not in previous.topics]
    removed = [t for t in previous.topics if t not in new.topics]
    if added:
        changes.append(f"source topic(s) added: {', '.join(added)}")
    if removed:
        changes.append(f"source topic(s) removed: {', '.join(removed)}")
    if previous.reset is not None and previous.reset != new.reset:
        changes.append(f"auto_offset_reset changed: {previous.reset} -> {new.reset}")
    if previous.brokers and new.brokers and previous.brokers != new.brokers:
        changes.append(
            redact_text(f"brokers changed: {','.join(previous.brokers)} -> {','.join(new.brokers)}")
        )
    return tuple(changes)


def plan_offsets(
    compiled: CompiledFlow, previous_source: Mapping[str, Any] | None, *, timeout_s: float = 10.0
) -> OffsetPlan | None:
    """Measure the new job's start offsets and any reset on the broker; ``None`` for non-Kafka sources.

    Raises ``OffsetCheckError`` (naming the brokers, redacted) when the broker cannot be read within
    *timeout_s*.
    """
    settings = getattr(compiled.plan.source, "settings", None)
    flow = compiled.flow
    if flow.source_kind != "kafka" or settings is None or not flow.consumer_group:
        return None
    new = SourceFacts(
        kind="kafka",
        group_id=flow.consumer_group,
        topics=tuple(dict.fromkeys(t.topic for t in flow.source_topics)),
        reset=str(getattr(settings, "auto_offset_reset", "earliest")),
        brokers=tuple(sorted(str(b) for b in settings.brokers)),
    )
    previous = previous_facts(previous_source)
    changes = source_changes(previous, new)
    old_group = previous.group_id if previous is not None and previous.kind == "kafka" else None
    groups = [g for g in dict.fromkeys([flow.consumer_group, old_group]) if g]
    cluster = cluster_for(settings)
    brokers = redact_text(cluster.bootstrap)
    try:
        snapshot = snapshot_offsets(cluster, new.topics, groups, timeout_s=timeout_s)
    except OffsetSnapshotError as exc:
        raise OffsetCheckError(
            redact_text(
                f"cannot measure where flow '{flow.name}' would start on its source topics: Kafka brokers "
                f"{brokers} did not answer within {timeout_s:g}s ({exc}). Nothing was stopped or launched. "
                "Check that the brokers in kafka.consumer.brokers are reachable from this host (and the "
                "security settings), then materialize again."
            )
        ) from exc
    read_before = previous.topics if previous is not None and old_group else ()
    causes = {topic: reset_cause(previous, new, changes, topic) for topic in new.topics}
    starts, resets = measure(snapshot, new, old_group, read_before, causes)
    return OffsetPlan(
        group_id=flow.consumer_group,
        auto_offset_reset=new.reset or "earliest",
        changes=changes,
        resets=resets,
        start_offsets=starts,
        previous_group_id=previous.group_id if previous is not None else None,
        brokers=brokers,
        missing_topics=snapshot.missing_topics,
    )


def reset_cause(previous: SourceFacts | None, new: SourceFacts, changes: Sequence[str], topic: str) -> str:
    """The change (one of *changes*) that makes *topic*'s uncommitted partitions start from the reset
    where the previous job would not have; empty if none (first deploy, or only a topic removed)."""
    if previous is None:
        return ""
    for change in changes:
        if change.startswith(("source kind", "consumer group", "auto_offset_reset", "brokers")):
            return change
    if topic not in previous.topics:
        return next((c for c in changes if c.startswith("source topic(s) added")), "")
    return ""


def measure(
    snapshot: OffsetSnapshot,
    new: SourceFacts,
    old_group: str | None,
    read_before: Sequence[str],
    causes: Mapping[str, str] | None = None,
) -> tuple[dict[str, dict[int, int]], tuple[TopicReset, ...]]:
    """Start offset of every partition and, per topic, the partitions starting from the reset."""
    reset = new.reset or "earliest"
    starts: dict[str, dict[int, int]] = {}
    resets = []
    for topic in new.topics:
        moved: list[_Moved] = []
        starts[topic] = {}
        for partition in snapshot.partitions.get(topic, ()):
            low, high = snapshot.low[(topic, partition)], snapshot.high[(topic, partition)]
            committed = snapshot.committed_offset(str(new.group_id), topic, partition)
            if committed is not None and low <= committed <= high:
                starts[topic][partition] = committed
                continue
            starts[topic][partition] = low if reset == "earliest" else high
            previous = snapshot.committed_offset(old_group, topic, partition) if old_group else None
            known = previous if topic in read_before and previous is not None else None
            moved.append(_moved(partition, low, high, known, reset))
        if moved:
            group = old_group if topic in read_before else None
            resets.append(_topic_reset(topic, moved, reset, group, (causes or {}).get(topic, "")))
    return starts, tuple(resets)


@dataclass(frozen=True)
class _Moved:
    """One partition starting from the reset: the offsets ``[first, last)`` it re-reads or skips."""

    partition: int
    first: int
    last: int
    read_before: bool

    @property
    def messages(self) -> int:
        return max(0, self.last - self.first)


def _moved(partition: int, low: int, high: int, previous: int | None, reset: str) -> _Moved:
    """What one partition re-reads (earliest) or skips (latest), given the previous group's commit."""
    if previous is None:
        return _Moved(partition, low, high, False)
    done = min(max(previous, low), high)
    return _Moved(partition, low, done, True) if reset == "earliest" else _Moved(partition, done, high, True)


def _topic_reset(
    topic: str, moved: list[_Moved], reset: str, old_group: str | None, cause: str
) -> TopicReset:
    """One topic's reset: partitions, messages moved and a sentence saying which and why."""
    total = sum(m.messages for m in moved)
    where = "the earliest offset" if reset == "earliest" else "the end"
    known = sum(m.messages for m in moved if m.read_before)
    unknown = sum(m.messages for m in moved if not m.read_before)
    clauses = []
    if any(m.read_before for m in moved):
        clauses.append(
            f"re-reads {known} message(s) group '{old_group}' had already processed"
            if reset == "earliest"
            else f"skips {known} message(s) group '{old_group}' had not processed yet"
        )
    if any(not m.read_before for m in moved):
        verb = "reads" if reset == "earliest" else "skips"
        clauses.append(f"{verb} all {unknown} message(s) of partition(s) the previous group never read")
    listed = ", ".join(_partition_text(m) for m in moved[:MAX_LISTED_PARTITIONS])
    if len(moved) > MAX_LISTED_PARTITIONS:
        listed += f", and {len(moved) - MAX_LISTED_PARTITIONS} more"
    why = f" because {cause}" if cause else " (no committed offset; not caused by a change)"
    detail = (
        f"{len(moved)} partition(s) start at {where}{why}: {' and '.join(clauses)}; {total} in all [{listed}]"
    )
    return TopicReset(topic, tuple(m.partition for m in moved), reset, total, detail, cause)


def _partition_text(moved: _Moved) -> str:
    if not moved.messages:
        return f"p{moved.partition}: 0"
    return f"p{moved.partition}: {moved.messages} (offsets {moved.first} to {moved.last - 1})"
