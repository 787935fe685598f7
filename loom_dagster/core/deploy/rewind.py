"""Rewind (or fast-forward) a deployed flow's consumer-group offsets: plan on the broker, then apply.

No Dagster here (``loom_dagster.jobs.reset_offsets`` is the ``loom_reset_offsets`` job around it).

``plan_rewind`` reads, without touching anything: the flow's current deployment record, its config
snapshot compiled again (the brokers, security settings, consumer group and topics the job really
uses), and on the broker (AdminClient only, never joins a group) the low/end watermarks and the group's
committed offsets of the selected partitions, plus, for ``to_datetime``, the first offset at or after the
time (``ListOffsets`` by timestamp; none: the end). Per partition it reports where the job resumes now
(the committed offset; without one, where ``auto_offset_reset`` puts it), the new offset, and how many
messages that re-reads (new < now) or skips (new > now).

``rewind_flow`` applies it: refuses at once while a deploy, restart or stop holds the flow's lock, plans,
then under the lock: checks the consumer-group fence, drains the running job (its final commit lands
first), checks that no job holds the fence any more (its commits would undo the reset), measures again
(what is reported is what is applied), sets the group's committed offsets
(``alter_consumer_group_offsets``; the group must have no active member), relaunches the SAME deployment
(its own request and config snapshot, as a restart does), waits for its health gate and records the
rewind (``restarts + 1``, an entry in ``extra["rewinds"]``). A flow stopped on purpose gets its offsets
reset and stays stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from loom_dagster.core.checks.fence import check_fence
from loom_dagster.core.deploy.lifecycle import recorded_spec
from loom_dagster.core.deploy.store import Deployment, DeploymentStore
from loom_dagster.core.errors import DeploymentError, LoomDagsterError
from loom_dagster.core.flows.catalog import compile_spec
from loom_dagster.core.flows.job_config import runtime_config
from loom_dagster.core.kafka.admin import group_offsets
from loom_dagster.core.kafka.cluster import KafkaCluster, cluster_for
from loom_dagster.core.kafka.isolation import in_child_process
from loom_dagster.core.kafka.snapshot import OffsetSnapshot, OffsetSnapshotError, snapshot_offsets
from loom_dagster.core.redact import redact_text

if TYPE_CHECKING:
    from loom_dagster.core.deploy.deployer import FlowDeployer
    from loom_dagster.core.flows.catalog import CompiledFlow
    from loom_dagster.core.flows.spec import LoomFlowSpec

Log = Callable[[str], None]
MODES = ("to_datetime", "earliest", "latest", "shift_by")
REWINDS_KEPT = 20
"""Entries kept in a deployment record's ``extra["rewinds"]`` (newest last)."""


class RewindError(DeploymentError):
    """A rewind was refused or failed; the message says what changed (usually: nothing)."""


class RewindRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What to rewind: a flow, exactly one target, an optional partition selection, and ``dry_run``.

    ``to_datetime`` (ISO 8601 with a timezone): the first message at or after that time; ``earliest`` /
    ``latest``: the low watermark / the end; ``shift_by``: that many messages from the committed offset
    (negative re-reads), clamped to the partition. ``topics`` (every partition of each) and ``partitions``
    (``{topic: [partition, ...]}``) restrict it; neither: every source partition.

    Example:
        >>> RewindRequest("orders", shift_by=-100, partitions={"orders.events": [0, 2]}).mode()
        'shift_by'
        >>> RewindRequest("orders", to_datetime="2026-03-01T12:00:00+00:00").timestamp_ms()
        1772366400000
    """

    flow: str
    to_datetime: str | None = None
    earliest: bool = False
    latest: bool = False
    shift_by: int | None = None
    topics: list[str] | None = None
    partitions: dict[str, list[int]] | None = None
    dry_run: bool = False

    def mode(self) -> str:
        """The one target given (``to_datetime``, ``earliest``, ``latest`` or ``shift_by``)."""
        given = [
            name
            for name, value in (
                ("to_datetime", self.to_datetime is not None),
                ("earliest", self.earliest),
                ("latest", self.latest),
                ("shift_by", self.shift_by is not None),
            )
            if value
        ]
        if len(given) != 1:
            what = "none" if not given else " and ".join(given)
            raise RewindError(
                f"rewind of flow {self.flow!r}: give exactly one of to_datetime, earliest: true, latest: true, "
                f"shift_by (got {what}); nothing was changed"
            )
        return given[0]

    def timestamp_ms(self) -> int | None:
        """``to_datetime`` in epoch milliseconds (``None`` for another target)."""
        if self.to_datetime is None:
            return None
        text = self.to_datetime.strip()
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            moment = None
        if moment is None or moment.tzinfo is None or moment.utcoffset() is None:
            reason = "is not an ISO 8601 datetime" if moment is None else "has no timezone"
            raise RewindError(
                f"rewind of flow {self.flow!r}: to_datetime {self.to_datetime!r} {reason}; write it as "
                "ISO 8601 with a timezone, e.g. 2026-03-01T12:00:00+00:00 or 2026-03-01T12:00:00Z. "
                "Nothing was changed."
            )
        return int(moment.timestamp() * 1000)

    def target_text(self) -> str:
        """The target for messages: ``to_datetime 2026-...``, ``earliest``, ``shift_by -5``."""
        mode = self.mode()
        if mode == "to_datetime":
            return f"to_datetime {self.to_datetime}"
        if mode == "shift_by":
            return f"shift_by {self.shift_by:+d}"
        return mode


class PartitionRewind(msgspec.Struct, frozen=True):
    """One partition: watermarks, the group's committed offset (``None``: no commit), where the job
    resumes now (``current``: the committed offset, else where ``auto_offset_reset`` puts it) and the
    new offset."""

    topic: str
    partition: int
    low: int
    high: int
    committed: int | None
    current: int
    new: int

    @property
    def reprocessed(self) -> int:
        """Messages read again: ``current - new`` when rewinding."""
        return max(0, self.current - self.new)

    @property
    def skipped(self) -> int:
        """Messages never read: ``new - current`` when fast-forwarding."""
        return max(0, self.new - self.current)

    def row(self) -> dict[str, Any]:
        """JSON-able row of the report table."""
        return {
            "topic": self.topic,
            "partition": self.partition,
            "low": self.low,
            "end": self.high,
            "committed": self.committed,
            "current": self.current,
            "new": self.new,
            "reprocessed": self.reprocessed,
            "skipped": self.skipped,
        }


class RewindPlan(msgspec.Struct, frozen=True):
    """The new offset of every selected partition, measured on the broker, and what it moves."""

    flow: str
    group_id: str
    brokers: str
    target: str
    auto_offset_reset: str
    partitions: tuple[PartitionRewind, ...]
    measured_at: float
    members: tuple[str, ...] = ()
    """Active members of the consumer group (client ids): a reset needs none."""

    @property
    def reprocessed(self) -> int:
        """Messages re-read, over every partition."""
        return sum(p.reprocessed for p in self.partitions)

    @property
    def skipped(self) -> int:
        """Messages skipped, over every partition."""
        return sum(p.skipped for p in self.partitions)

    def new_offsets(self) -> dict[tuple[str, int], int]:
        """``(topic, partition) -> new offset``."""
        return {(p.topic, p.partition): p.new for p in self.partitions}

    def describe(self) -> str:
        """Headline with the totals, then one line per partition (redacted)."""
        lines = [
            f"rewind of flow '{self.flow}' ({self.target}; consumer group '{self.group_id}' on brokers "
            f"{self.brokers}): {self.reprocessed} message(s) reprocessed, {self.skipped} skipped, over "
            f"{len(self.partitions)} partition(s)"
        ]
        for p in self.partitions:
            committed = "no commit" if p.committed is None else f"committed {p.committed}"
            if p.committed is None or p.committed != p.current:
                committed += f", resumes at {p.current} (auto_offset_reset={self.auto_offset_reset})"
            moved = (
                f"reprocess {p.reprocessed}"
                if p.reprocessed
                else f"skip {p.skipped}"
                if p.skipped
                else "no change"
            )
            lines.append(
                f"  - {p.topic}[{p.partition}]: {committed} -> {p.new} (low {p.low}, end {p.high}): {moved}"
            )
        if self.members:
            lines.append(f"  the consumer group has active member(s): {', '.join(self.members)}")
        return redact_text("\n".join(lines))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able report: totals and one row per partition."""
        return {
            "flow": self.flow,
            "consumer_group": self.group_id,
            "brokers": redact_text(self.brokers),
            "target": self.target,
            "auto_offset_reset": self.auto_offset_reset,
            "reprocessed": self.reprocessed,
            "skipped": self.skipped,
            "partitions": [p.row() for p in self.partitions],
            "active_members": list(self.members),
            "measured_at": self.measured_at,
        }


