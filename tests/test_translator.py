"""Default keys, kinds and metadata of the translator; overriding it; column schemas from payloads."""

from __future__ import annotations

import datetime
import decimal
import uuid
from pathlib import Path

import dagster as dg
import msgspec
import pytest

from loom_dagster import LoomFlowSpec, LoomTranslator, build_loom_asset_graph, build_loom_defs
from loom_dagster.records import LoomFlow
from loom_dagster.schema import payload_columns
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
