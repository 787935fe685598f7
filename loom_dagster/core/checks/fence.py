"""At most one job per consumer group, enforced on the broker: the consumer-group fence.

loom's Kafka source uses ``assign()``: its consumer group shows no members, and two jobs with one
group both consume every partition (every message written twice). The deployment records cannot
prevent that when they are lost (wiped state dir, another ``DAGSTER_HOME``, two Dagster instances on
one host), so the job itself takes a lock that lives on the broker:

- the job joins the group ``<consumer group>.loom-fence`` (:func:`fence_group`), subscribed to the
  single-partition topic ``__loom_dagster_fence`` (created on demand), with the
  ``cooperative-sticky`` assignor: the member that owns partition 0 holds the fence, and a newcomer
  joining never takes it from a live holder (sticky). The holder pauses the partition (the topic
  holds no data anyway) and polls from a background thread to keep its membership;
- its ``client.id`` names it: ``loom-fence;flow=..;host=..;pid=..;ticks=..;run=..``
  (:class:`FenceIdentity`), so anyone describing the group can name the holder;
- a job that does not own partition 0 once a live holder is seen, or within the acquire timeout,
  refuses to start (exit ``EXIT_FENCED``) before its dataflow consumes anything;
- a holder that loses the partition (revoked, or lost after ``session.timeout.ms`` without a
  heartbeat, e.g. the process was frozen or the broker unreachable) stops its dataflow;
- the fence is released by a clean stop (consumer close = leave group: the next job acquires it at
  once) and expires with a dead job after the session timeout (:data:`DEFAULT_SESSION_TIMEOUT_S`).

Measured on Kafka 4.1.1 (loopback, ``group.initial.rebalance.delay.ms=0`` as the test broker):
acquiring a free fence takes ~0.05-0.1 s, a refusal while a live job holds it ~1 s (one heartbeat of
the holder), and a job SIGKILLed while holding it is replaced ~10 s later (the session timeout; a
redeploy after SIGKILL: 10.7 s from the kill to the new job connected, 8.5 s of it waiting for the
fence). On a broker with the default ``group.initial.rebalance.delay.ms=3000`` acquiring a free (empty)
fence takes 3.28 s against 0.27 s with the delay at 0 (``bench/fence_start.py``, medians of 5): the
broker delays the first rebalance of an empty group, and that is what the fence adds to every job start
there (a refusal still takes ~1.1 s).

Deploy side: :func:`check_fence` describes the fence group before anything is drained and raises
:class:`FenceHeld` when a job other than the current deployment's holds it. Standard library and
confluent-kafka only; no Dagster.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import msgspec

from loom_dagster.core import procfs
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.kafka.cluster import KafkaCluster, cluster_for
from loom_dagster.core.kafka.isolation import in_child_process
from loom_dagster.core.redact import redact_text

if TYPE_CHECKING:
    from loom_dagster.core.deploy.store import Deployment
    from loom_dagster.core.flows.catalog import CompiledFlow

log = logging.getLogger("loom_dagster.core.checks.fence")

FENCE_TOPIC = "__loom_dagster_fence"
FENCE_GROUP_SUFFIX = ".loom-fence"
CLIENT_ID_PREFIX = "loom-fence"
DEFAULT_SESSION_TIMEOUT_S = 10.0
"""How long a dead holder keeps the fence (the broker's ``group.min.session.timeout.ms`` is 6 s)."""
DEFAULT_ACQUIRE_TIMEOUT_S = 30.0
"""How long a starting job waits for the fence (covers a dead holder's session + a rebalance delay)."""
HEARTBEAT_INTERVAL_MS = 1000
_POLL_S = 0.2


class FenceError(Exception):
    """The fence could not be acquired: ``kind`` is ``held``, ``unreachable`` or ``config``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class FenceHeld(DeploymentError):
    """Another job holds (or is acquiring) the fence of the flow's consumer group; nothing was touched."""

    def __init__(self, message: str, status: FenceStatus) -> None:
        super().__init__(message)
        self.status = status


def fence_group(consumer_group: str) -> str:
    """The fence group of a consumer group."""
    return f"{consumer_group}{FENCE_GROUP_SUFFIX}"


class FenceIdentity(msgspec.Struct, frozen=True):
    """Who a fence member is: flow, host, pid (+ start ticks, so a reused pid is not mistaken), run."""

    flow: str
    host: str
    pid: int
    start_ticks: int | None = None
    run_id: str | None = None

    @classmethod
    def of_this_process(cls, flow: str, run_id: str | None = None) -> FenceIdentity:
        """The identity of the calling process."""
        pid = os.getpid()
        return cls(flow, socket.gethostname(), pid, procfs.start_ticks(pid), run_id)

    def client_id(self) -> str:
        """``loom-fence;flow=..;host=..;pid=..;ticks=..;run=..`` (values percent-encoded)."""
        parts = [CLIENT_ID_PREFIX, f"flow={_q(self.flow)}", f"host={_q(self.host)}", f"pid={self.pid}"]
        if self.start_ticks is not None:
            parts.append(f"ticks={self.start_ticks}")
        if self.run_id:
            parts.append(f"run={_q(self.run_id)}")
        return ";".join(parts)

    @classmethod
    def parse(cls, client_id: str) -> FenceIdentity | None:
        """Inverse of :meth:`client_id`; ``None`` for a client id we did not write."""
        head, _, rest = client_id.partition(";")
        if head != CLIENT_ID_PREFIX:
            return None
        fields = dict(item.partition("=")[::2] for item in rest.split(";") if item)
        try:
            return cls(
                flow=unquote(fields["flow"]),
                host=unquote(fields["host"]),
                pid=int(fields["pid"]),
                start_ticks=int(fields["ticks"]) if fields.get("ticks") else None,
                run_id=unquote(fields["run"]) if fields.get("run") else None,
            )
        except (KeyError, ValueError):
            return None

    @property
    def local(self) -> bool:
        """True when the member runs on this host."""
        return self.host == socket.gethostname()

    def alive(self) -> bool | None:
        """Whether the process still runs (``None``: another host, cannot tell)."""
        if not self.local:
            return None
        return procfs.is_alive(self.pid, self.start_ticks)

    def describe(self) -> str:
        """``pid P on host H (flow 'f', run r)``."""
        run = f", run {self.run_id}" if self.run_id else ""
        return f"pid {self.pid} on host {self.host} (flow {self.flow!r}{run})"

    def stop_hint(self) -> str:
        """How to stop that job."""
        return (
            f"stop it with `loom-dagster stop {self.flow}` on host {self.host} (any state dir: it stops a "
            f"job without a record too), or `kill {self.pid}` on host {self.host} (SIGTERM drains it)"
        )


def _q(value: str) -> str:
    return quote(value, safe="")


class FenceMember(msgspec.Struct, frozen=True):
    """One member of a fence group as the broker describes it."""

    client_id: str
    address: str
    holds: bool
    identity: FenceIdentity | None

    def maybe_alive(self) -> bool:
        """False only for a member known dead (a process of this host that is gone)."""
        return self.identity is None or self.identity.alive() is not False

    def describe(self) -> str:
        """The member in words (its identity, else its raw client id and address)."""
        if self.identity is not None:
            return self.identity.describe()
        return f"client {self.client_id!r} from {self.address.lstrip('/')} (not a loom-dagster job)"


class FenceStatus(msgspec.Struct, frozen=True):
    """The fence of one consumer group: its group, its members, and whether the fence applies at all."""

    consumer_group: str | None
    members: tuple[FenceMember, ...] = ()
    applies: bool = True
    note: str = ""

    @property
    def group(self) -> str | None:
        """The fence group (``None`` when the flow is not Kafka-sourced)."""
        return fence_group(self.consumer_group) if self.consumer_group else None

    @property
    def holder(self) -> FenceMember | None:
        """The member owning partition 0, if any."""
        return next((m for m in self.members if m.holds), None)


@in_child_process(retries=1)
def describe_fences(
    cluster: KafkaCluster, groups: Sequence[str], timeout_s: float
) -> dict[str, tuple[FenceMember, ...]]:
    """The members of several fence groups of one cluster, in ONE DescribeGroups round (a coordinator
    request: run in a child process, ``loom_dagster.core.kafka.isolation``).

    Raises:
        ConnectionError: the brokers did not answer within ``timeout_s``, or the Kafka client died.
    """
    if not groups:
        return {}
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({**cluster.client_config(), "socket.timeout.ms": int(timeout_s * 1000)})
    futures = admin.describe_consumer_groups(list(groups), request_timeout=timeout_s)
    out: dict[str, tuple[FenceMember, ...]] = {}
    for group, future in futures.items():
        try:
            description = future.result(timeout=timeout_s + 1)
        except Exception as exc:
            raise ConnectionError(
                f"could not describe fence group {group!r} on Kafka brokers {cluster.bootstrap}: "
                f"{redact_text(str(exc))}"
            ) from exc
        out[group] = tuple(_member(m) for m in description.members)
    return out


def _member(member: Any) -> FenceMember:
    assignment = getattr(member, "assignment", None)
    parts = getattr(assignment, "topic_partitions", None) or ()
    holds = any(tp.topic == FENCE_TOPIC and tp.partition == 0 for tp in parts)
    client_id = str(member.client_id or "")
    return FenceMember(client_id, str(member.host or ""), holds, FenceIdentity.parse(client_id))


def fence_target(compiled: CompiledFlow) -> tuple[KafkaCluster, str] | None:
    """Cluster and consumer group of a Kafka-sourced flow (``None``: no fence, e.g. Mongo source)."""
    flow = compiled.flow
    if flow.source_kind != "kafka" or not flow.consumer_group:
        return None
    settings = getattr(compiled.plan.source, "settings", None)
    if settings is None:
        return None
    return cluster_for(settings), flow.consumer_group


def check_fence(compiled: CompiledFlow, current: Deployment | None, *, timeout_s: float) -> FenceStatus:
    """Describe the flow's fence group (one request) before anything is drained.

    Fine when nobody holds it, when the member is the job of ``current`` (same host and pid: the
    deploy drains it, which releases the fence), or when the member is a dead process on this host
    (its membership expires within the session timeout; the new job waits for it).

    Raises:
        FenceHeld: another job holds or is acquiring the fence; the message names it and how to stop it.
        DeploymentError: the brokers did not answer.
    """
    target = fence_target(compiled)
    name = compiled.flow.name
    if target is None:
        return FenceStatus(None, applies=False, note=f"flow {name!r} is not Kafka-sourced: no fence")
    cluster, consumer_group = target
    group = fence_group(consumer_group)
    try:
        members = describe_fences(cluster, [group], timeout_s)[group]
    except ConnectionError as exc:
        raise DeploymentError(
            f"cannot check the fence of flow {name!r} (consumer group {consumer_group!r}): {exc}. "
            "Check that the brokers are reachable from here (kafka.consumer.brokers); nothing was touched."
        ) from exc
    status = FenceStatus(consumer_group, members)
    others = [m for m in members if not _is_current(m, current) and m.maybe_alive()]
    if others:
        raise FenceHeld(_held_message(name, consumer_group, others), status)
    dead = [m for m in members if m.identity is not None and m.identity.alive() is False]
    if dead:
        note = "; ".join(m.describe() for m in dead)
        status = FenceStatus(
            consumer_group,
            members,
            note=f"dead job(s) still in the fence group until their session expires "
            f"(<= {DEFAULT_SESSION_TIMEOUT_S:.0f}s): {note}; the new job waits for it",
        )
    return status


def _is_current(member: FenceMember, current: Deployment | None) -> bool:
    """True if the member is a process of the current deployment's job."""
    identity = member.identity
    return current is not None and identity is not None and current.runs_process(identity.host, identity.pid)


def _held_message(flow: str, consumer_group: str, others: Iterable[FenceMember]) -> str:
    lines = [
        f"flow {flow!r} cannot be deployed: another job consumes its consumer group "
        f"{consumer_group!r} (it holds or is acquiring the fence group {fence_group(consumer_group)!r}) "
        "and has no deployment record here; two jobs in one group would each read every message. "
        "Nothing was stopped or started."
    ]
    for member in others:
        role = "holds the fence" if member.holds else "is acquiring the fence"
        hint = member.identity.stop_hint() if member.identity is not None else "stop that client"
        lines.append(f"  - {member.describe()} {role}: {hint}")
    lines.append("Then materialize again.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- job side


class JobFence:
    """The fence as held by a running job: acquire before the dataflow starts, release on stop.

    ``on_lost`` is called (once, from the fence thread) with a reason when the fence is lost while
    held; the job must then stop its dataflow.
    """

    def __init__(
        self,
        cluster: KafkaCluster,
        consumer_group: str,
        identity: FenceIdentity,
        *,
        on_lost: Callable[[str], None],
        session_timeout_s: float = DEFAULT_SESSION_TIMEOUT_S,
    ) -> None:
        self.cluster = cluster
        self.consumer_group = consumer_group
        self.group = fence_group(consumer_group)
        self.identity = identity
        self.session_timeout_s = session_timeout_s
        self._on_lost = on_lost
        self._consumer: Any = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._assigned: list[int] | None = None
        self._held = False
        self.lost_reason: str | None = None

    def acquire(self, timeout_s: float = DEFAULT_ACQUIRE_TIMEOUT_S) -> float:
        """Join the fence group and wait until this job owns partition 0; return the seconds it took.

        Raises:
            FenceError: ``held`` (a live job owns it, named in the message), ``unreachable`` (no
                broker answered), ``config`` (the fence topic cannot be created or has >1 partition).
        """
        started = time.monotonic()
        deadline = started + timeout_s
        self._ensure_topic(timeout_s)
        self._consumer = self._new_consumer()
        try:
            self._consumer.subscribe(
                [FENCE_TOPIC], on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lose
            )
            self._wait_for_partition(deadline, timeout_s)
        except BaseException:
            self._close_consumer()
            raise
        self._held = True
        self._thread = threading.Thread(target=self._keep, name="loom-fence", daemon=True)
        self._thread.start()
        return time.monotonic() - started

    def release(self) -> None:
        """Leave the fence group (the next job acquires it at once); idempotent."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout=self.session_timeout_s + 5)
            self._thread = None
        elif self._consumer is not None:
            self._close_consumer()

    # ----- internals

    def _config(self) -> dict[str, Any]:
        return {
            **self.cluster.client_config(),
            "group.id": self.group,
            "client.id": self.identity.client_id(),
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": int(self.session_timeout_s * 1000),
            "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
            "max.poll.interval.ms": 300000,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "latest",
        }

    def _new_consumer(self) -> Any:
        from confluent_kafka import Consumer

        return Consumer(self._config())

    def _ensure_topic(self, timeout_s: float) -> None:
        """Create the single-partition fence topic if missing; refuse one with more partitions."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({**self.cluster.client_config(), "socket.timeout.ms": 10000})
        meta_timeout = min(timeout_s, 10.0)
        try:
            topic = admin.list_topics(FENCE_TOPIC, timeout=meta_timeout).topics.get(FENCE_TOPIC)
        except KafkaException as exc:
            raise FenceError(
                f"cannot reach the Kafka brokers {self.cluster.bootstrap} to take the consumer-group "
                f"fence: {redact_text(str(exc))}",
                "unreachable",
            ) from exc
        if topic is None or topic.error is not None:
            self._create_topic(admin, NewTopic(FENCE_TOPIC, num_partitions=1, replication_factor=-1))
            topic = admin.list_topics(FENCE_TOPIC, timeout=meta_timeout).topics.get(FENCE_TOPIC)
        count = len(topic.partitions) if topic is not None else 0
        if count != 1:
            raise FenceError(
                f"the fence topic {FENCE_TOPIC!r} on {self.cluster.bootstrap} has {count} partitions; the "
                f"fence needs exactly 1. Delete it (it holds no data; loom-dagster recreates it with 1 "
                f"partition) or recreate it: kafka-topics --create --topic {FENCE_TOPIC} --partitions 1",
                "config",
            )

    def _create_topic(self, admin: Any, new_topic: Any) -> None:
        from confluent_kafka import KafkaError

        future = admin.create_topics([new_topic], operation_timeout=10)[FENCE_TOPIC]
        try:
            future.result(timeout=15)
        except Exception as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                return
            raise FenceError(
                f"cannot create the fence topic {FENCE_TOPIC!r} on {self.cluster.bootstrap}: "
                f"{redact_text(str(exc))}. Create it once (kafka-topics --create --topic {FENCE_TOPIC} "
                "--partitions 1) or grant this client CREATE on it; the job also needs READ on the topic "
                f"and on the group {self.group!r}",
                "config",
            ) from exc

    def _wait_for_partition(self, deadline: float, timeout_s: float) -> None:
        while time.monotonic() < deadline:
            self._consumer.poll(_POLL_S)
            if self._assigned and 0 in self._assigned:
                return
            if self._assigned is not None:
                holder = self._live_holder()
                if holder is not None:
                    raise FenceError(self._refusal(holder), "held")
        raise FenceError(self._timeout_message(timeout_s), "held")

    def _live_holder(self) -> FenceMember | None:
        try:
            members = describe_fences(self.cluster, [self.group], 5.0)[self.group]
        except ConnectionError:
            return None
        own = self.identity.client_id()
        return next((m for m in members if m.holds and m.client_id != own), None)

    def _refusal(self, holder: FenceMember) -> str:
        hint = holder.identity.stop_hint() if holder.identity is not None else "stop that client"
        return (
            f"flow {self.identity.flow!r} refused to start: consumer group {self.consumer_group!r} is "
            f"already consumed by {holder.describe()}, which holds the fence group {self.group!r}. Two "
            f"jobs in one group would each read every message (duplicates). If that job should not "
            f"run, {hint}; then start this one again"
        )

    def _timeout_message(self, timeout_s: float) -> str:
        try:
            members = describe_fences(self.cluster, [self.group], 5.0)[self.group]
        except ConnectionError as exc:
            return f"could not take the fence of consumer group {self.consumer_group!r} within {timeout_s:.0f}s: {exc}"
        own = self.identity.client_id()
        others = "; ".join(
            m.describe() + (" (holds it)" if m.holds else "") for m in members if m.client_id != own
        )
        return (
            f"flow {self.identity.flow!r} refused to start: it did not get the fence group {self.group!r} of "
            f"consumer group {self.consumer_group!r} within {timeout_s:.0f}s (other members: "
            f"{others or 'none'}). A job killed less than {self.session_timeout_s:.0f}s ago keeps it until "
            "its session expires; start this one again"
        )

    def _assign(self, consumer: Any, partitions: list[Any]) -> None:
        self._assigned = sorted({*(self._assigned or ()), *(p.partition for p in partitions)})
        if partitions:
            consumer.pause(partitions)

    def _revoke(self, consumer: Any, partitions: list[Any]) -> None:
        del consumer
        gone = {p.partition for p in partitions}
        self._assigned = [p for p in (self._assigned or ()) if p not in gone]
        if 0 in gone:
            self._lost("the broker revoked it (rebalance)")

    def _lose(self, consumer: Any, partitions: list[Any]) -> None:
        del consumer
        gone = {p.partition for p in partitions}
        self._assigned = [p for p in (self._assigned or ()) if p not in gone]
        if 0 in gone:
            self._lost(
                f"its membership expired (no heartbeat reached the broker for "
                f"{self.session_timeout_s:.0f}s: frozen process or unreachable broker)"
            )

    def _lost(self, why: str) -> None:
        if not self._held or self._closing.is_set() or self.lost_reason is not None:
            return
        self.lost_reason = (
            f"lost the fence of consumer group {self.consumer_group!r} ({why}); another job may consume "
            "the group now, so this one stops"
        )
        self._on_lost(self.lost_reason)

    def _keep(self) -> None:
        """Poll until released (keeps the membership, serves rebalance callbacks), then leave."""
        try:
            while not self._closing.is_set():
                self._consumer.poll(_POLL_S)
        except Exception as exc:  # the consumer is unusable: the fence cannot be kept
            self._lost(f"the fence consumer failed: {redact_text(str(exc))}")
        finally:
            self._close_consumer()

    def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                # librdkafka 2.16: close() alone does not leave the group when the cooperative
                # assignment is empty (measured: the member stayed until its session expired).
                consumer.unsubscribe()
                consumer.close()
            except Exception as exc:  # closing is best effort; the session expires anyway
                log.warning("closing the fence consumer failed: %s", redact_text(str(exc)))


def fence_for(
    consumer_settings: Any, consumer_group: str, identity: FenceIdentity, on_lost: Callable[[str], None]
) -> JobFence:
    """A :class:`JobFence` for loom ``ConsumerSettings`` (brokers + security via ``cluster_for``)."""
    return JobFence(cluster_for(consumer_settings), consumer_group, identity, on_lost=on_lost)


def members_by_group(
    clusters: Mapping[KafkaCluster, Sequence[str]], timeout_s: float
) -> tuple[dict[str, tuple[FenceMember, ...]], dict[KafkaCluster, str]]:
    """Fence members of many groups: one describe per cluster; unreachable clusters with the reason."""
    members: dict[str, tuple[FenceMember, ...]] = {}
    errors: dict[KafkaCluster, str] = {}
    for cluster, groups in clusters.items():
        try:
            members.update(describe_fences(cluster, sorted(set(groups)), timeout_s))
        except ConnectionError as exc:
            errors[cluster] = str(exc)
    return members, errors
