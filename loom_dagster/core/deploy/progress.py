"""Data progress of a flow's job: does a new version move data? No Dagster here.

Two signals, both counted from the new job's start:

* **commits**: the flow's consumer group committed past the offsets the job started from on some
  source partition (read with the AdminClient, ``kafka.snapshot.snapshot_offsets``: it never joins the
  group);
* **sink rows**: the job's status records (``runtime.status``) count the rows each sink wrote; a
  dead-letter topic does not count.

*Input* is what waited for the job: the end offsets above its start offsets. The start offsets are
measured after the previous job drained (what it committed last is where the new one starts), else
taken from the deploy's offset plan (``offset_safety.OffsetPlan.start_offsets``).

Three users:

* the deploy's **progress gate** (``LoomDeployResource(gate="progress")``): ``ProgressGate`` polls both
  signals after the health gate for ``progress_window_s``; it passes at the first commit or row, or at
  once when nothing waits (saying so); otherwise the deployer stops the new job and restarts the
  previous deployment (``ProgressGateFailed`` names the signal that did not move);
* the deployment record: ``previous_progress`` keeps in ``extra["previous_progress"]`` whether the
  replaced version was moving data when it was replaced;
* the **regression watch** of the job health sensor (``JobHealthSettings.regression_watch_ticks``):
  ``watch_eligibility``, ``WatchState`` and ``observe_tick`` decide, tick after tick, whether a new
  version stalls where the previous one was moving data (then it is rolled back once:
  ``FlowDeployer.roll_back_to_previous`` records ``extra["rolled_back_from"]``).

Limitation: loom flushes a table buffer (and commits its offsets) only when more data arrives, so a
flow whose only sinks are tables may hold a small input in its buffers and show neither signal; the
gate passes such a job when it read records and the waiting input fits in its buffers (``buffered``,
said in the verdict).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import msgspec

from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.kafka.cluster import KafkaCluster, cluster_for
from loom_dagster.core.kafka.snapshot import OffsetSnapshotError, snapshot_offsets
from loom_dagster.core.redact import redact_text

if TYPE_CHECKING:
    from loom_dagster.core.checks.offsets import OffsetPlan
    from loom_dagster.core.deploy.launch_records import JobReport, LaunchedJob
    from loom_dagster.core.deploy.store import Deployment
    from loom_dagster.core.flows.catalog import CompiledFlow
    from loom_dagster.core.kafka.lag_eval import FlowLag
    from loom_dagster.core.launchers.base import Launcher

Offsets = dict[str, dict[int, int]]
"""topic -> partition -> offset."""
Log = Callable[[str], None]

POLL_S = 1.0
"""Seconds between two readings of the progress gate."""
MAX_LISTED = 4
"""Partitions named in a message; the rest are counted."""
STALL_TICKS = 3
"""Ticks in a row without a sink row (while the lag grew) after which the watch calls a version stalled."""
STALLED_STATUSES = frozenset({"STALL", "STOP"})
"""Burrow statuses (``kafka.lag_status.LagStatus``) that mean the group stopped committing."""


class ProgressGateFailed(DeploymentError):
    """The new version moved no data within the progress window (the deployer stops it and restarts the
    previous deployment)."""

    gate = "progress"

    def __init__(self, message: str, verdict: ProgressVerdict) -> None:
        super().__init__(message)
        self.verdict = verdict


class PartitionProgress(msgspec.Struct, frozen=True):
    """One source partition: where the job started, the end offset, the group's committed offset."""

    topic: str
    partition: int
    start: int
    end: int | None = None
    committed: int | None = None

    @property
    def waiting(self) -> int:
        """Messages produced past the start offset (0 when the end is unknown)."""
        return max(0, self.end - self.start) if self.end is not None else 0

    @property
    def moved(self) -> int:
        """Messages committed past the start offset."""
        return max(0, self.committed - self.start) if self.committed is not None else 0

    @property
    def label(self) -> str:
        """``topic[partition]``."""
        return f"{self.topic}[{self.partition}]"


