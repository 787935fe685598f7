"""End-to-end delay of two chained flows on the real broker, with real deployed jobs: ``e2e_a`` reads
``orders`` and writes ``enriched``, ``e2e_b`` reads ``enriched`` and writes Delta. The real lag sensor and
the real sink health sensor tick on a real instance; the ground truth is when the test produced the
messages that have not reached the table yet.

- A stopped: the sink's end-to-end delay is A's delay + B's delay (B caught up: 0), grows with A's, and
  crosses the sink's budget (WARN, then ERROR: ``over_delay_budget``).
- B stopped: likewise with A caught up; the messages A wrote to ``enriched`` carry the timestamps of the
  ``orders`` messages they came from (loom keeps the origin timestamp), so B's delay already counts from
  the first topic. Then A stopped too (both hops lag): the age of the oldest data not in the table is
  B's delay alone; the default rule (``max``) gives it, adding the hops (``sum``) would count A's wait
  twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import dagster as dg
import pytest
from confluent_kafka import Consumer, TopicPartition

from loom_dagster import DeploymentStore, LoomDeployResource, LoomFlowSpec, build_loom_defs
from loom_dagster.asset_check_names import SINK_FRESHNESS
from loom_dagster.asset_graph import LoomAssetGraph
from loom_dagster.assets import build_loom_asset_graph
from loom_dagster.core.sensor_settings import KafkaLagSettings, SinkFreshness, SinkHealthSettings
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.dev.produce import produce
from loom_dagster.sensors.lag import build_kafka_lag_sensor
from loom_dagster.sensors.sinks import build_sink_health_sensor
from tests.conftest import make_topics
from tests.flows.delta_only import Tick, TickRow
from tests.flows.e2e_chain import e2e_chain_configs
from tests.support.deploy_env import kill_deployed_jobs

LAG = KafkaLagSettings(
    window=5, warn_lag=10**9, error_lag=10**10, request_timeout_s=5.0, delay_timeout_s=10.0
)
TOLERANCE_S = 2.0
"""Timestamps are in milliseconds and the delay is read at some moment of the tick: the ground truth is
bracketed by the tick's start and end, plus this."""
SINK = dg.AssetKey(["delta", "chain"])
WARN_BUDGET_S, MAX_BUDGET_S = 8.0, 16.0


