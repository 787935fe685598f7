"""Kafka lag: window rules on synthetic samples, batched fetches against the real broker (consumer groups
committed by plain confluent-kafka consumers, and by the real deployed loom job), and the Dagster sensor
and asset check on a real instance."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import dagster as dg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from loom.streaming.kafka import ConsumerSettings, KafkaSecuritySettings

from loom_dagster import LoomDeployResource, LoomFlowSpec
from loom_dagster.asset_check_names import KAFKA_LAG
from loom_dagster.asset_graph import FlowNode, LoomAssetGraph
from loom_dagster.assets import build_loom_asset_graph
from loom_dagster.core.deploy.launch_records import LaunchedJob, LaunchRequest
from loom_dagster.core.deploy.store import Deployment, DeploymentStore
from loom_dagster.core.flows.records import LoomFlow
from loom_dagster.core.kafka.cluster import KafkaCluster, LagTarget, cluster_for
from loom_dagster.core.kafka.lag_check import check_lag
from loom_dagster.core.kafka.lag_eval import (
    DeploymentStart,
    FlowLag,
    evaluate_flow,
    evaluate_window,
    starting_window_s,
)
from loom_dagster.core.kafka.lag_status import LagSeverity, LagStatus
from loom_dagster.core.kafka.lag_window import LagSample, LagWindows, PartitionWindow
from loom_dagster.core.kafka.offsets import LagFetch, PartitionOffsets, TargetOffsets, fetch_offsets
from loom_dagster.core.sensor_settings import KafkaLagSettings
from loom_dagster.dev.kafka import KafkaBroker, pick_free_ports
from loom_dagster.sensors.lag import build_kafka_lag_checks, build_kafka_lag_sensor, kafka_lag_targets
from tests.conftest import make_topics, ticks_config
from tests.support.deploy_env import DeployBench, bench_fixture
from tests.support.helpers import silent_listener

TICKS_IMPORT = "tests.flows.delta_only:ticks_flow"
QUIET = KafkaLagSettings(window=5, warn_lag=10**9, error_lag=10**10, request_timeout_s=5.0)
"""Thresholds out of the way: only the window rules speak."""


# --------------------------------------------------------------------------- synthetic windows


def _window(*samples: tuple[float, int, int | None], size: int = 10) -> PartitionWindow:
    window = PartitionWindow("t", 0)
    for ts, end, committed in samples:
        window = window.add(LagSample(ts, end, committed), size)
    return window


def _status(*samples: tuple[float, int, int | None]) -> LagStatus:
    return evaluate_window(_window(*samples)).status


def test_window_ok_when_caught_up_or_catching_up() -> None:
    assert _status((0, 10, 10), (30, 20, 20), (60, 30, 30)) is LagStatus.OK
    # lag shrinking while committing: catching up
    assert _status((0, 100, 10), (30, 110, 60), (60, 120, 110)) is LagStatus.OK
    # a zero-lag sample ends the run: only 2 lagging samples after it, not enough evidence
    assert _status((0, 10, 5), (30, 20, 20), (60, 30, 20), (90, 40, 20)) is LagStatus.OK


def test_window_warn_when_falling_behind() -> None:
    lag = evaluate_window(_window((0, 100, 90), (30, 200, 150), (60, 300, 210), (90, 400, 270)))
    assert lag.status is LagStatus.WARN
    assert "lag grew at every sample: 10 -> 130" in lag.reason
    assert lag.consume_rate == pytest.approx(2.0)
    assert lag.time_lag_s == pytest.approx(130 / 2.0)


def test_window_stall_and_stop() -> None:
    stall = evaluate_window(_window((0, 100, 50), (30, 150, 50), (60, 200, 50)), now=90)
    assert stall.status is LagStatus.STALL
    assert "while 100 new messages arrived" in stall.reason
    assert stall.time_lag_s is None and stall.stalled_for_s == pytest.approx(90)
    stop = evaluate_window(_window((0, 100, 50), (30, 100, 50), (60, 100, 50)))
    assert stop.status is LagStatus.STOP
    assert "no new data" in stop.reason
    # fewer than MIN_SAMPLES lagging samples: no verdict yet
    assert _status((0, 100, 50), (30, 150, 50)) is LagStatus.OK


def test_window_rewind_beats_ok_but_not_stall() -> None:
    rewind = evaluate_window(_window((0, 100, 100), (30, 100, 40)))
    assert rewind.status is LagStatus.REWIND and "from 100 to 40" in rewind.reason
    # after the rewind the consumer is stuck while data arrives: STALL is worse than REWIND
    assert _status((0, 100, 100), (30, 110, 40), (60, 120, 40), (90, 130, 40)) is LagStatus.STALL


def test_window_no_commits_and_empty_partition() -> None:
    assert _status((0, 0, None)) is LagStatus.OK
    assert _status((0, 5, None)) is LagStatus.NO_COMMITS
    # first commit after none: not a rewind
    assert _status((0, 5, None), (30, 5, 5)) is LagStatus.OK


def test_window_caps_and_json_roundtrip() -> None:
    window = _window(*[(float(i), i * 10, i * 5) for i in range(20)], size=4)
    assert [s.ts for s in window.samples] == [16.0, 17.0, 18.0, 19.0]
    aged = window.add(LagSample(100.0, 300, 150), 4, max_age_s=50)
    assert [s.ts for s in aged.samples] == [100.0]
    windows = LagWindows({"loom/a": {("t", 0): window}})
    assert LagWindows.from_json(windows.to_json()) == windows
    assert LagWindows.from_json("not json").flows == {}
    assert LagWindows.from_json('{"v": 0}').flows == {}


def test_cursor_is_compact_and_compressed_when_large() -> None:
    """One shared tick list per flow, deltas of end offsets, lags: 200 flows x 6 partitions x 10 samples."""
    flows = {}
    for f in range(200):
        parts = {}
        for p in range(6):
            window = PartitionWindow(f"topic{f}", p)
            for i in range(10):
                end = 5_000_000 + 100 * i
                window = window.add(LagSample(1_800_000_000.0 + 30 * i, end, end - 40 - i), 10)
            parts[(f"topic{f}", p)] = window
        flows[f"loom/flow{f}"] = parts
    windows = LagWindows(flows)
    assert LagWindows.from_json(windows.to_json()) == windows
    cursor = windows.to_cursor()
    assert cursor.startswith("z1:") and len(cursor) < len(windows.to_json()) / 3
    assert LagWindows.from_cursor(cursor) == windows
    assert LagWindows.from_cursor("z1:garbage").flows == {}
    small = LagWindows({"loom/a": flows["loom/flow0"]})
    assert small.to_cursor() == small.to_json()
    print(f"\n[cursor] 200x6x10: json {len(windows.to_json())} chars, cursor {len(cursor)} chars")


def test_window_since_tracks_last_move() -> None:
    window = _window((0, 10, 5), (30, 20, 5), (60, 30, 5))
    assert window.since == 0
    assert window.add(LagSample(90, 40, 30), 10).since == 90


def _offsets(*parts: tuple[int, int, int | None], missing: tuple[str, ...] = ()) -> TargetOffsets:
    target = LagTarget("f", "g", ("t", *missing), KafkaCluster("x:1"))
    return TargetOffsets(target, tuple(PartitionOffsets("t", i, e, c) for i, e, c in parts), missing)


def test_flow_thresholds_and_worst_partition() -> None:
    settings = KafkaLagSettings(warn_lag=100, error_lag=1000)
    assert evaluate_flow(_offsets((0, 50, 0)), {}, settings).status is LagStatus.OK
    warn = evaluate_flow(_offsets((0, 100, 50), (1, 100, 50)), {}, settings)
    assert warn.status is LagStatus.WARN and warn.total_lag == 100 and "warn_lag 100" in warn.reason
    err = evaluate_flow(_offsets((0, 2000, 0)), {}, settings)
    assert err.status is LagStatus.ERR and not err.passed
    stalled = {("t", 0): _window((0, 100, 50), (30, 150, 50), (60, 200, 50))}
    flow = evaluate_flow(_offsets((0, 200, 50), (1, 10, 10)), stalled, settings)
    assert flow.status is LagStatus.STALL and flow.counts() == {"STALL": 1, "OK": 1}
    assert "1/2 partition(s) STALL" in flow.reason and "total lag 150" in flow.reason
    missing = evaluate_flow(_offsets((0, 1, 1), missing=("gone",)), {}, settings)
    assert missing.status is LagStatus.MISSING_TOPIC and missing.missing_topics == ("gone",)


def test_status_ranks_and_severities() -> None:
    assert LagStatus.UNREACHABLE.rank > LagStatus.MISSING_TOPIC.rank > LagStatus.STOP.rank
    assert LagStatus.STALL.rank > LagStatus.ERR.rank > LagStatus.REWIND.rank > LagStatus.WARN.rank
    assert {s.severity.value for s in LagStatus} == {"ok", "warn", "error"}
    assert LagStatus.NO_COMMITS.severity.value == "warn" and LagStatus.STOP.severity.value == "error"


def test_cluster_for_keeps_security_out_of_repr() -> None:
    security = SimpleNamespace(
        to_confluent_config=lambda: {"security.protocol": "SASL_SSL", "sasl.password": "hunter2"}
    )
    settings = SimpleNamespace(
        brokers=("b:9092", "a:9092"),
        security=security,
        extra={"fetch.min.bytes": 1, "ssl.ca.location": "/ca"},
    )
    cluster = cluster_for(settings)
    assert cluster.bootstrap == "a:9092,b:9092"
    assert dict(cluster.config) == {
        "security.protocol": "SASL_SSL",
        "sasl.password": "hunter2",
        "ssl.ca.location": "/ca",
    }
    assert "hunter2" not in repr(cluster)
    assert KafkaCluster("a:1").addresses() == [("a", 1)]


# --------------------------------------------------------------------------- real broker helpers


def _produce(bootstrap: str, topic: str, per_partition: int, partitions: int) -> None:
    """*per_partition* raw messages to each partition (explicit partitions: exact offsets)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for p in range(partitions):
        for i in range(per_partition):
            producer.produce(topic, value=b"x%d" % i, partition=p)
    assert producer.flush(30) == 0


