"""Delay in seconds (age of the oldest unconsumed message) on the real broker: messages produced with known
timestamps, group offsets committed by a plain consumer of that group, then the delay read by
``check_lag`` / ``fetch_delays`` compared with now - the timestamp of the message at the committed offset;
thresholds, the partition cap and the deadline, a secured cluster, the reader never joining any group,
the ``kafka_lag`` check's metadata through the real sensor, and the sink freshness check judged by it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import confluent_kafka
import dagster as dg
import pyarrow as pa
import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from deltalake import write_deltalake

from loom_dagster.core.kafka.cluster import KafkaCluster, LagTarget, cluster_for
from loom_dagster.core.kafka.delay import GROUP_PREFIX, DelayReading, fetch_delays
from loom_dagster.core.kafka.lag_check import check_lag
from loom_dagster.core.kafka.lag_eval import DeploymentStart, FlowLag, evaluate_flow
from loom_dagster.core.kafka.lag_status import LagStatus
from loom_dagster.core.kafka.lag_window import LagSample, PartitionWindow
from loom_dagster.core.kafka.offsets import PartitionOffsets, TargetOffsets
from loom_dagster.core.sensor_settings import KafkaLagSettings, SinkFreshness, SinkHealthSettings
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.sensors.lag import kafka_lag_targets
from loom_dagster.sensors.sinks import build_sink_health_sensor
from tests.conftest import make_topics
from tests.integration.test_kafka_lag import (
    SASL_PASSWORD,
    SaslBroker,
    SensorTicker,
    _commit,
    _defs,
    _fetch_ready,
    _graph,
    _meta,
    _sasl_settings,
    _status_of,
)
from tests.support.helpers import silent_listener

QUIET = KafkaLagSettings(
    window=5, warn_lag=10**9, error_lag=10**10, request_timeout_s=5.0, delay_timeout_s=10.0
)
"""Offset thresholds out of the way, delay thresholds off: only the window rules speak."""
TOLERANCE_S = 2.0
PER_PARTITION = 20
STEP_S = 10.0
"""Seconds between the timestamps of consecutive messages of a partition."""


def _age(partition: int) -> float:
    """How old (seconds, at produce time) the first message of *partition* is: partitions differ."""
    return 3600.0 - 300.0 * partition


def _produce_stamped(bootstrap: str, topic: str, partitions: int) -> dict[tuple[int, int], float]:
    """``PER_PARTITION`` messages per partition with known timestamps (``_age`` ago, then ``STEP_S``
    apart); returns ``(partition, offset) -> timestamp`` in epoch seconds."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    now = time.time()
    stamps = {}
    for p in range(partitions):
        for i in range(PER_PARTITION):
            stamp = now - _age(p) + i * STEP_S
            producer.produce(topic, value=b"m%d" % i, partition=p, timestamp=int(stamp * 1000))
            stamps[(p, i)] = int(stamp * 1000) / 1000.0
    assert producer.flush(30) == 0
    return stamps


def _target(bootstrap: str, name: str, group: str, topic: str) -> LagTarget:
    return LagTarget(name, group, (topic,), KafkaCluster(bootstrap))


def _checked(
    targets: list[LagTarget], settings: KafkaLagSettings = QUIET, **kwargs: Any
) -> tuple[Any, float, float]:
    """``check_lag`` bracketed by the clock: (report, before, after)."""
    _fetch_ready(targets)
    before = time.time()
    report = check_lag(targets, settings, **kwargs)
    return report, before, time.time()


def _assert_delay(delay: float | None, stamp: float, before: float, after: float) -> None:
    """*delay* is now - *stamp* (now: some moment of the read, between *before* and *after*), ± tolerance."""
    assert delay is not None
    assert before - stamp - TOLERANCE_S <= delay <= after - stamp + TOLERANCE_S, (delay, before - stamp)