class Chain:
    """The two flows deployed on a real instance, the lag and sink sensors ticking on it."""

    def __init__(self, bootstrap: str, prefix: str, root: Path, instance: dg.DagsterInstance) -> None:
        self.bootstrap, self.prefix, self.instance = bootstrap, prefix, instance
        make_topics(bootstrap, prefix, ["orders", "enriched", "a.dlq"], partitions=2)
        self.delta_uri = str(root / "delta" / "chain")
        config_a, config_b = e2e_chain_configs(
            root / "config", brokers=bootstrap, prefix=prefix, delta_uri=self.delta_uri
        )
        self.specs = {
            "e2e_a": LoomFlowSpec("tests.flows.e2e_chain:flow_a", config=config_a, environment="test"),
            "e2e_b": LoomFlowSpec("tests.flows.e2e_chain:flow_b", config=config_b, environment="test"),
        }
        self.state_dir = root / "state"
        self.store = DeploymentStore(self.state_dir)
        self.graph: LoomAssetGraph = build_loom_asset_graph(list(self.specs.values()))
        self.lag_cursors: dict[str, str | None] = {}
        self.sink_cursor: str | None = None
        budget = SinkFreshness(
            warn_after_s=3600, fail_after_s=7200,
            warn_end_to_end_delay_s=WARN_BUDGET_S, max_end_to_end_delay_s=MAX_BUDGET_S,
        )  # fmt: skip
        self.sink_sensor = build_sink_health_sensor(
            self.graph, SinkHealthSettings(default_freshness=budget), end_to_end_step_s=0.5
        )
        self.seq = 0

    def resource(self) -> LoomDeployResource:
        return LoomDeployResource(state_dir=str(self.state_dir), health_timeout_s=60.0)

    def deploy(self, *names: str) -> None:
        defs = build_loom_defs(list(self.specs.values()))
        result = dg.materialize(
            list(defs.assets or []),
            selection=[dg.AssetKey(["loom", n]) for n in names],
            resources={"loom": self.resource()},
            instance=self.instance,
            raise_on_error=False,
        )
        assert result.success, [e.message for e in result.all_events if e.is_failure]

    def stop(self, name: str) -> None:
        """Kill the flow's job (by PID and start time)."""
        kill_deployed_jobs(self.store, [name])

    def produce(self, count: int) -> tuple[float, list[str]]:
        """*count* ticks to ``orders``; returns the time just before producing and their ids."""
        ids = [f"id-{self.seq + i}" for i in range(count)]
        before = time.time()
        produce(
            self.bootstrap,
            f"{self.prefix}.orders",
            [Tick(id=i, seq=self.seq) for i in ids],
            key=lambda t: t.id,
        )
        self.seq += count
        return before, ids

    def delta_ids(self) -> set[str]:
        from deltalake import DeltaTable

        try:
            return set(DeltaTable(self.delta_uri).to_pyarrow_table(columns=["id"]).column("id").to_pylist())
        except Exception:
            return set()

    def lag_tick(
        self, settings: KafkaLagSettings = LAG
    ) -> tuple[dict[str, dg.AssetCheckEvaluation], float, float]:
        """One tick of the real lag sensor (its own cursor per *settings*): evaluation per flow name, and
        the clock before and after."""
        sensor = build_kafka_lag_sensor(self.graph, settings, name="loom_kafka_lag")
        label = repr(settings)
        context = dg.build_sensor_context(
            instance=self.instance, cursor=self.lag_cursors.get(label), resources={"loom": self.resource()}
        )
        before = time.time()
        data = sensor.evaluate_tick(context)
        after = time.time()
        self.lag_cursors[label] = data.cursor
        found = {}
        for event in cast(list[dg.AssetCheckEvaluation], data.asset_events):
            if settings is LAG:
                self.instance.report_runless_asset_event(event)
            found[event.asset_key.path[-1]] = event
        return found, before, after

    def sink_tick(self) -> dg.AssetCheckEvaluation | None:
        """One tick of the real sink health sensor; the freshness evaluation it reported (or None)."""
        data = self.sink_sensor.evaluate_tick(
            dg.build_sensor_context(instance=self.instance, cursor=self.sink_cursor)
        )
        self.sink_cursor = data.cursor
        reported = None
        for event in data.asset_events:
            self.instance.report_runless_asset_event(event)
            if isinstance(event, dg.AssetCheckEvaluation) and event.check_name == SINK_FRESHNESS:
                reported = event
        return reported

    def settle(self, ids: set[str], timeout_s: float = 120.0) -> None:
        """Wait until *ids* are in the table and neither flow lags."""
        deadline = time.monotonic() + timeout_s
        while True:
            found, _, _ = self.lag_tick()
            lags = {name: _meta(e, "total_lag") for name, e in found.items()}
            if ids <= self.delta_ids() and set(lags.values()) == {0}:
                return
            assert time.monotonic() < deadline, (lags, len(ids - self.delta_ids()))
            time.sleep(0.5)


def _meta(event: dg.AssetCheckEvaluation, key: str) -> Any:
    return event.metadata[key].value


def _assert_age(value: float, since: float, before: float, after: float) -> None:
    """*value* is the age of data produced at *since*, measured between *before* and *after*."""
    assert before - since - TOLERANCE_S <= value <= after - since + TOLERANCE_S, (value, before - since)


def _sum_of_hops(found: dict[str, dg.AssetCheckEvaluation]) -> float:
    return float(_meta(found["e2e_a"], "max_delay_s")) + float(_meta(found["e2e_b"], "max_delay_s"))