def _commit(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Commit *offsets* for *group* as a plain consumer of that group would."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
    finally:
        consumer.close()


def _target(bootstrap: str, name: str, group: str, *topics: str) -> LagTarget:
    return LagTarget(name, group, topics, KafkaCluster(bootstrap))


def _fetch_ready(targets: list[LagTarget], timeout_s: float = 15.0) -> LagFetch:
    """Fetch until no partition reports a transient error (fresh topics may lack a leader for a moment)."""
    deadline = time.monotonic() + timeout_s
    while True:
        fetch = fetch_offsets(targets, timeout_s=5.0)
        errors = [p.error for t in fetch.targets.values() for p in t.partitions if p.error]
        if not errors or time.monotonic() > deadline:
            return fetch
        time.sleep(0.2)


class Ticker:
    """Sensor-like ticks over real fetches with injected timestamps (no sleeping)."""

    def __init__(self, target: LagTarget, settings: KafkaLagSettings = QUIET) -> None:
        self.target, self.settings = target, settings
        self.windows = LagWindows()
        self.at = 1_000_000.0

    def tick(self) -> FlowLag:
        self.at += 30.0
        _fetch_ready([self.target])
        report = check_lag([self.target], self.settings, self.windows, at=self.at)
        self.windows = report.windows
        return report.flows[0]


@pytest.fixture()
def bootstrap(kafka: KafkaBroker) -> str:
    return kafka.bootstrap_servers


# --------------------------------------------------------------------------- real broker: statuses


@pytest.mark.kafka
def test_simulated_consumer_ok_warn_stall_then_ok(bootstrap: str, topic_prefix: str) -> None:
    """A group committed by a plain consumer: caught up (OK), slower than producers (WARN), stopped while
    producers keep writing (STALL), caught up again (OK)."""
    (topic,) = make_topics(bootstrap, topic_prefix, ["orders"], partitions=3)
    group = f"{topic_prefix}-g"
    ticker = Ticker(_target(bootstrap, "loom/orders", group, topic))
    _produce(bootstrap, topic, 10, 3)
    _commit(bootstrap, group, topic, dict.fromkeys(range(3), 10))
    assert ticker.tick().status is LagStatus.OK

    committed = 10
    for _ in range(3):  # producers +20 per partition per tick, the consumer only +5
        _produce(bootstrap, topic, 20, 3)
        committed += 5
        _commit(bootstrap, group, topic, dict.fromkeys(range(3), committed))
        flow = ticker.tick()
    assert flow.status is LagStatus.WARN, flow.reason
    assert flow.total_lag == 3 * (70 - 25)
    assert flow.consume_rate == pytest.approx(3 * 5 / 30)
    assert flow.time_lag_s == pytest.approx(45 / (5 / 30))

    for _ in range(3):  # the consumer stops; producers keep writing
        _produce(bootstrap, topic, 20, 3)
        flow = ticker.tick()
    assert flow.status is LagStatus.STALL, flow.reason
    assert flow.counts() == {"STALL": 3}
    assert flow.time_lag_s is None and flow.stalled_for_s == pytest.approx(90)

    _commit(bootstrap, group, topic, dict.fromkeys(range(3), 130))
    flow = ticker.tick()
    assert flow.status is LagStatus.OK and flow.total_lag == 0


@pytest.mark.kafka
def test_stop_when_commits_stop_with_a_backlog(bootstrap: str, topic_prefix: str) -> None:
    (topic,) = make_topics(bootstrap, topic_prefix, ["events"], partitions=2)
    group = f"{topic_prefix}-g"
    _produce(bootstrap, topic, 30, 2)
    _commit(bootstrap, group, topic, {0: 10, 1: 30})
    ticker = Ticker(_target(bootstrap, "loom/events", group, topic))
    flows = [ticker.tick() for _ in range(3)]
    assert [f.status for f in flows] == [LagStatus.OK, LagStatus.OK, LagStatus.STOP]
    assert flows[-1].counts() == {"STOP": 1, "OK": 1}
    assert "no new data" in flows[-1].reason and flows[-1].total_lag == 20


@pytest.mark.kafka
def test_rewind_when_a_lower_offset_is_committed(bootstrap: str, topic_prefix: str) -> None:
    (topic,) = make_topics(bootstrap, topic_prefix, ["events"], partitions=1)
    group = f"{topic_prefix}-g"
    _produce(bootstrap, topic, 50, 1)
    _commit(bootstrap, group, topic, {0: 50})
    ticker = Ticker(_target(bootstrap, "loom/events", group, topic))
    assert ticker.tick().status is LagStatus.OK
    _commit(bootstrap, group, topic, {0: 20})
    flow = ticker.tick()
    assert flow.status is LagStatus.REWIND and "from 50 to 20" in flow.reason
    assert flow.severity.value == "warn" and flow.total_lag == 30


@pytest.mark.kafka
def test_thresholds_one_shot(bootstrap: str, topic_prefix: str) -> None:
    (topic,) = make_topics(bootstrap, topic_prefix, ["events"], partitions=2)
    group = f"{topic_prefix}-g"
    _produce(bootstrap, topic, 100, 2)
    _commit(bootstrap, group, topic, {0: 100, 1: 40})
    target = _target(bootstrap, "loom/events", group, topic)
    _fetch_ready([target])
    warn = check_lag([target], KafkaLagSettings(warn_lag=50, error_lag=100)).flows[0]
    assert warn.status is LagStatus.WARN and warn.total_lag == 60
    err = check_lag([target], KafkaLagSettings(warn_lag=10, error_lag=60)).flows[0]
    assert err.status is LagStatus.ERR and "error_lag 60" in err.reason


@pytest.mark.kafka
def test_no_commits_deleted_topic_and_unreachable_broker(bootstrap: str, topic_prefix: str) -> None:
    """Clear statuses in ONE fetch, not exceptions: a group that never committed, a deleted topic, an
    empty topic, and a cluster nobody listens on (reported quickly)."""
    full, empty, doomed = make_topics(bootstrap, topic_prefix, ["full", "empty", "doomed"], partitions=2)
    _produce(bootstrap, full, 5, 2)
    _commit(bootstrap, f"{topic_prefix}-d", doomed, {0: 0, 1: 0})
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.delete_topics([doomed], operation_timeout=30)[doomed].result(timeout=30)
    deadline = time.monotonic() + 30
    while doomed in admin.list_topics(timeout=5).topics and time.monotonic() < deadline:
        time.sleep(0.2)
    targets = [
        _target(bootstrap, "loom/fresh", f"{topic_prefix}-fresh", full),
        _target(bootstrap, "loom/idle", f"{topic_prefix}-idle", empty),
        _target(bootstrap, "loom/doomed", f"{topic_prefix}-d", doomed),
        _target("127.0.0.1:9", "loom/nowhere", f"{topic_prefix}-n", full),
    ]
    _fetch_ready(targets[:3])
    started = time.monotonic()
    report = check_lag(targets, KafkaLagSettings(request_timeout_s=3.0))
    assert time.monotonic() - started < 3.0
    by_name = {f.name: f for f in report.flows}
    assert by_name["loom/fresh"].status is LagStatus.NO_COMMITS
    assert "no committed offset yet" in by_name["loom/fresh"].reason
    assert by_name["loom/idle"].status is LagStatus.OK
    assert by_name["loom/doomed"].status is LagStatus.MISSING_TOPIC
    assert doomed in by_name["loom/doomed"].reason
    nowhere = by_name["loom/nowhere"]
    assert nowhere.status is LagStatus.UNREACHABLE and "127.0.0.1:9" in nowhere.reason
    assert nowhere.severity.value == "error" and not nowhere.passed
    # the topic was not auto-created by asking about it
    assert doomed not in admin.list_topics(timeout=5).topics


def test_silent_listener_is_unreachable_after_the_request_timeout() -> None:
    """Something accepts TCP but never speaks Kafka: UNREACHABLE once ``request_timeout_s`` is spent."""
    with silent_listener() as port:
        started = time.monotonic()
        report = check_lag(
            [_target(f"127.0.0.1:{port}", "loom/silent", "g", "t")], KafkaLagSettings(request_timeout_s=1.5)
        )
        elapsed = time.monotonic() - started
    (flow,) = report.flows
    assert flow.status is LagStatus.UNREACHABLE and "metadata request failed" in flow.reason
    assert 1.0 < elapsed < 5.0


@pytest.mark.kafka
def test_requests_grow_by_two_per_group(bootstrap: str, topic_prefix: str) -> None:
    """One AdminClient per cluster: the handshake, topic metadata and end offsets cost the same for 1 flow
    and 20 flows (20 groups x 3 partitions); committed offsets cost one FindCoordinator + one OffsetFetch
    per group (librdkafka takes one group per call), all in flight at once."""
    topics = make_topics(bootstrap, topic_prefix, [f"f{i}" for i in range(20)], partitions=3)
    targets = []
    for i, topic in enumerate(topics):
        _produce(bootstrap, topic, 4, 3)
        _commit(bootstrap, f"{topic_prefix}-g{i}", topic, dict.fromkeys(range(3), 2))
        targets.append(_target(bootstrap, f"loom/f{i}", f"{topic_prefix}-g{i}", topic))
    _fetch_ready(targets)
    ones = [fetch_offsets(targets[:1]) for _ in range(3)]
    twenties = [fetch_offsets(targets) for _ in range(3)]
    # librdkafka may fold its own bootstrap Metadata into ours: compare the max of 3
    assert max(f.requests for f in twenties) - max(f.requests for f in ones) == 2 * 19
    for fetch, groups in [(f, 1) for f in ones] + [(f, 20) for f in twenties]:
        apis = fetch.by_api()
        assert apis["Metadata"] in (1, 2) and apis["ListOffsets"] == 1 and apis["FindCoordinator"] == groups
        assert fetch.clusters[0].groups == groups and fetch.clusters[0].group_offsets_s > 0
    twenty = twenties[0]
    assert all(p.committed == 2 and p.end == 4 for t in twenty.targets.values() for p in t.partitions)
    print(f"\n[requests] 1 flow={ones[0].requests} 20 flows={twenty.requests} {twenty.by_api()}")


# --------------------------------------------------------------------------- secured cluster (SASL)

SASL_USER, SASL_PASSWORD = "loom", "lag-secret-pw"


class SaslBroker(KafkaBroker):
    """The dev broker with a SASL_PLAINTEXT (PLAIN) listener next to its PLAINTEXT one (for setup)."""

    def __init__(self) -> None:
        super().__init__()
        self.external_bootstrap = None  # always our own broker: its listeners are what we test
        self.sasl_port = pick_free_ports(1)[0]

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    def _launch(self, java: str, lib: Path) -> None:
        assert self.data_dir is not None
        props = self.data_dir / "server.properties"
        sasl = f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}"
        jaas = f'org.apache.kafka.common.security.plain.PlainLoginModule required user_{SASL_USER}="{SASL_PASSWORD}";'
        lines = []
        for line in props.read_text().splitlines():
            key, _, value = line.partition("=")
            if key in ("listeners", "advertised.listeners") and sasl not in value:
                value = f"{value},{sasl}"
            elif key == "listener.security.protocol.map" and "SASL_PLAINTEXT" not in value:
                value += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
            lines.append(f"{key}={value}")
        lines += [
            "sasl.enabled.mechanisms=PLAIN",
            f"listener.name.sasl_plaintext.plain.sasl.jaas.config={jaas}",
        ]
        props.write_text("\n".join(dict.fromkeys(lines)) + "\n")
        super()._launch(java, lib)