def _delays(flow: FlowLag) -> dict[int, float | None]:
    return {p.partition: p.delay_s for p in flow.partitions}


@pytest.fixture()
def bootstrap(kafka: KafkaBroker) -> str:
    return kafka.bootstrap_servers


# --------------------------------------------------------------------------- measured delay


@pytest.mark.kafka
def test_delay_is_the_age_of_the_message_at_the_committed_offset(bootstrap: str, topic_prefix: str) -> None:
    """Per partition: now - the timestamp of the message at the committed offset; a caught-up partition
    has delay 0; the flow carries the largest."""
    (topic,) = make_topics(bootstrap, topic_prefix, ["orders"], partitions=4)
    group = f"{topic_prefix}-g"
    stamps = _produce_stamped(bootstrap, topic, 4)
    committed = {0: 5, 1: 12, 2: PER_PARTITION, 3: 0}  # p2 caught up
    _commit(bootstrap, group, topic, committed)
    report, before, after = _checked([_target(bootstrap, "loom/orders", group, topic)])
    (flow,) = report.flows
    delays = _delays(flow)
    assert delays[2] == 0.0
    for p in (0, 1, 3):
        _assert_delay(delays[p], stamps[(p, committed[p])], before, after)
    # the oldest unconsumed message is p0's at offset 5 (3600 - 50 s old), not p3's first (2700 s old)
    _assert_delay(flow.max_delay_s, stamps[(0, 5)], before, after)
    assert flow.delay_read and flow.delay_unknown == 0 and flow.status is LagStatus.OK
    assert report.delays is not None and (report.delays.asked, report.delays.read) == (3, 3)
    print(f"\n[delay] {delays} read in {report.delays.seconds:.3f} s")


@pytest.mark.kafka
def test_caught_up_flow_has_delay_zero_and_reads_nothing(bootstrap: str, topic_prefix: str) -> None:
    (topic,) = make_topics(bootstrap, topic_prefix, ["events"], partitions=2)
    group = f"{topic_prefix}-g"
    _produce_stamped(bootstrap, topic, 2)
    _commit(bootstrap, group, topic, dict.fromkeys(range(2), PER_PARTITION))
    report, _, _ = _checked([_target(bootstrap, "loom/events", group, topic)])
    (flow,) = report.flows
    assert flow.max_delay_s == 0.0 and _delays(flow) == {0: 0.0, 1: 0.0} and flow.delay_unknown == 0
    assert report.delays is not None and report.delays.asked == 0 and report.delays.clusters == {}


@pytest.mark.kafka
def test_two_groups_on_one_topic_each_get_their_own_delay(bootstrap: str, topic_prefix: str) -> None:
    """One reader per cluster serves both flows: it reads the lower position, then seeks to the other."""
    (topic,) = make_topics(bootstrap, topic_prefix, ["shared"], partitions=2)
    stamps = _produce_stamped(bootstrap, topic, 2)
    _commit(bootstrap, f"{topic_prefix}-a", topic, {0: 3, 1: 7})
    _commit(bootstrap, f"{topic_prefix}-b", topic, {0: 15, 1: 7})
    targets = [
        _target(bootstrap, "loom/a", f"{topic_prefix}-a", topic),
        _target(bootstrap, "loom/b", f"{topic_prefix}-b", topic),
    ]
    report, before, after = _checked(targets)
    a, b = report.flows
    _assert_delay(_delays(a)[0], stamps[(0, 3)], before, after)
    _assert_delay(_delays(b)[0], stamps[(0, 15)], before, after)
    _assert_delay(_delays(a)[1], stamps[(1, 7)], before, after)
    assert _delays(a)[1] == _delays(b)[1]
    assert report.delays is not None and len(report.delays.clusters) == 1


