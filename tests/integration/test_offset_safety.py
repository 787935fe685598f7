"""Offset safety on redeploy, against the real broker: a group commits with a plain confluent consumer
(``assign`` + synchronous ``commit``), then ``plan_offsets`` measures what a changed group / topic set /
``auto_offset_reset`` would re-read or skip, and where the new job starts. Expected numbers are read back
from the broker independently (``Consumer.committed`` + ``get_watermark_offsets``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from loom_dagster import LoomFlowSpec
from loom_dagster.core.checks.offsets import OffsetCheckError, OffsetPlan, plan_offsets
from loom_dagster.core.flows.catalog import CompiledFlow, compile_spec
from loom_dagster.dev.kafka import KafkaBroker
from tests.conftest import make_topics, write_yaml
from tests.support.helpers import silent_listener

PER_PARTITION = {0: 40, 1: 50, 2: 60}
"""Messages produced to each of the 3 partitions."""
OLD_COMMITS = {0: 10, 1: 25, 2: 60}
"""What the previous group processed (partition 2 fully)."""


# --------------------------------------------------------------------------- helpers


@pytest.fixture()
def bootstrap(kafka: KafkaBroker) -> str:
    return kafka.bootstrap_servers


def _compiled(
    root: Path,
    brokers: str,
    group: str,
    topics: list[str],
    reset: str = "earliest",
    security: str = "",
) -> CompiledFlow:
    """The Kafka -> Delta ticks flow compiled against a config with this group, topics and reset."""
    config = write_yaml(
        root / f"config-{group}-{reset}-{len(topics)}" / "base.yaml",
        f"""
        kafka:
          consumer:
            brokers: ["{brokers}"]
            group_id: {group}
            topics: [{", ".join(topics)}]
            delivery: at_least_once
            auto_offset_reset: {reset}
            security: {security or "null"}
          producer:
            brokers: ["{brokers}"]
          producers:
            ticks_out: {{brokers: ["{brokers}"], topic: {group}.out}}
            ticks_dlq: {{brokers: ["{brokers}"], topic: {group}.dlq}}
        streaming:
          sinks:
            ticks_delta: {{uri: "{root / "delta"}", table: ticks}}
        """,
    ).parent
    spec = LoomFlowSpec("tests.flows.delta_only:ticks_flow", config=config, environment="test")
    return compile_spec(spec)


def _previous(
    brokers: str, group: str, topics: list[str], reset: str | None = "earliest"
) -> dict[str, object]:
    """A previous deployment's ``extra["source"]`` (as ``source_summary`` writes it)."""
    source: dict[str, object] = {
        "kind": "kafka",
        "brokers": [brokers],
        "group_id": group,
        "topics": topics,
        "secured": False,
    }
    if reset is not None:
        source["auto_offset_reset"] = reset
    return source


def _produce(bootstrap: str, topic: str, counts: dict[int, int]) -> None:
    """``counts[p]`` raw messages to partition ``p`` (explicit partitions: exact offsets)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for partition, count in counts.items():
        for i in range(count):
            producer.produce(topic, value=b"m%d" % i, partition=partition)
    assert producer.flush(30) == 0


def _commit(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Commit *offsets* for *group* the way loom's source does: ``assign`` + synchronous commit."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = [TopicPartition(topic, p, o) for p, o in offsets.items()]
        consumer.assign(parts)
        consumer.commit(offsets=parts, asynchronous=False)
    finally:
        consumer.close()


def _broker_view(bootstrap: str, group: str, topic: str) -> dict[int, tuple[int, int, int | None]]:
    """Independently read back ``partition -> (low, high, committed by group)`` with a plain consumer."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        parts = sorted(meta.topics[topic].partitions)
        committed = {
            tp.partition: (tp.offset if tp.offset >= 0 else None)
            for tp in consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        }
        out = {}
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            out[p] = (low, high, committed[p])
        return out
    finally:
        consumer.close()


@pytest.fixture()
def orders(bootstrap: str, topic_prefix: str) -> tuple[str, str]:
    """A 3-partition topic holding ``PER_PARTITION`` messages, group ``<prefix>-old`` committed ``OLD_COMMITS``."""
    (topic,) = make_topics(bootstrap, topic_prefix, ["orders"], partitions=3)
    _produce(bootstrap, topic, PER_PARTITION)
    old = f"{topic_prefix}-old"
    _commit(bootstrap, old, topic, OLD_COMMITS)
    return topic, old


def _assert_json(plan: OffsetPlan) -> dict[str, object]:
    metadata = plan.metadata()
    assert json.loads(json.dumps(metadata)) == metadata
    return metadata


# --------------------------------------------------------------------------- changes that reset