class ProgressReading(msgspec.Struct, frozen=True):
    """One look at a job: its source partitions (empty without a Kafka source), rows per sink (dead-letter
    topics left out), records read, the launcher's state; ``unreachable`` when the broker did not answer."""

    at: float
    partitions: tuple[PartitionProgress, ...] = ()
    sink_rows: dict[str, int] = {}
    records_in: int = 0
    job_state: str = ""
    job_reason: str = ""
    unreachable: str | None = None

    @property
    def waiting(self) -> int:
        """Messages produced past the start offsets, over every partition."""
        return sum(p.waiting for p in self.partitions)

    @property
    def committed_past(self) -> tuple[PartitionProgress, ...]:
        """The partitions whose committed offset is past the start offset."""
        return tuple(p for p in self.partitions if p.moved > 0)

    @property
    def rows(self) -> int:
        """Rows written, over every sink."""
        return sum(self.sink_rows.values())


class ProgressVerdict(msgspec.Struct, frozen=True):
    """What the progress gate concluded.

    ``signal``: ``commits`` / ``sink_rows`` (data moved), ``no_input`` (nothing waited), ``buffered`` (read
    and held in table buffers), ``unknown_input`` (no Kafka source: input cannot be measured) -- all
    passing; ``none``, ``dead``, ``unreadable`` -- failing.
    """

    passed: bool
    signal: str
    message: str
    seconds: float
    waiting: int = 0
    rows: int = 0
    committed_past: dict[str, int] = {}
    records_in: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (materialization metadata, deployment record)."""
        return cast("dict[str, Any]", msgspec.to_builtins(self))


class KafkaInput(msgspec.Struct, frozen=True):
    """Where a flow reads: its cluster (with connection settings), consumer group and topics."""

    cluster: KafkaCluster
    group: str
    topics: tuple[str, ...]
    reset: str = "earliest"


def kafka_input(compiled: CompiledFlow) -> KafkaInput | None:
    """The Kafka input of a compiled flow (``None`` for a non-Kafka source)."""
    flow = compiled.flow
    settings = getattr(compiled.plan.source, "settings", None)
    if flow.source_kind != "kafka" or settings is None or not flow.consumer_group or not flow.source_topics:
        return None
    reset = str(getattr(settings, "auto_offset_reset", "earliest") or "earliest")
    topics = tuple(dict.fromkeys(t.topic for t in flow.source_topics))
    return KafkaInput(cluster_for(settings), flow.consumer_group, topics, reset)


def dead_letter_sinks(compiled: CompiledFlow) -> frozenset[str]:
    """Names a dead-letter topic may have in the job's per-sink counts (rows there are not progress)."""
    names: set[str] = set()
    for out in compiled.flow.output_topics:
        if out.role.value == "dlq":
            names.update({out.ref, out.slot, out.topic})
    return frozenset(names)


def table_buffer_rows(compiled: CompiledFlow) -> int:
    """Most rows the flow's table buffers can hold back (largest ``buffer_max_records`` x workers)."""
    sizes = [
        int(getattr(getattr(sink.config, "buffer_policy", None), "max_records", 0) or 0)
        for sink in compiled.plan.terminal_storage_sinks.values()
    ]
    return max(sizes, default=0) * compiled.spec.processes * compiled.spec.workers_per_process


def sink_rows(statuses: Sequence[Mapping[str, Any]], ignored: frozenset[str] = frozenset()) -> dict[str, int]:
    """Rows written per sink over a job's processes (``ignored`` sinks left out)."""
    rows: dict[str, int] = {}
    for status in statuses:
        for sink, info in (status.get("sinks") or {}).items():
            if sink in ignored or not isinstance(info, Mapping):
                continue
            rows[sink] = rows.get(sink, 0) + int(info.get("records") or 0)
    return rows


def last_write_at(statuses: Sequence[Mapping[str, Any]]) -> float | None:
    """The latest write of any sink of a job's processes."""
    times = [
        float(info["last_write_at"])
        for status in statuses
        for info in (status.get("sinks") or {}).values()
        if isinstance(info, Mapping) and info.get("last_write_at")
    ]
    return max(times, default=None)


