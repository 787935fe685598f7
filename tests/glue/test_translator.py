"""Default keys, kinds and metadata of the translator; overriding it; column schemas from payloads."""

from __future__ import annotations

import datetime
import decimal
import uuid
from pathlib import Path

import dagster as dg
import msgspec
import pytest
from dagster._core.definitions.metadata.metadata_set import TableMetadataSet, UriMetadataSet

from loom_dagster import LoomFlowSpec, LoomTranslator, build_loom_asset_graph, build_loom_defs
from loom_dagster.asset_graph import merge_topics
from loom_dagster.core.flows.columns import payload_columns
from loom_dagster.core.flows.records import LoomFlow, LoomSourceCollection
from loom_dagster.translator import KafkaMetadataSet, LoomMetadataSet, LoomRecord
from tests.conftest import shapes_config

SHAPES = "tests.flows.shapes:make_flow"


def _graph(tmp_path: Path, translator: LoomTranslator | None = None, **cfg: str):
    spec = LoomFlowSpec(
        SHAPES, config=shapes_config(tmp_path / "cfg", **cfg), environment="test", group_name="events"
    )
    return build_loom_asset_graph([spec], translator)


def test_default_keys_kinds_and_metadata(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    sinks_env.setenv("LOOM_TEST_SINKS", "delta,ch,sql,topic")
    graph = _graph(tmp_path)
    (flow,) = graph.flows
    assert flow.spec.key == dg.AssetKey(["loom", "events"])
    assert flow.spec.kinds == {"loom", "bytewax"}
    assert flow.spec.code_version == flow.compiled.flow.plan_hash and len(flow.spec.code_version) == 16
    md = flow.spec.metadata
    assert md["loom/consumer_group"] == "t-events"
    assert md["loom/topics"] == "t.events"
    assert md["loom/delivery"] == "at_least_once"
    assert md["loom/import_path"] == SHAPES
    assert md["loom/error_routes"] == "business, routing, task, wire -> t.events.dlq"
    assert flow.spec.group_name == "events"

    specs = {s.key.to_user_string(): s for s in graph.external_specs}
    assert set(specs) == {
        "kafka/t.events",
        "kafka/t.events.out",
        "kafka/t.events.dlq",
        "delta/events",
        "clickhouse/analytics/events",
        "sql/warehouse/events",
    }
    delta = specs["delta/events"]
    assert delta.metadata["dagster/uri"] == str(tmp_path / "cfg" / "delta" / "events")
    assert delta.metadata["dagster/table_name"] == "events"
    assert delta.kinds == {"deltalake", "table"}
    ch = specs["clickhouse/analytics/events"]
    assert ch.metadata["dagster/table_name"] == "analytics.events"
    assert "hunter2" not in ch.metadata["dagster/uri"] and "***" in ch.metadata["dagster/uri"]
    sql = specs["sql/warehouse/events"]
    assert sql.kinds == {"sql", "table", "sqlite"}
    schema = delta.metadata["dagster/column_schema"]
    assert [(c.name, c.type, c.constraints.nullable) for c in schema.columns] == [
        ("event_id", "string", False),
        ("value", "int64", False),
        ("doubled", "int64", False),
        ("note", "string", True),
    ]
    assert specs["kafka/t.events.dlq"].tags.get("loom/dlq") == "true"
    assert specs["kafka/t.events.dlq"].kinds == {"kafka", "dlq"}
    assert "loom/dlq" not in specs["kafka/t.events.out"].tags


def test_no_secret_anywhere_in_specs(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    sinks_env.setenv("LOOM_TEST_SINKS", "delta,ch,sql,topic")
    graph = _graph(tmp_path, sql_url="postgresql+asyncpg://app:pa55word@db/shop")
    text = repr([n.spec for n in graph.flows]) + repr(graph.external_specs)
    assert "hunter2" not in text and "pa55word" not in text


def test_translator_override_changes_keys_and_edges(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    class Prefixed(LoomTranslator):
        def get_flow_spec(self, flow: LoomFlow) -> dg.AssetSpec:
            spec = super().get_flow_spec(flow)
            return spec.replace_attributes(key=spec.key.with_prefix("prod"), group_name="streams")

        def get_source_topic_spec(self, topic):  # type: ignore[no-untyped-def]
            return (
                super().get_source_topic_spec(topic).replace_attributes(key=dg.AssetKey(["raw", topic.topic]))
            )

    graph = _graph(tmp_path, Prefixed())
    (flow,) = graph.flows
    assert flow.spec.key == dg.AssetKey(["prod", "loom", "events"])
    assert flow.spec.group_name == "streams"
    assert {d.asset_key for d in flow.spec.deps} == {dg.AssetKey(["raw", "t.events"])}
    delta = graph.spec_for(dg.AssetKey(["delta", "events"]))
    assert delta is not None and {d.asset_key for d in delta.deps} == {flow.spec.key}


class Nested(msgspec.Struct):
    a: int


def test_payload_columns_cover_common_types() -> None:
    class Payload(msgspec.Struct):
        s: str
        i: int
        f: float
        b: bool
        ts: datetime.datetime
        d: datetime.date
        dec: decimal.Decimal
        u: uuid.UUID
        tags: list[str]
        attrs: dict[str, int]
        nested: Nested
        maybe: int | None = None

    cols = {c.name: (c.type, c.nullable) for c in payload_columns(Payload)}
    assert cols == {
        "s": ("string", False),
        "i": ("int64", False),
        "f": ("float64", False),
        "b": ("bool", False),
        "ts": ("timestamp", False),
        "d": ("date", False),
        "dec": ("decimal", False),
        "u": ("uuid", False),
        "tags": ("list<string>", False),
        "attrs": ("map<string,int64>", False),
        "nested": ("struct<Nested>", False),
        "maybe": ("int64", True),
    }
    assert payload_columns(int) == ()


def test_build_loom_defs_validates(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    spec = LoomFlowSpec(SHAPES, config=shapes_config(tmp_path / "cfg"), environment="test")
    defs = build_loom_defs([spec])
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert "loom/events" in keys
    assert defs.resolve_job_def("loom_undeploy") is not None


def test_get_asset_spec_dispatches_to_the_per_kind_hooks(
    tmp_path: Path, sinks_env: pytest.MonkeyPatch
) -> None:
    sinks_env.setenv("LOOM_TEST_SINKS", "delta,ch,sql,topic")
    translator = LoomTranslator()
    (node,) = _graph(tmp_path, translator).flows
    flow = node.compiled.flow
    assert translator.get_asset_spec(flow) == translator.get_flow_spec(flow)
    topics = {t.topic: t for t in merge_topics([flow])}
    source, output = topics["t.events"], topics["t.events.out"]
    assert translator.get_asset_spec(source) == translator.get_source_topic_spec(source)
    assert translator.get_asset_spec(output) == translator.get_output_topic_spec(output)
    sink = flow.storage_sinks[0]
    assert translator.get_asset_spec(sink, flow=flow) == translator.get_storage_sink_spec(sink, flow)
    coll = LoomSourceCollection("shop", "orders", "events")
    assert translator.get_asset_spec(coll).key == dg.AssetKey(["mongo", "shop", "orders"])
    assert translator.get_asset_spec(coll).metadata == {"dagster/table_name": "shop.orders"}
    with pytest.raises(TypeError, match="needs flow="):
        translator.get_asset_spec(sink)
    with pytest.raises(TypeError, match="no spec for str"):
        translator.get_asset_spec("events")  # type: ignore[arg-type]


def test_overriding_get_asset_spec_changes_every_kind_and_the_edges(
    tmp_path: Path, sinks_env: pytest.MonkeyPatch
) -> None:
    sinks_env.setenv("LOOM_TEST_SINKS", "delta,topic")
    seen: list[str] = []

    class Prefixed(LoomTranslator):
        def get_asset_spec(self, props: LoomRecord, *, flow: LoomFlow | None = None) -> dg.AssetSpec:
            seen.append(type(props).__name__)
            spec = super().get_asset_spec(props, flow=flow)
            return spec.replace_attributes(key=spec.key.with_prefix("prod"))

    graph = _graph(tmp_path, Prefixed())
    assert sorted(set(seen)) == ["LoomFlow", "LoomStorageSink", "LoomTopic"]
    (flow,) = graph.flows
    assert flow.spec.key == dg.AssetKey(["prod", "loom", "events"])
    assert {d.asset_key for d in flow.spec.deps} == {dg.AssetKey(["prod", "kafka", "t.events"])}
    delta = graph.spec_for(dg.AssetKey(["prod", "delta", "events"]))
    assert delta is not None and {d.asset_key for d in delta.deps} == {flow.spec.key}
    assert flow.sink_keys == {
        "events_delta": "prod/delta/events",
        "dlq:events_dlq": "prod/kafka/t.events.dlq",
        "output:events_out": "prod/kafka/t.events.out",
    }


def test_metadata_goes_through_dagster_metadata_sets(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    sinks_env.setenv("LOOM_TEST_SINKS", "delta,ch,sql,topic")
    graph = _graph(tmp_path)
    (node,) = graph.flows
    loom_md = LoomMetadataSet.extract(node.spec.metadata)
    assert loom_md.plan_hash == node.compiled.flow.plan_hash
    assert loom_md.consumer_group == "t-events" and loom_md.collections is None
    assert loom_md.sinks is not None and loom_md.sinks.value == node.compiled.flow.sink_identities
    assert set(node.spec.metadata) == set(loom_md.keys())

    delta = graph.spec_for(dg.AssetKey(["delta", "events"]))
    assert delta is not None
    table = TableMetadataSet.extract(delta.metadata)
    assert table.table_name == "events" and table.column_schema is not None
    assert [c.name for c in table.column_schema.columns] == ["event_id", "value", "doubled", "note"]
    assert UriMetadataSet.extract(delta.metadata).uri == str(tmp_path / "cfg" / "delta" / "events")
    assert LoomMetadataSet.extract(delta.metadata).backend == "delta"
    out = graph.spec_for(dg.AssetKey(["kafka", "t.events.out"]))
    assert out is not None and KafkaMetadataSet.extract(out.metadata).topic == "t.events.out"
    assert dict(LoomMetadataSet(plan_hash="abc", pid=4)) == {"loom/plan_hash": "abc", "loom/pid": 4}