@pytest.mark.kafka
def test_without_a_commit_the_delay_counts_from_the_start_offset(bootstrap: str, topic_prefix: str) -> None:
    """A fresh deployment (STARTING): the oldest unconsumed message is at the offset the job started from."""
    (topic,) = make_topics(bootstrap, topic_prefix, ["fresh"], partitions=2)
    stamps = _produce_stamped(bootstrap, topic, 2)
    target = _target(bootstrap, "loom/fresh", f"{topic_prefix}-g", topic)
    start = DeploymentStart(time.time(), 600.0, {(topic, 0): 4})
    report, before, after = _checked([target], starts={target.name: start})
    (flow,) = report.flows
    assert flow.status is LagStatus.STARTING
    _assert_delay(_delays(flow)[0], stamps[(0, 4)], before, after)
    p1 = flow.partitions[1]
    assert p1.delay_s is None and p1.delay_note == "no offset to read from" and flow.delay_unknown == 1


# --------------------------------------------------------------------------- thresholds


@pytest.mark.kafka
def test_delay_thresholds_give_warn_and_err_naming_the_partition(bootstrap: str, topic_prefix: str) -> None:
    (topic,) = make_topics(bootstrap, topic_prefix, ["events"], partitions=3)
    group = f"{topic_prefix}-g"
    _produce_stamped(bootstrap, topic, 3)
    _commit(bootstrap, group, topic, {0: PER_PARTITION, 1: 0, 2: 10})  # p1 ~3300 s, p2 ~2900 s old
    target = _target(bootstrap, "loom/events", group, topic)

    def flow_with(**thresholds: float | None) -> FlowLag:
        settings = replace(QUIET, **thresholds)
        return _checked([target], settings)[0].flows[0]

    assert flow_with().status is LagStatus.OK  # thresholds off (None) by default
    assert flow_with(warn_delay_s=4000.0, error_delay_s=5000.0).status is LagStatus.OK
    warn = flow_with(warn_delay_s=3000.0, error_delay_s=5000.0)
    assert warn.status is LagStatus.WARN and warn.severity.value == "warn" and not warn.passed
    assert f"partition {topic}[1] delay 33" in warn.reason and ">= warn_delay_s 3000" in warn.reason
    err = flow_with(warn_delay_s=1000.0, error_delay_s=2000.0)
    assert err.status is LagStatus.ERR and err.severity.value == "error"
    assert (
        f"partition {topic}[1] delay" in err.reason and ">= error_delay_s 2000 (2 partition(s)" in err.reason
    )
    # delay thresholds alone: the offset lag thresholds are far away
    assert err.total_lag == PER_PARTITION + 10


def test_idle_tail_reports_its_delay_but_is_exempt_from_the_delay_thresholds() -> None:
    """A healthy loom job on a quiet topic holds its last rows in a table buffer (an idle tail, OK by
    design): their age is reported, but does not fail the check; beyond the tail it does."""
    settings = replace(QUIET, error_delay_s=600.0)
    reading = DelayReading(timestamp=1000.0, read_at=4600.0, offset=100)

    def flow(idle_tail: int) -> FlowLag:
        target = LagTarget("loom/f", "g", ("t",), KafkaCluster("127.0.0.1:9"), idle_tail)
        window = PartitionWindow("t", 0)
        for ts in range(5):
            window = window.add(LagSample(float(ts), 140, 100), 10)
        offsets = TargetOffsets(target, (PartitionOffsets("t", 0, 140, 100), PartitionOffsets("t", 1, 7, 7)))
        return evaluate_flow(offsets, {("t", 0): window}, settings, now=4.0, delays={("t", 0): reading})

    idle = flow(idle_tail=500)
    assert idle.status is LagStatus.OK and idle.max_delay_s == 3600.0
    assert [p.delay_s for p in idle.partitions] == [3600.0, 0.0]
    stuck = flow(idle_tail=0)
    assert stuck.status is LagStatus.STOP and "partition t[0] delay 3600 s" in stuck.reason
    assert "error_delay_s 600" in stuck.reason


# --------------------------------------------------------------------------- bounds