class RewindResult(msgspec.Struct, frozen=True):
    """What ``rewind_flow`` did. ``plan`` is what was applied (measured after the drain) or, for a dry run,
    what would be; ``planned`` the measure taken before touching anything."""

    plan: RewindPlan
    planned: RewindPlan
    applied: bool
    deployment: Deployment | None = None
    relaunched: bool = False
    drain_seconds: float | None = None
    gate_seconds: float | None = None
    seconds: float = 0.0


class FlowSource(msgspec.Struct, frozen=True):
    """A deployed flow's Kafka source as its job reads it (compiled from the deployment's config snapshot)."""

    deployment: Deployment
    compiled: CompiledFlow
    cluster: KafkaCluster
    group_id: str
    topics: tuple[str, ...]
    auto_offset_reset: str


def resolve_source(store: DeploymentStore, flow: str) -> FlowSource:
    """The flow's current deployment and its Kafka source; ``RewindError`` when it was never deployed, is
    not Kafka-sourced, or resumes from Bytewax recovery state (a group offset would not move it)."""
    current = store.current(flow)
    if current is None:
        raise RewindError(
            f"flow {flow!r} has never been deployed here ({store.location()}): it has no consumer group "
            "offsets to rewind. Materialize the flow first."
        )
    kind = (current.extra.get("source") or {}).get("kind")
    if kind not in (None, "kafka"):
        raise RewindError(f"flow {flow!r} reads from a {kind} source, not Kafka: it has no offsets to rewind")
    compiled, recovery = compile_deployment(store, current)
    settings = getattr(compiled.plan.source, "settings", None)
    if compiled.flow.source_kind != "kafka" or settings is None or not compiled.flow.consumer_group:
        raise RewindError(
            f"flow {flow!r} reads from a {compiled.flow.source_kind} source, not Kafka: it has no offsets to rewind"
        )
    if recovery:
        raise RewindError(
            f"flow {flow!r} runs with Bytewax recovery (streaming.runtime.recovery.db_dir {recovery}): its "
            "job resumes from the recovery snapshot, not from the consumer group's offsets, so a rewind "
            "would not take effect. Nothing was changed."
        )
    return FlowSource(
        deployment=current,
        compiled=compiled,
        cluster=cluster_for(settings),
        group_id=compiled.flow.consumer_group,
        topics=tuple(dict.fromkeys(t.topic for t in compiled.flow.source_topics)),
        auto_offset_reset=str(getattr(settings, "auto_offset_reset", "earliest") or "earliest"),
    )


def compile_deployment(store: DeploymentStore, deployment: Deployment) -> tuple[CompiledFlow, str | None]:
    """The deployment compiled from its own config snapshot (what its job runs, credentials included),
    and its Bytewax recovery directory (``None``: no recovery), read while the snapshot is readable."""
    try:
        with recorded_spec(store, deployment) as spec:
            compiled = compile_spec(spec, deployment.job.request.environment)
            return compiled, _recovery_dir(spec, compiled.flow.environment)
    except (LoomDagsterError, OSError) as exc:
        raise RewindError(
            redact_text(
                f"cannot compile the deployed version of flow {deployment.flow_name!r} from its config "
                f"snapshot: {exc}. Nothing was changed."
            )
        ) from exc