@pytest.fixture(scope="module")
def sasl_kafka() -> Iterator[SaslBroker]:
    with SaslBroker() as broker:
        yield broker


def _sasl_settings(bootstrap: str, group: str, topic: str, password: str) -> ConsumerSettings:
    """loom consumer settings of a SASL/PLAIN cluster, as a flow's config declares them."""
    security = KafkaSecuritySettings(
        protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username=SASL_USER, sasl_password=password
    )
    return ConsumerSettings(
        brokers=(bootstrap,), group_id=group, topics=(topic,), delivery="at_least_once", security=security
    )


@pytest.mark.kafka
def test_secured_cluster_gets_lag_through_the_admin_client(sasl_kafka: SaslBroker, topic_prefix: str) -> None:
    """SASL: the same fetch as on PLAINTEXT, with the flow's own security settings; a wrong password is
    UNREACHABLE, and the password shows nowhere."""
    plain = sasl_kafka.bootstrap_servers
    (topic,) = make_topics(plain, topic_prefix, ["secure"], partitions=2)
    group = f"{topic_prefix}-g"
    _produce(plain, topic, 20, 2)
    _commit(plain, group, topic, {0: 20, 1: 5})
    cluster = cluster_for(_sasl_settings(sasl_kafka.sasl_bootstrap, group, topic, SASL_PASSWORD))
    assert ("sasl.password", SASL_PASSWORD) in cluster.config
    target = LagTarget("loom/secure", group, (topic,), cluster)

    fetch = _fetch_ready([target])
    offsets = {p.partition: (p.end, p.committed) for p in fetch.targets["loom/secure"].partitions}
    assert offsets == {0: (20, 20), 1: (20, 5)}
    assert fetch.by_api()["FindCoordinator"] == 1 and fetch.requests > 0
    flow = check_lag([target], QUIET).flows[0]
    assert flow.status is LagStatus.OK and flow.total_lag == 15

    wrong = cluster_for(_sasl_settings(sasl_kafka.sasl_bootstrap, group, topic, "not-the-password"))
    started = time.monotonic()
    (denied,) = check_lag(
        [LagTarget("loom/denied", group, (topic,), wrong)], KafkaLagSettings(request_timeout_s=3.0)
    ).flows
    assert time.monotonic() - started < 6.0
    assert denied.status is LagStatus.UNREACHABLE and not denied.passed, denied.reason
    assert "not-the-password" not in repr(denied) and SASL_PASSWORD not in repr(flow)