@pytest.fixture()
def chain(kafka: KafkaBroker, topic_prefix: str, tmp_path: Path) -> Iterator[Chain]:
    with dg.instance_for_test() as instance:
        chain = Chain(kafka.bootstrap_servers, topic_prefix, tmp_path, instance)
        try:
            _, ids = chain.produce(10)
            chain.deploy("e2e_a", "e2e_b")
            chain.settle(set(ids))
            yield chain
        finally:
            chain.stop("e2e_a")
            chain.stop("e2e_b")


def _sink_end_to_end(chain: Chain) -> dg.AssetCheckEvaluation:
    """Tick the sink sensor; the sink's latest freshness evaluation (it must carry the end-to-end delay)."""
    chain.sink_tick()
    key = dg.AssetCheckKey(SINK, SINK_FRESHNESS)
    record = chain.instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    assert record is not None and record.evaluation is not None
    assert "loom/end_to_end_delay_s" in record.evaluation.metadata, record.evaluation.metadata
    return record.evaluation


@pytest.mark.kafka
@pytest.mark.slow
def test_a_stopped_end_to_end_is_a_plus_b_and_crosses_the_budget(chain: Chain) -> None:
    caught_up = _sink_end_to_end(chain)
    assert (
        _meta(caught_up, "loom/end_to_end_delay_s") == 0.0 and _meta(caught_up, "loom/freshness") == "fresh"
    )
    assert _meta(caught_up, "loom/end_to_end_complete") is True

    chain.stop("e2e_a")
    produced_at, _ = chain.produce(5)
    seen = []
    for wait_until, status in (
        (2.0, "fresh"),
        (WARN_BUDGET_S + 2, "over_delay_budget"),
        (MAX_BUDGET_S + 2, "over_delay_budget"),
    ):
        time.sleep(max(0.0, produced_at + wait_until - time.time()))
        found, before, after = chain.lag_tick()
        a, b = found["e2e_a"], found["e2e_b"]
        assert _meta(b, "max_delay_s") == 0.0  # B caught up: its topic is idle
        _assert_age(_meta(a, "max_delay_s"), produced_at, before, after)
        flow_e2e = _meta(b, "loom/end_to_end_delay_s")
        assert flow_e2e == pytest.approx(_sum_of_hops(found), abs=0.02)
        assert _meta(b, "loom/end_to_end_path").startswith(f"{chain.prefix}.orders -> [e2e_a ")
        assert _meta(b, "loom/end_to_end_path").endswith(f"-> {chain.prefix}.enriched -> [e2e_b 0.0 s]")
        sink = _sink_end_to_end(chain)
        assert _meta(sink, "loom/end_to_end_delay_s") == pytest.approx(flow_e2e, abs=0.1)
        _assert_age(_meta(sink, "loom/end_to_end_delay_s"), produced_at, before, after)
        assert _meta(sink, "loom/end_to_end_flow") == "loom/e2e_b"
        assert _meta(sink, "loom/end_to_end_complete") is True
        assert before - 1 <= _meta(sink, "loom/end_to_end_measured_at") <= after + 1
        assert _meta(sink, "loom/freshness") == status, sink.description
        seen.append((round(flow_e2e, 1), sink.severity.value if not sink.passed else "passed"))
    assert seen[0][0] < seen[1][0] < seen[2][0]  # A's delay grows, and the sink's with it
    assert [s for _, s in seen] == ["passed", "WARN", "ERROR"]
    assert f">= max_end_to_end_delay_s {MAX_BUDGET_S:g}" in (sink.description or "")
    print(
        f"\n[end-to-end, A stopped] (delay s, verdict) per tick: {seen}; path {_meta(sink, 'loom/end_to_end_path')}"
    )


def _origin_timestamps(bootstrap: str, topic: str, ids: set[str], payload: type) -> dict[str, float]:
    """The Kafka timestamp (s) of each message of *ids* in *topic*, by id (decoded from loom's envelope)."""
    from loom.streaming.kafka import MsgspecCodec

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "e2e-probe", "enable.auto.commit": False}
    )
    codec: Any = MsgspecCodec()
    found: dict[str, float] = {}
    try:
        meta = consumer.list_topics(topic, timeout=10)
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions])
        deadline = time.monotonic() + 20
        while not ids <= found.keys() and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            found[codec.decode(msg.value(), payload).payload.id] = msg.timestamp()[1] / 1000.0
    finally:
        consumer.close()
    return {k: v for k, v in found.items() if k in ids}


