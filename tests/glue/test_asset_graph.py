"""The asset graph across flows: topic chaining, shared sources, shared tables and key conflicts."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from loom_dagster import DuplicateAssetKeyError, LoomFlowSpec, build_loom_asset_graph, build_loom_defs
from tests.conftest import shapes_config
from tests.support.example import asset_edges

SHAPES = "tests.flows.shapes:make_flow"
AUDIT = "tests.flows.shapes:make_second_reader"


def test_example_chains_flows_through_one_topic_asset() -> None:
    from definitions.definitions import defs

    edges = asset_edges(defs)
    assert ("loom/orders_enrichment", "kafka/orders.enriched") in edges
    assert ("kafka/orders.enriched", "loom/order_ledger") in edges
    keys = [k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()]
    assert keys.count("kafka/orders.enriched") == 1


def test_flows_sharing_a_source_share_one_topic_and_table(
    tmp_path: Path, sinks_env: pytest.MonkeyPatch
) -> None:
    cfg = shapes_config(tmp_path / "cfg")
    defs = build_loom_defs(
        [
            LoomFlowSpec(SHAPES, config=cfg, environment="test"),
            LoomFlowSpec(AUDIT, config=cfg, environment="test"),
        ]
    )
    edges = asset_edges(defs)
    assert {("kafka/t.events", "loom/events"), ("kafka/t.events", "loom/events_audit")} <= edges
    assert {("loom/events", "delta/events"), ("loom/events_audit", "delta/events")} <= edges
    keys = [k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()]
    assert keys.count("kafka/t.events") == 1 and keys.count("delta/events") == 1


def test_two_flows_with_one_name_are_refused(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    cfg = shapes_config(tmp_path / "cfg")
    specs = [LoomFlowSpec(SHAPES, config=cfg, environment="test")] * 2
    with pytest.raises(
        DuplicateAssetKeyError, match=r"'loom/events' is claimed by flow 'events' and by flow"
    ):
        build_loom_asset_graph(specs)


def test_two_tables_under_one_key_are_refused(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    a = shapes_config(tmp_path / "a", delta_uri=str(tmp_path / "lake-a" / "events"))
    b = shapes_config(tmp_path / "b", delta_uri=str(tmp_path / "lake-b" / "events"))
    specs = [
        LoomFlowSpec(SHAPES, config=a, environment="test"),
        LoomFlowSpec(AUDIT, config=b, environment="test"),
    ]
    with pytest.raises(DuplicateAssetKeyError) as err:
        build_loom_asset_graph(specs)
    assert "'delta/events'" in str(err.value) and "key prefix" in str(err.value)


def test_dlq_topic_is_downstream_and_tagged(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    graph = build_loom_asset_graph(
        [LoomFlowSpec(SHAPES, config=shapes_config(tmp_path / "c"), environment="test")]
    )
    dlq = graph.spec_for(dg.AssetKey(["kafka", "t.events.dlq"]))
    assert dlq is not None
    assert dlq.tags["loom/dlq"] == "true"
    assert {d.asset_key for d in dlq.deps} == {dg.AssetKey(["loom", "events"])}
    assert dlq.metadata["loom/error_kinds"] == "business, routing, task, wire"