# --------------------------------------------------------------------------- loom-dagster status


def _deployment(source: dict[str, Any], start_offsets: dict[str, dict[str, int]] | None = None) -> Deployment:
    """A deployment record as the deployer writes it (source summary, start offsets), an hour old."""
    at = time.time() - 3600
    request = LaunchRequest("ticks", TICKS_IMPORT, (), "test", "plan", "config")
    job = LaunchedJob("ticks", "local", socket.gethostname(), (), "", at, request)
    extra: dict[str, Any] = {"source": source, "start_offsets": start_offsets or {}}
    return Deployment("ticks", job, "plan", "config", deployed_at=at, extra=extra)


@pytest.mark.kafka
def test_cli_status_lag_is_the_checks_lag(bootstrap: str, topic_prefix: str) -> None:
    """``loom-dagster status`` reads lag with the check's fetch and evaluation (one shot): a number when
    every partition is fine, else the lag with its status; a secured cluster is not read (no credentials
    in a record)."""
    from loom_dagster.cli.status import source_lag

    (topic,) = make_topics(bootstrap, topic_prefix, ["status"], partitions=2)
    group = f"{topic_prefix}-g"
    _produce(bootstrap, topic, 10, 2)
    _fetch_ready([_target(bootstrap, "ticks", group, topic)])
    source = {"kind": "kafka", "brokers": [bootstrap], "group_id": group, "topics": [topic], "secured": False}
    assert source_lag(_deployment(source, {topic: {"0": 4, "1": 10}})) == "6 (NO_COMMITS)"
    _commit(bootstrap, group, topic, {0: 10, 1: 7})
    assert source_lag(_deployment(source)) == 3
    assert source_lag(_deployment({**source, "brokers": ["127.0.0.1:9"]})) == "unavailable (UNREACHABLE)"
    secured = source_lag(_deployment({**source, "secured": True}))
    assert secured == "n/a (secured cluster: see the kafka_lag check)"
    assert source_lag(_deployment({"kind": "mongo"})) is None