@pytest.mark.kafka
def test_partition_cap_reads_each_flows_most_lagging_first_and_the_rest_is_unknown(
    bootstrap: str, topic_prefix: str
) -> None:
    topic_a, topic_b = make_topics(bootstrap, topic_prefix, ["a", "b"], partitions=3)
    stamps = _produce_stamped(bootstrap, topic_a, 3)
    _produce_stamped(bootstrap, topic_b, 3)
    _commit(bootstrap, f"{topic_prefix}-a", topic_a, {0: 15, 1: 2, 2: 10})  # most lagging: p1
    _commit(bootstrap, f"{topic_prefix}-b", topic_b, {0: 1, 1: 19, 2: 19})  # most lagging: p0
    targets = [
        _target(bootstrap, "loom/a", f"{topic_prefix}-a", topic_a),
        _target(bootstrap, "loom/b", f"{topic_prefix}-b", topic_b),
    ]
    capped = replace(QUIET, delay_max_partitions=2)
    report, before, after = _checked(targets, capped)
    a, b = report.flows
    _assert_delay(_delays(a)[1], stamps[(1, 2)], before, after)
    assert _delays(b)[0] is not None
    assert _delays(a)[0] is None and _delays(a)[2] is None and _delays(b)[1] is None
    assert a.delay_unknown == 2 and b.delay_unknown == 2
    assert "over delay_max_partitions (2)" in (a.partitions[0].delay_note or "")
    # a lower bound is still reported, with the unknown count next to it
    _assert_delay(a.max_delay_s, stamps[(1, 2)], before, after)
    assert report.delays is not None and (report.delays.asked, report.delays.read) == (6, 2)


def test_deadline_bounds_the_read_and_unread_partitions_are_unknown() -> None:
    """A cluster that accepts TCP but never answers: the read gives up at its deadline; every partition
    is unknown (never 0), saying why."""
    with silent_listener() as port:
        cluster = KafkaCluster(f"127.0.0.1:{port}")
        started = time.monotonic()
        fetch = fetch_delays([(cluster, ("t", p, 5)) for p in range(3)], timeout_s=1.0)
        elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 4.0, elapsed
    readings = [fetch.reading(cluster, ("t", p, 5)) for p in range(3)]
    assert all(r.delay_s is None for r in readings)
    assert all("not read within delay_timeout_s (1 s)" in (r.error or "") for r in readings)
    assert (fetch.asked, fetch.read) == (3, 0)


@pytest.mark.kafka
def test_reader_never_joins_a_group_and_commits_nothing(
    bootstrap: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the reader holds its partitions, neither the flow's group nor the reader's own has a member;
    afterwards the flow's committed offsets are unchanged and the reader's group does not exist. Its
    requests: no JoinGroup, SyncGroup, Heartbeat, OffsetCommit or OffsetFetch."""
    (topic,) = make_topics(bootstrap, topic_prefix, ["events"], partitions=3)
    group = f"{topic_prefix}-g"
    _produce_stamped(bootstrap, topic, 3)
    committed = {0: 2, 1: 9, 2: 17}
    _commit(bootstrap, group, topic, committed)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    seen: dict[str, Any] = {}

    class SpyConsumer(confluent_kafka.Consumer):  # type: ignore[misc]
        """The reader's consumer; on its first poll, asks the cluster who is in the groups."""

        def __init__(self, conf: dict[str, Any]) -> None:
            super().__init__(conf)
            seen["group"] = conf["group.id"]

        def poll(self, timeout: float = -1) -> Any:
            if "members" not in seen:
                groups = [group, seen["group"]]
                described = admin.describe_consumer_groups(groups, request_timeout=10)
                seen["members"] = {g: f.result().members for g, f in described.items()}
            return super().poll(timeout)

    monkeypatch.setattr(confluent_kafka, "Consumer", SpyConsumer)
    target = _target(bootstrap, "loom/events", group, topic)
    report, _, _ = _checked([target], count_requests=True)
    assert report.flows[0].delay_unknown == 0
    assert seen["group"].startswith(GROUP_PREFIX)
    assert seen["members"] == {group: [], seen["group"]: []}

    request = [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(3)])]
    after = admin.list_consumer_group_offsets(request, request_timeout=10)[group].result()
    assert {tp.partition: tp.offset for tp in after.topic_partitions} == committed
    listed = admin.list_consumer_groups(request_timeout=10).result()
    assert not [g for g in listed.valid if g.group_id.startswith(GROUP_PREFIX)]
    assert report.delays is not None
    apis = report.delays.by_api()
    assert apis.get("Fetch", 0) >= 1 and report.delays.requests <= 12, apis
    assert not {"JoinGroup", "SyncGroup", "Heartbeat", "OffsetCommit", "OffsetFetch"} & set(apis), apis
    print(f"\n[delay reader requests] {report.delays.requests} {apis}")