@pytest.mark.kafka
@pytest.mark.slow
def test_b_stopped_end_to_end_is_a_plus_b_then_both_lagging_is_not_a_sum(chain: Chain) -> None:
    chain.stop("e2e_b")
    produced_at, ids = chain.produce(5)
    deadline = time.monotonic() + 60
    while True:  # A moves the new messages on to `enriched`, where B does not read them
        found, before, after = chain.lag_tick()
        if _meta(found["e2e_a"], "total_lag") == 0 and _meta(found["e2e_b"], "total_lag") >= 5:
            break
        assert time.monotonic() < deadline, {n: _meta(e, "total_lag") for n, e in found.items()}
        time.sleep(0.5)
    time.sleep(max(0.0, produced_at + 4 - time.time()))
    found, before, after = chain.lag_tick()
    a, b = found["e2e_a"], found["e2e_b"]
    assert _meta(a, "max_delay_s") == 0.0
    _assert_age(_meta(b, "max_delay_s"), produced_at, before, after)  # counted from `orders`, not `enriched`
    flow_e2e = _meta(b, "loom/end_to_end_delay_s")
    assert flow_e2e == pytest.approx(_sum_of_hops(found), abs=0.02)
    sink = _sink_end_to_end(chain)
    _assert_age(_meta(sink, "loom/end_to_end_delay_s"), produced_at, before, after)
    assert _meta(sink, "loom/end_to_end_delay_s") == pytest.approx(flow_e2e, abs=0.1)

    # why: A wrote each message to `enriched` with the time the `orders` message was produced (the
    # envelope's produced_at_ms, which loom stamps a moment before the producer stamps the record: a few
    # ms apart at most), not with the time A wrote it
    origin = _origin_timestamps(chain.bootstrap, f"{chain.prefix}.orders", set(ids), Tick)
    copied = _origin_timestamps(chain.bootstrap, f"{chain.prefix}.enriched", set(ids), TickRow)
    assert len(origin) == 5 and copied.keys() == origin.keys()
    assert all(abs(copied[i] - origin[i]) <= 0.05 for i in ids), (copied, origin)

    # both hops lag: A stopped too, newer data waits in `orders`
    chain.stop("e2e_a")
    time.sleep(3.0)
    newer_at, _ = chain.produce(3)
    time.sleep(3.0)
    found, before, after = chain.lag_tick()
    summed, _, _ = chain.lag_tick(replace(LAG, end_to_end_rule="sum"))
    a_delay, b_delay = _meta(found["e2e_a"], "max_delay_s"), _meta(found["e2e_b"], "max_delay_s")
    _assert_age(a_delay, newer_at, before, after)
    _assert_age(b_delay, produced_at, before, after)
    oldest_missing = (
        produced_at  # the first of the 5 messages B never consumed is the oldest data not in the table
    )
    max_rule = _meta(found["e2e_b"], "loom/end_to_end_delay_s")
    _assert_age(max_rule, oldest_missing, before, after)
    assert max_rule == pytest.approx(b_delay, abs=0.02) and a_delay > TOLERANCE_S
    sum_rule = _meta(summed["e2e_b"], "loom/end_to_end_delay_s")
    assert sum_rule > after - oldest_missing + TOLERANCE_S  # the sum overstates it by A's wait
    sink = _sink_end_to_end(chain)
    _assert_age(_meta(sink, "loom/end_to_end_delay_s"), oldest_missing, before, after)
    print(
        f"\n[end-to-end, B stopped] A {_meta(a, 'max_delay_s')} s + B {_meta(b, 'max_delay_s')} s = {flow_e2e} s; "
        f"both lagging: A {a_delay} s, B {b_delay} s, oldest data not in the table "
        f"{after - oldest_missing:.1f} s old -> max rule {max_rule} s, sum rule {sum_rule} s"
    )