def _recovery_dir(spec: LoomFlowSpec, environment: str) -> str | None:
    """``streaming.runtime.recovery.db_dir`` of the spec's config, if recovery is on."""
    try:
        runtime = runtime_config(spec.load_config(environment))
    except Exception:  # an unreadable runtime section fails the job's start, not the rewind
        return None
    recovery = getattr(runtime, "recovery", None)
    return str(recovery.db_dir) if recovery is not None else None


def plan_rewind(store: DeploymentStore, request: RewindRequest, *, timeout_s: float = 10.0) -> RewindPlan:
    """Measure the rewind on the broker; touches nothing.

    Example:
        >>> plan = plan_rewind(DeploymentStore(), RewindRequest("orders", shift_by=-10))  # doctest: +SKIP
        >>> plan.reprocessed, [p.row() for p in plan.partitions]  # doctest: +SKIP
    """
    request.mode()
    request.timestamp_ms()
    return measure_rewind(resolve_source(store, request.flow), request, timeout_s=timeout_s)


def measure_rewind(source: FlowSource, request: RewindRequest, *, timeout_s: float = 10.0) -> RewindPlan:
    """The plan for *source*: selected partitions, their offsets now and the new ones (broker reads only)."""
    mode = request.mode()
    timestamp = request.timestamp_ms()
    flow = request.flow
    brokers = redact_text(source.cluster.bootstrap)
    wanted_topics = _selected_topics(source, request)
    try:
        snapshot = snapshot_offsets(source.cluster, wanted_topics, [source.group_id], timeout_s=timeout_s)
    except OffsetSnapshotError as exc:
        raise RewindError(
            redact_text(
                f"cannot read the offsets of flow {flow!r} (consumer group {source.group_id!r}) on Kafka "
                f"brokers {brokers} within {timeout_s:g}s: {exc}. Nothing was changed."
            )
        ) from exc
    if snapshot.missing_topics:
        raise RewindError(
            f"source topic(s) {', '.join(snapshot.missing_topics)} of flow {flow!r} do not exist on Kafka "
            f"brokers {brokers}; nothing was changed"
        )
    selected = _selected_partitions(flow, snapshot, wanted_topics, request.partitions or {})
    fallback = {
        tp: snapshot.low[tp] if source.auto_offset_reset == "earliest" else snapshot.high[tp]
        for tp in selected
    }
    current: dict[tuple[str, int], int] = {}
    committed: dict[tuple[str, int], int | None] = {}
    for tp in selected:
        value = snapshot.committed_offset(source.group_id, *tp)
        committed[tp] = value
        inside = value is not None and snapshot.low[tp] <= value <= snapshot.high[tp]
        current[tp] = value if inside and value is not None else fallback[tp]
    if mode == "earliest":
        new = {tp: snapshot.low[tp] for tp in selected}
    elif mode == "latest":
        new = {tp: snapshot.high[tp] for tp in selected}
    elif mode == "shift_by":
        shift = request.shift_by or 0
        new = {tp: min(max(current[tp] + shift, snapshot.low[tp]), snapshot.high[tp]) for tp in selected}
    else:
        assert timestamp is not None
        found = offsets_for_time(source.cluster, selected, timestamp, timeout_s)
        new = {tp: _clamp_time_offset(found[tp], snapshot.low[tp], snapshot.high[tp]) for tp in selected}
    members = group_members(source.cluster, source.group_id, timeout_s)
    return RewindPlan(
        flow=flow,
        group_id=source.group_id,
        brokers=brokers,
        target=request.target_text(),
        auto_offset_reset=source.auto_offset_reset,
        partitions=tuple(
            PartitionRewind(
                tp[0], tp[1], snapshot.low[tp], snapshot.high[tp], committed[tp], current[tp], new[tp]
            )
            for tp in selected
        ),
        measured_at=time.time(),
        members=members,
    )


def _selected_topics(source: FlowSource, request: RewindRequest) -> list[str]:
    """The source topics the request names (all when it names none); an unknown one is an error."""
    named = list(dict.fromkeys([*(request.topics or []), *(request.partitions or {})]))
    unknown = [t for t in named if t not in source.topics]
    if unknown:
        raise RewindError(
            f"topic(s) {', '.join(unknown)} are not source topics of flow {request.flow!r} (its source "
            f"topics: {', '.join(source.topics)}); nothing was changed"
        )
    return named or list(source.topics)