# --------------------------------------------------------------------------- secured cluster (SASL)


@pytest.fixture(scope="module")
def sasl_kafka() -> Iterator[SaslBroker]:
    with SaslBroker() as broker:
        yield broker


@pytest.mark.kafka
def test_secured_cluster_delay_through_the_flows_own_client_config(
    sasl_kafka: SaslBroker, topic_prefix: str
) -> None:
    """SASL/PLAIN: the reader is built from the same client config as the offset fetch."""
    plain = sasl_kafka.bootstrap_servers
    (topic,) = make_topics(plain, topic_prefix, ["secure"], partitions=2)
    group = f"{topic_prefix}-g"
    stamps = _produce_stamped(plain, topic, 2)
    _commit(plain, group, topic, {0: 6, 1: PER_PARTITION})
    cluster = cluster_for(_sasl_settings(sasl_kafka.sasl_bootstrap, group, topic, SASL_PASSWORD))
    report, before, after = _checked([LagTarget("loom/secure", group, (topic,), cluster)])
    (flow,) = report.flows
    _assert_delay(_delays(flow)[0], stamps[(0, 6)], before, after)
    assert _delays(flow)[1] == 0.0 and flow.delay_unknown == 0

    # a reader that cannot authenticate reports unknown (never 0) within its deadline, password hidden
    wrong = cluster_for(_sasl_settings(sasl_kafka.sasl_bootstrap, group, topic, "not-the-password"))
    started = time.monotonic()
    fetch = fetch_delays([(wrong, (topic, 0, 6))], timeout_s=2.0)
    assert time.monotonic() - started < 6.0
    reading = fetch.reading(wrong, (topic, 0, 6))
    assert reading.delay_s is None and "not read within delay_timeout_s" in (reading.error or "")
    assert "not-the-password" not in repr(fetch)


# --------------------------------------------------------------------------- the kafka_lag check