@pytest.mark.kafka
def test_group_change_with_earliest_counts_what_the_old_group_processed(
    bootstrap: str, orders: tuple[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    topic, old = orders
    new = f"{topic_prefix}-new"
    compiled = _compiled(tmp_path, bootstrap, new, [topic], "earliest")
    plan = plan_offsets(compiled, _previous(bootstrap, old, [topic]), timeout_s=10)
    assert plan is not None
    view = _broker_view(bootstrap, old, topic)
    processed = {p: committed - low for p, (low, _, committed) in view.items() if committed is not None}
    assert processed == OLD_COMMITS  # the broker holds what we produced and committed
    assert plan.changes == (f"consumer group changed: {old} -> {new}",)
    (reset,) = plan.resets
    assert (reset.topic, reset.partitions, reset.reset) == (topic, (0, 1, 2), "earliest")
    assert reset.messages == sum(processed.values()) == 95
    assert plan.requires_acceptance and reset.caused_by.startswith("consumer group changed")
    assert plan.start_offsets == {topic: {p: low for p, (low, _, _) in view.items()}}

    text = plan.describe("ticks")
    assert f"consumer group changed: {old} -> {new}" in text
    assert "re-read 95 message(s)" in text and f"group '{old}' had already processed" in text
    assert "p0: 10 (offsets 0 to 9)" in text and "p2: 60 (offsets 0 to 59)" in text
    assert "set accept_offset_reset: true in the run config (ops -> loom_deploy -> config; it applies" in text
    assert f"restore the previous consumer group '{old}'" in text
    assert bootstrap in text
    metadata = _assert_json(plan)
    assert metadata["resets"] == {
        topic: {
            "partitions": [0, 1, 2],
            "re_read": 95,
            "caused_by": f"consumer group changed: {old} -> {new}",
            "detail": reset.detail,
        }
    }
    assert metadata["start_offsets"] == {topic: {"0": 0, "1": 0, "2": 0}}
    print(f"\n[offset plan, group change earliest]\n{text}")


@pytest.mark.kafka
def test_group_change_with_latest_counts_what_would_be_skipped(
    bootstrap: str, orders: tuple[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    topic, old = orders
    compiled = _compiled(tmp_path, bootstrap, f"{topic_prefix}-new", [topic], "latest")
    plan = plan_offsets(compiled, _previous(bootstrap, old, [topic], reset="latest"))
    assert plan is not None and plan.requires_acceptance
    view = _broker_view(bootstrap, old, topic)
    skipped = {p: high - (committed or 0) for p, (_, high, committed) in view.items()}
    (reset,) = plan.resets
    assert reset.reset == "latest" and reset.messages == sum(skipped.values()) == 30 + 25 + 0
    assert plan.start_offsets == {topic: {p: high for p, (_, high, _) in view.items()}}
    assert "skip 55 message(s)" in plan.describe("ticks")
    assert "had not processed yet" in reset.detail and "p2: 0" in reset.detail
    assert _assert_json(plan)["resets"][topic]["skipped"] == 55  # type: ignore[index]


@pytest.mark.kafka
def test_added_topic_is_read_or_skipped_whole(
    bootstrap: str, orders: tuple[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    """Same group, a topic added: the old topic resumes from its commits, the new one starts from the
    reset and moves everything it holds."""
    topic, old = orders
    (extra,) = make_topics(bootstrap, topic_prefix, ["refunds"], partitions=2)
    _produce(bootstrap, extra, {0: 7, 1: 5})
    _commit(bootstrap, old, topic, {0: 40, 1: 50, 2: 60})  # the old topic fully processed
    for reset_mode, verb in (("earliest", "reads all 12"), ("latest", "skips all 12")):
        compiled = _compiled(tmp_path, bootstrap, old, [topic, extra], reset_mode)
        plan = plan_offsets(compiled, _previous(bootstrap, old, [topic], reset=reset_mode))
        assert plan is not None
        assert plan.changes == (f"source topic(s) added: {extra}",)
        (reset,) = plan.resets
        assert reset.topic == extra and reset.messages == 12 and reset.partitions == (0, 1)
        assert verb in reset.detail and "never read" in reset.detail
        assert plan.requires_acceptance
        expected_extra = {0: 0, 1: 0} if reset_mode == "earliest" else {0: 7, 1: 5}
        assert plan.start_offsets == {topic: {0: 40, 1: 50, 2: 60}, extra: expected_extra}


@pytest.mark.kafka
def test_reset_change_only_counts_partitions_without_a_commit(
    bootstrap: str, orders: tuple[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    """earliest -> latest on the same group: committed partitions resume; an uncommitted one skips."""
    topic, _ = orders
    group = f"{topic_prefix}-partial"
    _commit(bootstrap, group, topic, {0: 40, 1: 50})
    compiled = _compiled(tmp_path, bootstrap, group, [topic], "latest")
    plan = plan_offsets(compiled, _previous(bootstrap, group, [topic], reset="earliest"))
    assert plan is not None
    assert plan.changes == ("auto_offset_reset changed: earliest -> latest",)
    (reset,) = plan.resets
    assert reset.partitions == (2,) and reset.messages == 60 and plan.requires_acceptance
    assert plan.start_offsets == {topic: {0: 40, 1: 50, 2: 60}}
    # an old record without auto_offset_reset: unknown = unchanged, nothing to accept
    legacy = plan_offsets(compiled, _previous(bootstrap, group, [topic], reset=None))
    assert legacy is not None and legacy.changes == () and not legacy.requires_acceptance


# --------------------------------------------------------------------------- nothing to accept


@pytest.mark.kafka
def test_unchanged_redeploy_and_first_deploy_need_no_acceptance(
    bootstrap: str, orders: tuple[str, str], topic_prefix: str, tmp_path: Path
) -> None:
    topic, old = orders
    _commit(bootstrap, old, topic, {0: 10, 1: 25})
    compiled = _compiled(tmp_path, bootstrap, old, [topic], "earliest")
    # partition 2 of a fresh group: its committed offset decides
    unchanged = plan_offsets(compiled, _previous(bootstrap, old, [topic]))
    assert unchanged is not None
    assert unchanged.changes == () and unchanged.resets == () and not unchanged.requires_acceptance
    assert unchanged.start_offsets == {topic: OLD_COMMITS}
    assert "as before" in unchanged.describe("ticks")

    fresh = f"{topic_prefix}-fresh"
    first = plan_offsets(_compiled(tmp_path, bootstrap, fresh, [topic], "earliest"), None)
    assert first is not None and first.changes == () and not first.requires_acceptance
    (reset,) = first.resets  # it does start from the reset, but nothing was running before
    assert reset.messages == sum(PER_PARTITION.values()) and reset.caused_by == ""
    assert first.start_offsets == {topic: {0: 0, 1: 0, 2: 0}}
    assert "accept_offset_reset" not in first.describe("ticks")

    # the same group never committed on one partition: it would have reset before too, no acceptance
    partial = f"{topic_prefix}-partial"
    _commit(bootstrap, partial, topic, {0: 40, 1: 50})
    again = plan_offsets(
        _compiled(tmp_path, bootstrap, partial, [topic], "earliest"), _previous(bootstrap, partial, [topic])
    )
    assert again is not None and again.changes == () and not again.requires_acceptance
    assert [r.partitions for r in again.resets] == [(2,)]
    assert again.start_offsets == {topic: {0: 40, 1: 50, 2: 0}}


def test_mongo_source_has_no_offset_plan(tmp_path: Path) -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from loom_dagster.core.flows.records import LoomFlow

    mongo = LoomFlow(
        name="watch", import_path="x:y", plan_hash="h", config_hash="c", environment="test",
        source_kind="mongo", consumer_group=None, delivery=None,
    )  # fmt: skip
    compiled = cast(Any, SimpleNamespace(flow=mongo, plan=SimpleNamespace(source=SimpleNamespace())))
    assert plan_offsets(compiled, None) is None


# --------------------------------------------------------------------------- broker trouble


def test_unreachable_broker_fails_fast_naming_the_brokers(tmp_path: Path) -> None:
    compiled = _compiled(tmp_path, "127.0.0.1:9", "g", ["nowhere"])
    started = time.monotonic()
    with pytest.raises(OffsetCheckError) as caught:
        plan_offsets(compiled, _previous("127.0.0.1:9", "g0", ["nowhere"]), timeout_s=5)
    assert time.monotonic() - started < 3.0
    text = str(caught.value)
    assert "Kafka brokers 127.0.0.1:9 did not answer" in text
    assert "flow 'ticks'" in text and "Nothing was stopped or launched" in text
    assert "kafka.consumer.brokers" in text


def test_silent_broker_is_bounded_by_the_timeout_and_secrets_stay_out(tmp_path: Path) -> None:
    security = "{protocol: SASL_PLAINTEXT, sasl_mechanism: PLAIN, sasl_username: app, sasl_password: hunter2}"
    with silent_listener() as port:
        compiled = _compiled(tmp_path, f"127.0.0.1:{port}", "g", ["t"], security=security)
        started = time.monotonic()
        with pytest.raises(OffsetCheckError) as caught:
            plan_offsets(compiled, None, timeout_s=1.5)
        elapsed = time.monotonic() - started
    text = str(caught.value)
    assert 1.0 < elapsed < 5.0, elapsed
    assert f"127.0.0.1:{port} did not answer within 1.5s" in text and "metadata request failed" in text
    assert "hunter2" not in text