def _selected_partitions(
    flow: str, snapshot: OffsetSnapshot, topics: Sequence[str], partitions: Mapping[str, Sequence[int]]
) -> list[tuple[str, int]]:
    """Every partition of *topics*, but only the listed ones of a topic in *partitions*."""
    selected: list[tuple[str, int]] = []
    for topic in topics:
        existing = snapshot.partitions[topic]
        if topic in partitions:
            unknown = sorted({int(p) for p in partitions[topic]} - set(existing))
            if unknown:
                raise RewindError(
                    f"topic {topic!r} of flow {flow!r} has no partition {', '.join(map(str, unknown))} "
                    f"(its partitions: {', '.join(map(str, existing))}); nothing was changed"
                )
            if not partitions[topic]:
                raise RewindError(f"no partition listed for topic {topic!r}; nothing was changed")
            chosen: Sequence[int] = sorted({int(p) for p in partitions[topic]})
        else:
            chosen = existing
        selected += [(topic, p) for p in chosen]
    return selected


def _clamp_time_offset(found: int, low: int, high: int) -> int:
    """A by-time offset inside ``[low, end]``; -1 (no message at or after the time) is the end."""
    if found < 0:
        return high
    return min(max(found, low), high)


def offsets_for_time(
    cluster: KafkaCluster, partitions: Sequence[tuple[str, int]], timestamp_ms: int, timeout_s: float
) -> dict[tuple[str, int], int]:
    """The first offset whose timestamp is at or after *timestamp_ms*, per partition (-1: none), in ONE
    ``ListOffsets`` request (AdminClient, no group)."""
    from confluent_kafka import IsolationLevel, TopicPartition
    from confluent_kafka.admin import AdminClient, OffsetSpec

    if not partitions:
        return {}
    admin = AdminClient(dict[str, Any](cluster.client_config()))
    spec = OffsetSpec.for_timestamp(timestamp_ms)
    futures = admin.list_offsets(
        {TopicPartition(t, p): spec for t, p in partitions},
        isolation_level=IsolationLevel.READ_COMMITTED,
        request_timeout=timeout_s,
    )
    out: dict[tuple[str, int], int] = {}
    errors = []
    for tp, future in futures.items():
        try:
            out[(tp.topic, tp.partition)] = int(future.result().offset)
        except Exception as exc:
            errors.append(f"{tp.topic}[{tp.partition}]: {exc}")
    if errors:
        raise RewindError(
            redact_text(f"offsets for the time could not be read: {'; '.join(errors)}; nothing was changed")
        )
    return out


def _client_died(reason: str, *args: Any, **kwargs: Any) -> Any:
    raise RewindError(f"the Kafka request could not complete: {reason}; nothing was changed")