# --------------------------------------------------------------------------- Dagster


def _graph(bootstrap: str, prefix: str, root: Path) -> LoomAssetGraph:
    config = ticks_config(root / "config", brokers=bootstrap, prefix=prefix, delta_uri=str(root / "delta"))
    spec = LoomFlowSpec("tests.flows.delta_only:ticks_flow", config=config, environment="test")
    return build_loom_asset_graph([spec])


def _defs(graph: LoomAssetGraph, settings: KafkaLagSettings, state_dir: Path) -> dg.Definitions:
    """The lag sensor and check, reading deployments from *state_dir* through the ``loom`` resource."""
    return dg.Definitions(
        assets=_specs(graph),
        asset_checks=build_kafka_lag_checks(graph, settings),
        sensors=[build_kafka_lag_sensor(graph, settings)],
        resources={"loom": LoomDeployResource(state_dir=str(state_dir))},
    )


def _specs(graph: LoomAssetGraph) -> list[dg.AssetSpec]:
    return [*(n.spec for n in graph.flows), *graph.external_specs]


class SensorTicker:
    """Ticks the real sensor definition on a real instance, carrying the cursor and storing its events."""

    def __init__(self, defs: dg.Definitions, instance: dg.DagsterInstance) -> None:
        self.defs, self.instance = defs, instance
        self.cursor: str | None = None
        self.sensor = defs.resolve_sensor_def("loom_kafka_lag")

    def tick(self) -> dg.AssetCheckEvaluation:
        context = dg.build_sensor_context(
            instance=self.instance,
            cursor=self.cursor,
            definitions=self.defs,
            resources=dict(self.defs.resources or {}),
        )
        data = self.sensor.evaluate_tick(context)
        self.cursor = data.cursor
        (event,) = data.asset_events
        self.instance.report_runless_asset_event(event)
        return cast(dg.AssetCheckEvaluation, event)