def parse_offsets(raw: object) -> Offsets:
    """``{topic: {"partition": offset}}`` as recorded in a deployment's ``extra`` (JSON keys are strings);
    malformed entries are skipped."""
    out: Offsets = {}
    if not isinstance(raw, Mapping):
        return out
    for topic, parts in raw.items():
        if not isinstance(parts, Mapping):
            continue
        for partition, offset in parts.items():
            try:
                out.setdefault(str(topic), {})[int(partition)] = int(offset)
            except (TypeError, ValueError):
                continue
    return out


def _listed(labels: Sequence[str]) -> str:
    shown = ", ".join(labels[:MAX_LISTED])
    return shown + (f" and {len(labels) - MAX_LISTED} more" if len(labels) > MAX_LISTED else "")


class ProgressGate:
    """The deploy's progress gate for one new version: measure where it starts (after the drain), then
    wait up to *window_s* for a commit past those offsets or a sink row.

    Example:
        >>> gate = ProgressGate("orders", None, {}, window_s=60)
        >>> gate.judge(ProgressReading(at=0.0, sink_rows={"orders_out": 3}), 1.5).message
        "data moved: the job's sinks wrote 3 row(s) (orders_out: 3) within 1.5 s"
    """

    def __init__(
        self,
        flow_name: str,
        kafka: KafkaInput | None,
        recorded_start: Mapping[str, Mapping[int, int]],
        window_s: float,
        *,
        ignored_sinks: frozenset[str] = frozenset(),
        buffer_rows: int = 0,
        tables_only: bool = False,
        timeout_s: float = 10.0,
        poll_s: float = POLL_S,
    ) -> None:
        self.flow_name = flow_name
        self.kafka = kafka
        self.start: Offsets = {t: dict(parts) for t, parts in recorded_start.items()}
        self.window_s = window_s
        self.ignored_sinks = ignored_sinks
        self.buffer_rows = buffer_rows
        self.tables_only = tables_only
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.start_note = "start offsets from the deploy's offset plan"

    @classmethod
    def for_flow(
        cls, compiled: CompiledFlow, offsets: OffsetPlan | None, window_s: float, *, timeout_s: float = 10.0
    ) -> ProgressGate:
        """The gate of a compiled flow, starting from the offset plan's start offsets."""
        flow = compiled.flow
        tables_only = bool(flow.storage_sinks) and not any(
            t.role.value == "output" for t in flow.output_topics
        )
        return cls(
            flow.name,
            kafka_input(compiled),
            offsets.start_offsets if offsets is not None else {},
            window_s,
            ignored_sinks=dead_letter_sinks(compiled),
            buffer_rows=table_buffer_rows(compiled),
            tables_only=tables_only,
            timeout_s=timeout_s,
        )

    def measure_start(self) -> Offsets:
        """Where the new job starts: the group's committed offsets read now (call it after the previous job
        drained and before the launch), else the recorded start offsets."""
        if self.kafka is None:
            return self.start
        try:
            snapshot = snapshot_offsets(
                self.kafka.cluster, self.kafka.topics, [self.kafka.group], timeout_s=self.timeout_s
            )
        except OffsetSnapshotError as exc:
            self.start_note = redact_text(
                f"start offsets from the offset plan (not read after the drain: {exc})"
            )
            return self.start
        for topic, partitions in snapshot.partitions.items():
            for partition in partitions:
                low, high = snapshot.low[(topic, partition)], snapshot.high[(topic, partition)]
                committed = snapshot.committed_offset(self.kafka.group, topic, partition)
                recorded = self.start.get(topic, {}).get(partition)
                if committed is not None and low <= committed <= high:
                    start = committed
                elif recorded is not None:
                    start = recorded
                else:
                    start = low if self.kafka.reset == "earliest" else high
                self.start.setdefault(topic, {})[partition] = start
        self.start_note = "start offsets: the group's committed offsets after the drain"
        return self.start

    def read(self, launcher: Launcher, job: LaunchedJob) -> ProgressReading:
        """One reading: the launcher's report of *job* and, for a Kafka source, the group's offsets."""
        report = launcher.report(job)
        base = ProgressReading(
            at=time.time(),
            sink_rows=sink_rows(report.statuses, self.ignored_sinks),
            records_in=sum(int(s.get("records_in") or 0) for s in report.statuses),
            job_state=report.state.value,
            job_reason=report.reason,
        )
        if self.kafka is None:
            return base
        try:
            snapshot = snapshot_offsets(
                self.kafka.cluster, self.kafka.topics, [self.kafka.group], timeout_s=self.timeout_s
            )
        except OffsetSnapshotError as exc:
            return msgspec.structs.replace(base, unreachable=redact_text(str(exc)))
        partitions = tuple(
            PartitionProgress(
                topic,
                partition,
                self.start.get(topic, {}).get(partition, snapshot.low[(topic, partition)]),
                snapshot.high[(topic, partition)],
                snapshot.committed_offset(self.kafka.group, topic, partition),
            )
            for topic in sorted(snapshot.partitions)
            for partition in snapshot.partitions[topic]
        )
        return msgspec.structs.replace(base, partitions=partitions)

    def wait(self, launcher: Launcher, job: LaunchedJob, log: Log = print) -> ProgressVerdict:
        """Poll until data moves (or nothing waits), or the window ends; the verdict either way."""
        started = time.monotonic()
        deadline = started + self.window_s
        log(f"progress gate: waiting up to {self.window_s:g} s for data to move ({self.start_note})")
        while True:
            reading = self.read(launcher, job)
            now = time.monotonic()
            verdict = self.judge(reading, now - started, final=now >= deadline)
            if verdict is not None:
                return verdict
            time.sleep(max(0.0, min(self.poll_s, deadline - time.monotonic())))

    def judge(self, reading: ProgressReading, elapsed: float, final: bool = False) -> ProgressVerdict | None:
        """The verdict of one reading (``None``: keep waiting)."""

        def verdict(passed: bool, signal: str, message: str) -> ProgressVerdict:
            return ProgressVerdict(
                passed,
                signal,
                message,
                round(elapsed, 3),
                reading.waiting,
                reading.rows,
                {p.label: p.moved for p in reading.committed_past},
                reading.records_in,
            )

        if reading.job_state == "dead":
            return verdict(False, "dead", f"the job exited during the progress window: {reading.job_reason}")
        moved = reading.committed_past
        if moved:
            detail = _listed([f"{p.label} (+{p.moved})" for p in moved])
            return verdict(
                True,
                "commits",
                f"data moved: committed past the start offsets on {detail} within {elapsed:.1f} s",
            )
        if reading.rows > 0:
            detail = ", ".join(f"{sink}: {rows}" for sink, rows in sorted(reading.sink_rows.items()) if rows)
            return verdict(
                True,
                "sink_rows",
                f"data moved: the job's sinks wrote {reading.rows} row(s) ({detail}) within {elapsed:.1f} s",
            )
        if (
            self.kafka is not None
            and reading.unreachable is None
            and reading.partitions
            and reading.waiting == 0
        ):
            return verdict(
                True,
                "no_input",
                "no input to consume: the end offsets are at the start offsets on every source partition; "
                "passed without proof that this version moves data",
            )
        if not final:
            return None
        if self.kafka is None:
            return verdict(
                True,
                "unknown_input",
                f"no sink row in {self.window_s:g} s and no Kafka source to tell whether input was waiting; "
                "passed without proof that this version moves data",
            )
        if reading.unreachable is not None:
            return verdict(
                False,
                "unreadable",
                f"no sink row in {self.window_s:g} s and the group's committed offsets could not be read: "
                f"{reading.unreachable}",
            )
        if self.tables_only and reading.records_in > 0 and reading.waiting <= self.buffer_rows:
            return verdict(
                True,
                "buffered",
                f"the job read {reading.records_in} record(s); the {reading.waiting} waiting message(s) fit in its "
                f"table buffers (up to {self.buffer_rows} rows), which loom flushes (and commits) only when more "
                "data arrives; passed without proof that this version moves data",
            )
        waiting = [p.label for p in reading.partitions if p.waiting > 0]
        message = (
            f"no commit past the start offsets on {_listed(waiting)} and no sink rows in {self.window_s:g} s "
            f"while {reading.waiting} messages were waiting"
        )
        if reading.records_in:
            message += f" (the job read {reading.records_in} record(s) and moved none)"
        if reading.job_state != "healthy":
            message += f"; the job is {reading.job_state}: {reading.job_reason}"
        return verdict(False, "none", message)