@in_child_process(on_crash=_client_died, retries=1)
def group_members(cluster: KafkaCluster, group: str, timeout_s: float) -> tuple[str, ...]:
    """Client ids (with host) of the consumer group's active members: loom's jobs ``assign()`` and never
    join, so any member is some other consumer of the group. A coordinator request: run in a child
    process (``loom_dagster.core.kafka.isolation``)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(dict[str, Any](cluster.client_config()))
    future = admin.describe_consumer_groups([group], request_timeout=timeout_s)[group]
    try:
        description = future.result(timeout=timeout_s + 1)
    except Exception as exc:
        raise RewindError(
            redact_text(f"cannot describe consumer group {group!r}: {exc}; nothing was changed")
        ) from exc
    return tuple(f"{m.client_id}@{m.host}" for m in description.members)


def _client_died_altering(reason: str, cluster: KafkaCluster, group: str, *args: Any, **kwargs: Any) -> None:
    raise RewindError(
        f"the Kafka client died while setting the offsets of group {group!r} ({reason}): they may or may "
        "not have been changed; a dry run of the rewind (dry_run: true) shows the committed offsets now"
    )


@in_child_process(on_crash=_client_died_altering)
def alter_offsets(
    cluster: KafkaCluster, group: str, offsets: Mapping[tuple[str, int], int], timeout_s: float
) -> None:
    """Set *group*'s committed offsets (one ``OffsetCommit`` through the AdminClient), then read them back;
    ``RewindError`` if the broker refused any (e.g. the group has active members) or they differ. Run in
    a child process (coordinator requests: ``loom_dagster.core.kafka.isolation``)."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(dict[str, Any](cluster.client_config()))
    request = [
        ConsumerGroupTopicPartitions(group, [TopicPartition(t, p, o) for (t, p), o in offsets.items()])
    ]
    future = admin.alter_consumer_group_offsets(request, request_timeout=timeout_s)[group]
    try:
        result = future.result(timeout=timeout_s + 1)
    except Exception as exc:
        raise RewindError(
            redact_text(f"the broker refused the new offsets of group {group!r}: {exc}")
        ) from exc
    failed = [f"{tp.topic}[{tp.partition}]: {tp.error}" for tp in result.topic_partitions if tp.error]
    if failed:
        raise RewindError(
            redact_text(f"the broker refused new offsets of group {group!r}: {'; '.join(failed)}")
        )
    back = group_offsets(admin, {group: set(offsets)}, timeout_s).get(group, {})
    wrong = [f"{t}[{p}]: {back.get((t, p))} != {o}" for (t, p), o in offsets.items() if back.get((t, p)) != o]
    if wrong:
        raise RewindError(f"group {group!r} reads back other offsets than were set: {'; '.join(wrong)}")


def rewind_flow(deployer: FlowDeployer, request: RewindRequest, *, by: str, log: Log = print) -> RewindResult:
    """Plan the rewind on the broker and, unless ``dry_run``, apply it: drain, reset, relaunch, record.

    Raises ``RewindError`` (a ``DeploymentError``) saying whether anything changed.

    Example:
        >>> from loom_dagster import LoomDeployResource
        >>> result = rewind_flow(LoomDeployResource().deployer(),  # doctest: +SKIP
        ...     RewindRequest("orders", to_datetime="2026-03-01T12:00:00Z"), by="operator")
        >>> result.plan.reprocessed  # doctest: +SKIP
        1234
    """
    started = time.monotonic()
    store = deployer.store
    timeout = deployer.options.connect_timeout_s
    request.mode()
    request.timestamp_ms()
    flow = request.flow
    if store.lock_held(flow):
        raise RewindError(
            f"flow {flow!r} is being deployed, restarted or stopped right now (its deploy lock is held); "
            "the rewind was refused and nothing was changed. Run it again once that is done."
        )
    source = resolve_source(store, flow)
    planned = measure_rewind(source, request, timeout_s=timeout)
    log(("dry run: " if request.dry_run else "planned: ") + planned.describe())
    if request.dry_run:
        return RewindResult(planned, planned, applied=False, seconds=time.monotonic() - started)
    if planned.members:
        raise _members_error(planned, "nothing was changed")
    with store.lock(flow, holder=by):
        return _apply(deployer, source, request, planned, by, log, started)