def _meta(event: dg.AssetCheckEvaluation, key: str) -> Any:
    """The plain value of one metadata entry."""
    return event.metadata[key].value


def _status_of(event: dg.AssetCheckEvaluation) -> str:
    return str(_meta(event, "status"))


@pytest.mark.kafka
def test_sensor_and_ui_check_on_a_real_instance(bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    (topic,) = make_topics(bootstrap, topic_prefix, ["ticks"], partitions=3)
    graph = _graph(bootstrap, topic_prefix, tmp_path)
    key = dg.AssetKey(["loom", "ticks"])
    check_key = dg.AssetCheckKey(key, KAFKA_LAG)
    defs = _defs(graph, QUIET, tmp_path / "state")
    _produce(bootstrap, topic, 10, 3)
    _fetch_ready([t for _, t in kafka_lag_targets(graph)])
    with dg.instance_for_test() as instance:
        ticker = SensorTicker(defs, instance)
        first = ticker.tick()
        assert first.asset_key == key and first.check_name == KAFKA_LAG
        assert _status_of(first) == "NO_COMMITS" and not first.passed
        assert first.severity is dg.AssetCheckSeverity.WARN

        _commit(bootstrap, f"{topic_prefix}-ticks", topic, dict.fromkeys(range(3), 10))
        ok = ticker.tick()
        assert ok.passed and _status_of(ok) == "OK"
        assert _meta(ok, "broker_requests") <= 8
        stored = instance.get_latest_asset_check_evaluation_record(check_key)
        assert stored is not None and stored.event is not None
        evaluation = cast(dg.AssetCheckEvaluation, stored.event.dagster_event.event_specific_data)  # type: ignore[union-attr]
        assert evaluation.passed and _meta(evaluation, "total_lag") == 0
        assert len(ticker.cursor or "") < 1000

        for _ in range(3):
            _produce(bootstrap, topic, 5, 3)
            stalled = ticker.tick()
        assert _status_of(stalled) == "STALL" and stalled.severity is dg.AssetCheckSeverity.ERROR
        rows = _meta(stalled, "partitions").records
        assert {r.data["lag"] for r in rows} == {15} and {r.data["status"] for r in rows} == {"STALL"}

        # the same declared check, run from the UI (one-shot: no window, so no STALL verdict)
        result = dg.materialize(
            [*_specs(graph), *build_kafka_lag_checks(graph, QUIET)],
            instance=instance,
            selection=dg.AssetSelection.checks(check_key),
            resources={"loom": LoomDeployResource(state_dir=str(tmp_path / "state"))},
        )
        assert result.success
        (one_shot,) = result.get_asset_check_evaluations()
        assert one_shot.passed and _meta(one_shot, "total_lag") == 45
        latest = instance.get_latest_asset_check_evaluation_record(check_key)
        assert latest is not None and latest.run_id == result.run_id


def test_mongo_flows_get_no_lag_check() -> None:
    mongo = LoomFlow(
        name="watch", import_path="x:y", plan_hash="h", config_hash="c", environment="test",
        source_kind="mongo", consumer_group=None, delivery=None,
    )  # fmt: skip
    node = FlowNode(
        compiled=cast(Any, SimpleNamespace(flow=mongo, plan=SimpleNamespace(source=SimpleNamespace()))),
        spec=dg.AssetSpec(["loom", "watch"]),
    )
    graph = LoomAssetGraph(flows=[node], external_specs=[])
    assert kafka_lag_targets(graph) == []
    assert build_kafka_lag_checks(graph, QUIET) == []
    sensor = build_kafka_lag_sensor(
        graph, QUIET, default_status=dg.DefaultSensorStatus.STOPPED, read_deployments=False
    )
    with dg.instance_for_test() as instance:
        data = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
    assert data.skip_message == "no Kafka-sourced loom flow"


# --------------------------------------------------------------------------- the real deployed job


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def _tick_until(
    ticker: SensorTicker, status: str, timeout_s: float, *, max_lag: int | None = None, between: Any = None
) -> dg.AssetCheckEvaluation:
    """Tick until the check reports *status* (and a total lag <= *max_lag*), or the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        if between is not None:
            between()
        event = ticker.tick()
        lag = int(_meta(event, "total_lag"))
        if _status_of(event) == status and (max_lag is None or lag <= max_lag):
            return event
        if time.monotonic() > deadline:
            return event
        time.sleep(0.5)


@pytest.mark.kafka
@pytest.mark.slow
def test_deployed_job_lag_goes_stall_then_ok(bench: DeployBench) -> None:
    """The real loom job commits its group's offsets: OK while it runs; killed while producers keep
    writing -> STALL with growing lag; redeployed -> catches up -> OK.

    loom commits only what its table buffers flushed, and checks a buffer's age only when data arrives:
    on an idle topic the last message or two can stay uncommitted, so "caught up" allows a lag of 2 and
    keeps a trickle of nudges flowing.
    """
    settings = KafkaLagSettings(window=5, warn_lag=10**6, error_lag=10**7, request_timeout_s=5.0)
    graph = build_loom_asset_graph([bench.spec()])
    defs = _defs(graph, settings, bench.state_dir)
    bench.produce(0, 300)
    nudges = iter(range(100_000, 200_000))
    nudge = lambda: bench.produce(next(nudges), 1)  # noqa: E731
    with dg.instance_for_test() as instance:
        ticker = SensorTicker(defs, instance)
        assert _status_of(ticker.tick()) == "NO_COMMITS"
        assert bench.materialize(instance).success
        bench.wait_for_delta(set(bench.produced))
        ok = _tick_until(ticker, "OK", 60, max_lag=2, between=nudge)
        assert _status_of(ok) == "OK", ok.description

        bench.stop_everything()
        assert bench.alive_pids() == []
        batches = iter(range(1000, 10_000, 20))
        stalled = _tick_until(ticker, "STALL", 30, between=lambda: bench.produce(next(batches), 20))
        assert _status_of(stalled) == "STALL", stalled.description
        # the last sample before the kill already carries the offset that no longer moves: 2 batches suffice
        assert int(_meta(stalled, "total_lag")) >= 20
        assert stalled.severity is dg.AssetCheckSeverity.ERROR

        assert bench.materialize(instance).success
        bench.wait_for_delta(set(bench.produced))
        recovered = _tick_until(ticker, "OK", 60, max_lag=2, between=nudge)
        assert _status_of(recovered) == "OK", recovered.description
        print(f"\n[deployed] stalled: {stalled.description}\n[deployed] recovered: {recovered.description}")


def test_idle_tail_of_a_table_buffer_is_not_a_stop() -> None:
    """A healthy loom job on a quiet topic keeps its last rows (and offsets) in a table buffer: with the
    tail within the flow's buffer size, STOP is reported as OK; beyond it, STOP stays."""

    def flow_status(idle_tail: int, lag: int) -> tuple[LagStatus, str]:
        target = LagTarget("loom/f", "g", ("t",), KafkaCluster("127.0.0.1:9"), idle_tail)
        window = PartitionWindow("t", 0)
        for ts in range(5):
            window = window.add(LagSample(float(ts), 100 + lag, 100), 10)
        offsets = TargetOffsets(target, (PartitionOffsets("t", 0, 100 + lag, 100),))
        flow = evaluate_flow(offsets, {("t", 0): window}, KafkaLagSettings(), now=4.0)
        return flow.status, flow.partitions[0].reason

    status, reason = flow_status(idle_tail=500, lag=40)
    assert status is LagStatus.OK and "wait in loom's table buffer" in reason
    assert flow_status(idle_tail=500, lag=600)[0] is LagStatus.STOP
    assert flow_status(idle_tail=0, lag=40)[0] is LagStatus.STOP


# --------------------------------------------------------------------------- right after a deploy: STARTING


def _starting_flow(now: float, start: DeploymentStart | None) -> FlowLag:
    """p0: 100 messages, no commit (started at 40); p1: caught up; p2: empty, no commit."""
    target = LagTarget("loom/f", "g", ("t",), KafkaCluster("127.0.0.1:9"))
    parts = (
        PartitionOffsets("t", 0, 100, None),
        PartitionOffsets("t", 1, 50, 50),
        PartitionOffsets("t", 2, 0, None),
    )
    return evaluate_flow(TargetOffsets(target, parts), {}, QUIET, now=now, start=start)


def test_starting_within_the_window_then_no_commits() -> None:
    start = DeploymentStart(1000.0, 40.0, {("t", 0): 40, ("t", 1): 0})
    within = _starting_flow(1030.0, start)
    assert within.status is LagStatus.STARTING and within.passed
    assert within.severity is LagSeverity.OK
    assert within.total_lag == 60 and within.counts() == {"STARTING": 1, "OK": 2}
    p0 = within.partitions[0]
    assert p0.lag == 60 and p0.committed is None
    assert "deployed 30 s ago (started at offset 40, lag 60" in p0.reason and "within 40 s" in p0.reason

    after = _starting_flow(1041.0, start)
    assert after.status is LagStatus.NO_COMMITS and not after.passed
    assert after.severity is LagSeverity.WARN and after.total_lag == 60
    assert "41 s after the deployment" in after.partitions[0].reason

    # no deployment known: today's NO_COMMITS with an unknown lag; no start offset recorded: unknown lag
    assert _starting_flow(1030.0, None).status is LagStatus.NO_COMMITS
    assert _starting_flow(1030.0, None).total_lag == 0
    unrecorded = _starting_flow(1030.0, DeploymentStart(1000.0, 40.0))
    assert unrecorded.status is LagStatus.STARTING and unrecorded.partitions[0].lag is None
    assert "start offset not recorded" in unrecorded.reason


def test_starting_window_and_start_offsets_from_a_record() -> None:
    assert starting_window_s(2.0, 30) == 62.0
    assert starting_window_s(0.0, 5) == 30.0 and starting_window_s(10.0, 60) == 130.0
    raw = {"start_offsets": {"t": {"0": 40, "1": "7", "x": 1}, "u": "junk"}}
    start = DeploymentStart.from_record(123.0, raw, 50.0)
    assert start.offsets == {("t", 0): 40, ("t", 1): 7}
    assert start.within(173.0) and not start.within(173.5)
    assert DeploymentStart.from_record(1.0, {}, 5.0).offsets == {}


def _record(store: DeploymentStore, at: float, start_offsets: dict[str, dict[str, int]]) -> None:
    """Record a deployment of the ticks flow as the deployer does (the job itself is not needed here)."""
    request = LaunchRequest("ticks", TICKS_IMPORT, (), "test", "plan", "config")
    job = LaunchedJob("ticks", "local", socket.gethostname(), (), "", at, request)
    extra = {"source": {"kind": "kafka"}, "start_offsets": start_offsets}
    store.save(Deployment("ticks", job, "plan", "config", deployed_at=at, extra=extra))


@pytest.mark.kafka
def test_sensor_reports_starting_after_a_deploy_then_no_commits(
    bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """The sensor reads the current deployment through the ``loom`` resource: a fresh one whose group has
    not committed yet is STARTING (passes) with lag = end - start offset; an old one is NO_COMMITS."""
    (topic,) = make_topics(bootstrap, topic_prefix, ["ticks"], partitions=3)
    graph = _graph(bootstrap, topic_prefix, tmp_path)
    state = tmp_path / "state"
    store = DeploymentStore(state)
    defs = _defs(graph, QUIET, state)
    _produce(bootstrap, topic, 10, 3)
    _fetch_ready([t for _, t in kafka_lag_targets(graph)])
    start_offsets = {topic: {"0": 4, "1": 10, "2": 0}}
    with dg.instance_for_test() as instance:
        ticker = SensorTicker(defs, instance)
        _record(store, time.time(), start_offsets)
        fresh = ticker.tick()
        assert _status_of(fresh) == "STARTING" and fresh.passed, fresh.description
        assert _meta(fresh, "total_lag") == 6 + 0 + 10
        assert _meta(fresh, "starting_window_s") == 61.0  # buffer age 1 s + 2 intervals of 30 s
        rows = {r.data["partition"]: r.data for r in _meta(fresh, "partitions").records}
        assert {p: (r["lag"], r["committed"], r["status"]) for p, r in rows.items()} == {
            0: (6, -1, "STARTING"),
            1: (0, -1, "STARTING"),
            2: (10, -1, "STARTING"),
        }

        # the UI's one-shot check reads the same deployment
        result = dg.materialize(
            [*_specs(graph), *build_kafka_lag_checks(graph, QUIET)],
            instance=instance,
            selection=dg.AssetSelection.checks(dg.AssetCheckKey(dg.AssetKey(["loom", "ticks"]), KAFKA_LAG)),
            resources={"loom": LoomDeployResource(state_dir=str(state))},
        )
        (one_shot,) = result.get_asset_check_evaluations()
        assert one_shot.passed and _meta(one_shot, "status") == "STARTING"

        _record(store, time.time() - 3600, start_offsets)
        late = ticker.tick()
        assert _status_of(late) == "NO_COMMITS" and not late.passed
        assert late.severity is dg.AssetCheckSeverity.WARN and _meta(late, "total_lag") == 16


@pytest.mark.kafka
@pytest.mark.slow
def test_deployed_job_is_starting_until_its_first_flush(bench: DeployBench) -> None:
    """A real deploy whose table buffer holds everything (no flush, so loom commits nothing yet): the
    sensor reports STARTING, not NO_COMMITS, with the lag counted from the recorded start offsets."""
    bench.config = ticks_config(
        bench.root / "config",
        brokers=bench.bootstrap,
        prefix=bench.prefix,
        delta_uri=bench.delta_uri,
        buffer_max_records=100_000,
        buffer_max_age_s=600.0,
    )
    graph = build_loom_asset_graph([bench.spec()])
    defs = _defs(graph, QUIET, bench.state_dir)
    bench.produce(0, 120)
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance).success
        deployment = bench.store.current("ticks")
        assert deployment is not None
        recorded = deployment.extra.get("start_offsets")
        assert recorded == {f"{bench.prefix}.ticks": {"0": 0, "1": 0, "2": 0}}, recorded
        event = SensorTicker(defs, instance).tick()
        assert _status_of(event) == "STARTING" and event.passed, event.description
        assert _meta(event, "total_lag") == 120
        assert _meta(event, "starting_window_s") == 660.0
        print(f"\n[deployed, before the first flush] {event.description}")