# ----------------------------------------------------------------------------- previous version


class PreviousProgress(msgspec.Struct, frozen=True):
    """Whether the version a deploy replaced was moving data when it was replaced (kept in the new
    deployment's ``extra["previous_progress"]``): its group committed past the offsets it started from
    (``committed_advanced`` messages), or its job's sinks wrote rows (``sink_rows``, since its last start)."""

    plan_hash: str
    running: bool
    moving: bool
    committed_advanced: int = 0
    sink_rows: int = 0
    last_write_at: float | None = None
    measured_at: float = 0.0
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return cast("dict[str, Any]", msgspec.to_builtins(self))


def previous_progress(
    previous: Deployment,
    report: JobReport | None,
    committed_now: Mapping[str, Mapping[int, int]] | None,
    group_now: str | None,
    ignored_sinks: frozenset[str] = frozenset(),
) -> PreviousProgress:
    """Measure the replaced version's progress from facts the deploy already has: *report* (its job's
    status records; ``None``: not running) and *committed_now* (where the new job would start, i.e. the
    group's committed offsets, from the offset plan) against ``previous.extra["start_offsets"]``.

    Example:
        >>> from loom_dagster.core.deploy.store import Deployment
        >>> prev = Deployment.decode(b'{"flow_name": "f", "plan_hash": "p1", "config_hash": "c", '
        ...     b'"deployed_at": 1, "extra": {"source": {"group_id": "g"}, "start_offsets": {"t": {"0": 5}}}, '
        ...     b'"job": {"flow_name": "f", "launcher": "local", "host": "h", "processes": [], '
        ...     b'"log_path": "", "started_at": 1, "request": {"flow_name": "f", "import_path": "m:f", '
        ...     b'"config_files": [], "environment": "test", "plan_hash": "p1", "config_hash": "c"}}}')
        >>> from loom_dagster.core.launchers.base import JobReport, JobState
        >>> report = JobReport(JobState.HEALTHY, "ok", 1, ({"sinks": {"out": {"records": 7}}},))
        >>> found = previous_progress(prev, report, {"t": {0: 9}}, "g")
        >>> found.moving, found.committed_advanced, found.sink_rows
        (True, 4, 7)
    """
    now = time.time()
    if report is None:
        return PreviousProgress(previous.plan_hash, False, False, measured_at=now, detail="not running")
    source = previous.extra.get("source")
    group = source.get("group_id") if isinstance(source, Mapping) else None
    advanced = 0
    if committed_now and group and group == group_now:
        started = parse_offsets(previous.extra.get("start_offsets"))
        for topic, parts in committed_now.items():
            for partition, offset in parts.items():
                before = started.get(topic, {}).get(partition)
                if before is not None:
                    advanced += max(0, offset - before)
    rows = sum(sink_rows(report.statuses, ignored_sinks).values())
    detail = (
        f"committed {advanced} message(s) past its start offsets; its sinks wrote {rows} row(s) since its "
        "last start"
    )
    return PreviousProgress(
        previous.plan_hash,
        True,
        advanced > 0 or rows > 0,
        advanced,
        rows,
        last_write_at(report.statuses),
        now,
        detail,
    )