def _apply(
    deployer: FlowDeployer,
    source: FlowSource,
    request: RewindRequest,
    planned: RewindPlan,
    by: str,
    log: Log,
    started: float,
) -> RewindResult:
    """Under the flow's lock: fence, drain, measure again, reset, relaunch, record."""
    store, flow, timeout = deployer.store, request.flow, deployer.options.connect_timeout_s
    current = store.current(flow)
    if current is None or not _same_deployment(current, source.deployment):
        raise RewindError(
            f"flow {flow!r} was redeployed, restarted or stopped while the rewind was being planned; "
            "nothing was changed. Run the rewind again."
        )
    check_fence(source.compiled, current, timeout_s=timeout)
    relaunch = not current.stopped_on_purpose
    if relaunch:
        deployer.reachable(current)  # a job this launcher cannot see could not be drained: refuse now
    log(f"draining the job ({current.job.processes_text}) if it runs")
    drain_seconds = deployer.drain(current)
    if drain_seconds is not None:
        log(f"job stopped in {drain_seconds:.2f}s")
    try:
        # no job may consume the group any more (its commits would undo the reset): its fence is free
        check_fence(source.compiled, None, timeout_s=timeout)
        plan = measure_rewind(source, request, timeout_s=timeout)
        if plan.members:
            raise _members_error(plan, "the offsets were not changed")
        store.ensure_held(flow, "reset the group's offsets")
        alter_offsets(source.cluster, source.group_id, plan.new_offsets(), timeout)
    except Exception as failure:
        if not relaunch:
            raise
        try:
            job, _ = deployer.relaunch_healthy(current)
        except DeploymentError as again:
            raise RewindError(
                f"{failure}\nThe rewind did not complete; relaunching the job failed too: {again}"
            ) from failure
        store.save(deployer.relaunched(current, job))
        raise RewindError(
            f"{failure}\nThe rewind did not complete; the job runs again ({job.processes_text})."
        ) from failure
    log("applied: " + plan.describe())
    entry = _rewind_entry(plan, by)
    if not relaunch:
        record = msgspec.structs.replace(current, extra=_extra_with(current.extra, plan, entry))
        store.save(record)
        log(f"flow {flow!r} was stopped on purpose by {current.stopped_by}: offsets reset, not relaunched")
        return RewindResult(
            plan, planned, True, record, False, drain_seconds, None, time.monotonic() - started
        )
    log("relaunching the job; waiting for it to become healthy")
    try:
        job, gate_seconds = deployer.relaunch_healthy(current)
    except DeploymentError as failure:
        store.save(msgspec.structs.replace(current, extra=_extra_with(current.extra, plan, entry)))
        raise RewindError(
            f"the offsets of flow {flow!r} were reset ({plan.reprocessed} message(s) to reprocess, "
            f"{plan.skipped} skipped) but the relaunched job failed its health gate: {failure}\nNothing "
            "runs now; the job health sensor restarts it, or materialize the flow."
        ) from failure
    record = deployer.relaunched(current, job, extra=_extra_with(current.extra, plan, entry))
    store.save(record)
    log(f"flow {flow!r} runs again from the new offsets: {job.processes_text}")
    return RewindResult(
        plan, planned, True, record, True, drain_seconds, gate_seconds, time.monotonic() - started
    )


def _same_deployment(a: Deployment, b: Deployment) -> bool:
    return (a.plan_hash, a.config_hash, a.deployed_at, a.job, a.stopped_at) == (
        b.plan_hash,
        b.config_hash,
        b.deployed_at,
        b.job,
        b.stopped_at,
    )


def _members_error(plan: RewindPlan, what: str) -> RewindError:
    return RewindError(
        redact_text(
            f"consumer group {plan.group_id!r} of flow {plan.flow!r} has active member(s): "
            f"{', '.join(plan.members)}. loom jobs never join their group, so another consumer uses it; the "
            f"broker refuses new offsets while it is there. Stop it first; {what}."
        )
    )


def _rewind_entry(plan: RewindPlan, by: str) -> dict[str, Any]:
    """What ``extra["rewinds"]`` keeps of one rewind."""
    offsets: dict[str, dict[str, int]] = {}
    for p in plan.partitions:
        offsets.setdefault(p.topic, {})[str(p.partition)] = p.new
    return {
        "at": time.time(),
        "by": by,
        "target": plan.target,
        "reprocessed": plan.reprocessed,
        "skipped": plan.skipped,
        "offsets": offsets,
    }


def _extra_with(extra: Mapping[str, Any], plan: RewindPlan, entry: dict[str, Any]) -> dict[str, Any]:
    """*extra* with the rewind appended to ``rewinds`` and the new offsets as ``start_offsets``."""
    out = dict(extra)
    out["rewinds"] = [*list(out.get("rewinds") or [])[-(REWINDS_KEPT - 1) :], entry]
    starts = {t: dict(parts) for t, parts in (out.get("start_offsets") or {}).items()}
    for p in plan.partitions:
        starts.setdefault(p.topic, {})[str(p.partition)] = p.new
    out["start_offsets"] = starts
    return out