@pytest.mark.kafka
def test_sensor_check_carries_max_delay_and_partition_delays(
    bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    (topic,) = make_topics(bootstrap, topic_prefix, ["ticks"], partitions=3)
    graph = _graph(bootstrap, topic_prefix, tmp_path)
    stamps = _produce_stamped(bootstrap, topic, 3)
    _commit(bootstrap, f"{topic_prefix}-ticks", topic, {0: 4, 1: PER_PARTITION, 2: 11})
    _fetch_ready([t for _, t in kafka_lag_targets(graph)])
    settings = replace(QUIET, warn_delay_s=3000.0, error_delay_s=10_000.0)
    with dg.instance_for_test() as instance:
        before = time.time()
        event = SensorTicker(_defs(graph, settings, tmp_path / "state"), instance).tick()
        after = time.time()
        assert _status_of(event) == "WARN" and event.severity is dg.AssetCheckSeverity.WARN
        assert f"partition {topic}[0] delay" in (event.description or "")
        _assert_delay(_meta(event, "max_delay_s"), stamps[(0, 4)], before, after)
        assert _meta(event, "delay_unknown_partitions") == 0
        assert _meta(event, "delay_partitions_read") == 2 and _meta(event, "total_lag") == 16 + 9
        rows = {r.data["partition"]: r.data for r in _meta(event, "partitions").records}
        assert rows[1]["delay_s"] == 0.0
        _assert_delay(rows[0]["delay_s"], stamps[(0, 4)], before, after)
        _assert_delay(rows[2]["delay_s"], stamps[(2, 11)], before, after)

        off = replace(QUIET, read_delay=False)
        plain = SensorTicker(_defs(graph, off, tmp_path / "state"), instance).tick()
        assert _status_of(plain) == "OK" and "max_delay_s" not in plain.metadata
        assert {r.data["delay_s"] for r in _meta(plain, "partitions").records} == {-1.0}


# --------------------------------------------------------------------------- sink freshness uses the delay


@pytest.mark.kafka
def test_sink_silent_while_the_source_delay_exceeds_the_window(
    bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """The real lag sensor, then the real sink health sensor: a sink silent past its warn window while its
    source's oldest unconsumed message is older than that window fails (offset lag only 1); once the old
    message is consumed and the one left is fresh (lag still 1), the sink is merely idle (the check passes)."""

    (topic,) = make_topics(bootstrap, topic_prefix, ["ticks"], partitions=3)
    graph = _graph(bootstrap, topic_prefix, tmp_path)
    write_deltalake(str(tmp_path / "delta"), pa.table({"event_id": ["e0"]}), mode="append")
    stamps = _produce_stamped(bootstrap, topic, 3)
    group = f"{topic_prefix}-ticks"
    _commit(bootstrap, group, topic, {0: PER_PARTITION - 1, 1: PER_PARTITION, 2: PER_PARTITION})
    _fetch_ready([t for _, t in kafka_lag_targets(graph)])
    window = SinkFreshness(warn_after_s=900, fail_after_s=86_400)
    sinks = SinkHealthSettings(default_freshness=window)
    clock = time.time() + window.warn_after_s + 30
    sink_sensor = build_sink_health_sensor(graph, sinks, clock=lambda: clock)
    with dg.instance_for_test() as instance:
        lag_ticker = SensorTicker(_defs(graph, QUIET, tmp_path / "state"), instance)
        cursor: list[str | None] = [None]

        def sink_check() -> dg.AssetCheckEvaluation:
            result = sink_sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor[0]))
            cursor[0] = result.cursor
            for event in result.asset_events:
                instance.report_runless_asset_event(event)
            key = dg.AssetCheckKey(dg.AssetKey(["delta", "ticks"]), "freshness")
            record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
            assert record.evaluation is not None
            return record.evaluation

        lag = lag_ticker.tick()
        assert _meta(lag, "total_lag") == 1 and _meta(lag, "max_delay_s") > window.warn_after_s
        silent = sink_check()
        assert _meta(silent, "loom/freshness") == "silent_while_lagging" and not silent.passed
        assert silent.severity is dg.AssetCheckSeverity.ERROR
        assert "oldest unconsumed message is" in (silent.description or "")
        assert _meta(silent, "loom/source_delay_s") == pytest.approx(
            time.time() - stamps[(0, PER_PARTITION - 1)], abs=30
        )

        producer = Producer({"bootstrap.servers": bootstrap})
        producer.produce(topic, value=b"fresh", partition=1, timestamp=int(time.time() * 1000))
        assert producer.flush(30) == 0
        _commit(bootstrap, group, topic, {0: PER_PARTITION})
        lag = lag_ticker.tick()
        assert _meta(lag, "total_lag") == 1 and _meta(lag, "max_delay_s") < 60
        idle = sink_check()  # its age past the window is the freshness policy's to judge, not the check's
        assert _meta(idle, "loom/freshness") == "idle" and idle.passed