# ----------------------------------------------------------------------------- regression watch


class WatchState(msgspec.Struct):
    """The regression watch of one flow, kept in the job health sensor's cursor.

    ``deployment``: the watched deployment (``watch_key``); ``ticks``: ticks observed; ``windows``: its
    lag windows (a ``kafka.lag_window.LagWindows`` cursor); ``rows`` / ``lags``: sink rows and total lag
    of the last ticks; ``done``: why the watch is over (passed, rolled back, not watched).
    """

    deployment: str = ""
    ticks: int = 0
    windows: str = ""
    rows: list[int] = []
    lags: list[int] = []
    done: str | None = None

    @classmethod
    def load(cls, raw: object) -> WatchState:
        """From the cursor's JSON (a fresh state when absent or malformed)."""
        if not isinstance(raw, Mapping) or not raw:
            return cls()
        try:
            return msgspec.convert(raw, cls)
        except msgspec.ValidationError:
            return cls()

    def dump(self) -> dict[str, Any]:
        """JSON-able form for the cursor."""
        return cast("dict[str, Any]", msgspec.to_builtins(self))


def watch_key(deployment: Deployment) -> str:
    """Identity of a deployment for the watch (a health-sensor restart keeps it; a new deploy changes it)."""
    return f"{deployment.plan_hash}@{deployment.deployed_at:.3f}"


