"""Intervals and thresholds of the loom sensors, with defaults a user can override."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class JobHealthSettings:
    """Job health sensor: how often to look and how to back off restarts.

    When a job counts as hung is the deploy resource's ``heartbeat_timeout_s`` (the launcher reads it).
    """

    enabled: bool = True
    interval_s: int = 15
    restart: bool = True
    backoff_initial_s: float = 10.0
    backoff_max_s: float = 600.0
    max_restarts: int = 5
    restart_window_s: float = 3600.0
    backoff_reset_after_s: float = 600.0
    """A restarted job must stay healthy this long before the backoff starts again from
    ``backoff_initial_s`` (as Kubernetes resets CrashLoopBackOff after ten minutes of running): a job
    that dies a few seconds after each start keeps backing off."""
    regression_watch_ticks: int = 0
    """After a deploy, compare the new version's progress with the previous version's for this many
    ticks (0: off): when the new one stalls (Kafka lag STALL/STOP, no commit, or no sink row while the
    lag grows) where the previous one was moving data, roll back once to the previous deployment and
    report it as a materialization of the flow (``loom/rolled_back_from``). At least 3 ticks are needed
    to see a stall."""


@dataclass(frozen=True)
class KafkaLagSettings:
    """Kafka lag sensor: Burrow-style evaluation over a window of samples per partition.

    ``warn_lag`` / ``error_lag`` are total messages behind per flow; ``window`` is how many samples a
    partition keeps in the sensor cursor. ``warn_delay_s`` / ``error_delay_s`` are the age of a
    partition's oldest unconsumed message (its delay in seconds, read each tick by
    ``loom_dagster.core.kafka.delay``).
    """

    enabled: bool = True
    interval_s: int = 30
    window: int = 10
    warn_lag: int = 1_000
    error_lag: int = 100_000
    request_timeout_s: float = 10.0
    warn_delay_s: float | None = None
    """WARN when a partition's oldest unconsumed message is at least this many seconds old (its delay:
    now - the timestamp of the message at the committed offset); ``None``: off."""
    error_delay_s: float | None = None
    """ERR when a partition's oldest unconsumed message is at least this many seconds old; ``None``: off."""
    read_delay: bool = True
    """Read each lagging partition's delay every tick (one consumer per cluster that only assigns
    partitions: it never joins nor commits for the flows' groups). Off: no ``max_delay_s`` in the
    check, no delay thresholds, and the sink freshness check falls back to the offset lag."""
    delay_timeout_s: float = 5.0
    """Deadline of the delay read per tick; partitions not read by then are reported unknown, not 0."""
    delay_max_partitions: int = 2_000
    """Most lagging partitions whose delay is read per tick (round-robin over the flows, each flow's
    most lagging partition first); the others are reported unknown, not 0."""
    end_to_end: bool = True
    """Each tick, also compute every flow's end-to-end delay over the chained flows of the code location
    (``loom_dagster.core.kafka.end_to_end``: from that tick's delays, no extra broker request), reported
    as ``loom/end_to_end_delay_s`` with its path; the sink health sensor reports it per table. Needs
    ``read_delay``."""
    end_to_end_rule: str = "max"
    """How the hops combine: ``"max"`` (loom keeps each message's origin timestamp through its output
    topics, so a flow's delay already counts from the first topic) or ``"sum"`` (topics whose timestamps
    restart at each hop, e.g. ``message.timestamp.type=LogAppendTime``)."""

    def __post_init__(self) -> None:
        if self.end_to_end_rule not in ("max", "sum"):
            raise ValueError(
                f"KafkaLagSettings.end_to_end_rule is {self.end_to_end_rule!r}: use 'max' (loom's output "
                "topics keep the origin timestamp, the default) or 'sum' (timestamps restart at each hop)"
            )


@dataclass(frozen=True)
class SinkFreshness:
    """Freshness of one sink: warn after ``warn_after_s`` without new data, fail after ``fail_after_s``
    (the sink asset's Dagster ``FreshnessPolicy``, unless ``deadline_cron`` asks for a cron deadline);
    and, optionally, a budget for its end-to-end delay (the age of the data it receives, summed over the
    chained flows from the first Kafka topic of its lineage)."""

    warn_after_s: float = 15 * 60
    fail_after_s: float = 60 * 60
    deadline_cron: str | None = None
    """A cron deadline instead of the time window: new data is expected in the ``cron_lower_bound_s``
    before each tick of this cron (``FreshnessPolicy.cron``); ``None``: the warn/fail time window."""
    cron_lower_bound_s: float | None = None
    """How long before each ``deadline_cron`` tick the data may land (default: ``fail_after_s``)."""
    cron_timezone: str = "UTC"
    """The timezone of ``deadline_cron``."""
    warn_end_to_end_delay_s: float | None = None
    """WARN when the sink's end-to-end delay is at least this many seconds; ``None``: off."""
    max_end_to_end_delay_s: float | None = None
    """ERROR when the sink's end-to-end delay is at least this many seconds (its budget); ``None``: off."""


@dataclass(frozen=True)
class SinkHealthSettings:
    """Sink health sensor: how often to read table metadata, and freshness windows per sink."""

    enabled: bool = True
    interval_s: int = 60
    default_freshness: SinkFreshness = field(default_factory=SinkFreshness)
    freshness: dict[str, SinkFreshness] = field(default_factory=dict)
    sql_timestamp_columns: dict[str, str] = field(default_factory=dict)

    def freshness_for(self, asset_key: str) -> SinkFreshness:
        """Freshness windows for a sink asset (by its user string, e.g. ``delta/orders``)."""
        return self.freshness.get(asset_key, self.default_freshness)


@dataclass(frozen=True)
class LoomSensorSettings:
    """Every loom sensor's settings; pass to ``build_loom_defs(sensors=...)``."""

    job_health: JobHealthSettings = field(default_factory=JobHealthSettings)
    kafka_lag: KafkaLagSettings = field(default_factory=KafkaLagSettings)
    sink_health: SinkHealthSettings = field(default_factory=SinkHealthSettings)
    default_status_running: bool = True