def watch_eligibility(deployment: Deployment) -> str | None:
    """Why *deployment* is not watched, or ``None`` when it is: it replaced a version that was moving data,
    and it was not rolled back already."""
    if deployment.stopped_on_purpose:
        return "stopped on purpose"
    rolled = deployment.extra.get("rolled_back_from")
    if rolled:
        plan = rolled.get("plan_hash") if isinstance(rolled, Mapping) else rolled
        return f"restored by a rollback from plan {plan}; not watched until a new deploy"
    previous = deployment.extra.get("previous_progress")
    if not isinstance(previous, Mapping):
        return "no previous version to compare with"
    if not previous.get("moving"):
        return "the previous version was not moving data when this one was deployed; nothing to compare with"
    return None


def observe_tick(
    state: WatchState, lag: FlowLag | None, rows: int, min_ticks: int = STALL_TICKS
) -> str | None:
    """Add one tick's facts (*lag*: the Kafka lag evaluation over the watch's windows; *rows*: the job's
    sink rows) to *state*; return why the version stalls, else ``None``.

    Stalled: Burrow ``STALL``/``STOP`` (committed offset unchanged over the window with messages left),
    ``NO_COMMITS`` with lag after the starting window, or no new sink row over *min_ticks* ticks while
    the lag grew.

    Example:
        >>> state = WatchState()
        >>> [observe_tick(state, None, 40) for _ in range(3)][-1] is None  # no lag known: rows alone
        True
    """
    state.ticks += 1
    if state.rows and rows < state.rows[-1]:  # the job restarted: its counters start again
        state.rows, state.lags = [], []
    total_lag = lag.total_lag if lag is not None else None
    state.rows = [*state.rows, rows][-max(min_ticks, 2) :]
    state.lags = [*state.lags, total_lag if total_lag is not None else -1][-max(min_ticks, 2) :]
    if lag is None:
        return None
    status = lag.status.value
    if status in STALLED_STATUSES:
        return f"Kafka lag {status}: {lag.reason}"
    if status == "NO_COMMITS" and lag.total_lag > 0:
        return f"no commit since the deploy: {lag.reason}"
    recent_rows, recent_lags = state.rows[-min_ticks:], state.lags[-min_ticks:]
    if (
        len(recent_rows) >= min_ticks
        and len(set(recent_rows)) == 1
        and min(recent_lags) >= 0
        and recent_lags[-1] > recent_lags[0]
    ):
        return (
            f"no sink row written over the last {min_ticks} ticks ({recent_rows[-1]} row(s) since the job "
            f"started) while the lag grew from {recent_lags[0]} to {recent_lags[-1]}"
        )
    return None


def previous_deployment(history: Sequence[Deployment], current: Deployment) -> Deployment | None:
    """The deployment *current* replaced, as last recorded (restarts included), from the flow's history
    (oldest first); ``None`` if there is none."""
    if current.previous_plan_hash is None:
        return None
    for record in reversed(history):
        if record.plan_hash == current.plan_hash and record.deployed_at == current.deployed_at:
            continue  # the current deployment itself (its first save, its restarts)
        if record.deployed_at >= current.deployed_at:
            continue
        return record if record.plan_hash == current.previous_plan_hash else None
    return None


def rolled_back_extra(previous: Deployment, current: Deployment, reason: str) -> dict[str, Any]:
    """The restored record's ``extra``: the previous one's, with ``rolled_back_from`` (the bad plan, why,
    when); ``watch_eligibility`` never watches it again."""
    return {
        **previous.extra,
        "rolled_back_from": {
            "plan_hash": current.plan_hash,
            "config_hash": current.config_hash,
            "deployed_at": current.deployed_at,
            "reason": redact_text(reason),
            "at": time.time(),
        },
    }
