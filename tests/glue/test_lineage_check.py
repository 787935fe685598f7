"""Materializing a flow asset compiles with the run-time config and checks the declared lineage.

Each test loads definitions, then changes the config or the flow before materializing, as happens
when a config file is edited (or an environment variable differs) between code-location load and run.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from loom_dagster import LoomDeployResource, LoomFlowSpec, build_loom_defs
from loom_dagster.assets import DEPLOY_OP
from tests.conftest import shapes_config

SHAPES = "tests.flows.shapes:make_flow"


def _materialize(defs: dg.Definitions, key: str = "loom/events") -> dg.ExecuteInProcessResult:
    assets = list(defs.assets or [])
    with dg.instance_for_test() as instance:
        return dg.materialize(
            assets,
            selection=[dg.AssetKey.from_user_string(key)],
            resources={"loom": LoomDeployResource(mode="validate")},
            instance=instance,
            raise_on_error=False,
        )


def _defs(cfg: Path) -> dg.Definitions:
    return build_loom_defs([LoomFlowSpec(SHAPES, config=cfg, environment="test")])


def _failure(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    events = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert events, "expected a step failure"
    error = events[0].event_specific_data.error  # type: ignore[union-attr]
    assert error.cls_name == "Failure", error.message  # our errors reach the UI as dagster Failures
    return error.message


def test_lineage_check_passes_and_records_metadata(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    defs = _defs(shapes_config(tmp_path / "cfg"))
    result = _materialize(defs)
    assert result.success
    (mat,) = result.asset_materializations_for_node(DEPLOY_OP)
    md = mat.metadata
    key = dg.AssetKey(["loom", "events"])
    assert md["loom/plan_hash"].value == defs.resolve_assets_def(key).specs_by_key[key].code_version
    assert md["loom/deployed"].value is False
    assert md["loom/compile_ms"].value > 0
    sinks = md["loom/sinks"].value
    assert sinks["events_delta"] == f"delta:{tmp_path / 'cfg' / 'delta' / 'events'}"
    assert sinks["events_ch"] == "clickhouse:analytics.events"
    assert sinks["dlq:events_dlq"] == "kafka:t.events.dlq"


def test_changed_delta_uri_fails(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    cfg = shapes_config(tmp_path / "cfg")
    defs = _defs(cfg)
    shapes_config(cfg, delta_uri=str(tmp_path / "elsewhere"))
    message = _failure(_materialize(defs))
    assert "lineage check failed for flow 'events': 1 sink(s)" in message
    assert (
        f"changed: sink 'events_delta' is declared as delta:{cfg / 'delta' / 'events'} (asset delta/events)"
        in message
    )
    assert f"resolves it to delta:{tmp_path / 'elsewhere'}" in message
    assert "nothing was deployed" in message


def test_changed_clickhouse_table_fails(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    cfg = shapes_config(tmp_path / "cfg")
    defs = _defs(cfg)
    shapes_config(cfg, ch_table="analytics.events_v2")
    message = _failure(_materialize(defs))
    assert "changed: sink 'events_ch' is declared as clickhouse:analytics.events" in message
    assert "resolves it to clickhouse:analytics.events_v2" in message


def test_removed_sink_fails(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    defs = _defs(shapes_config(tmp_path / "cfg"))
    sinks_env.setenv("LOOM_TEST_SINKS", "delta,topic")
    message = _failure(_materialize(defs))
    assert "missing: the asset graph declares sink 'events_ch' -> clickhouse:analytics.events" in message
    assert "(asset clickhouse/analytics/events)" in message


def test_added_sink_fails(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    defs = _defs(shapes_config(tmp_path / "cfg"))
    sinks_env.setenv("LOOM_TEST_SINKS", "delta,ch,topic,sql")
    message = _failure(_materialize(defs))
    assert "unexpected: the compiled plan writes sink 'events_sql' -> sql:warehouse/events" in message


def test_changed_output_topic_fails(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    cfg = shapes_config(tmp_path / "cfg")
    defs = _defs(cfg)
    text = (cfg / "base.yaml").read_text().replace("topic: t.events.out", "topic: t.events.out2")
    (cfg / "base.yaml").write_text(text)
    message = _failure(_materialize(defs))
    assert "declared as kafka:t.events.out (asset kafka/t.events.out)" in message
    assert "resolves it to kafka:t.events.out2" in message


def test_every_difference_is_listed(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    cfg = shapes_config(tmp_path / "cfg")
    defs = _defs(cfg)
    shapes_config(cfg, delta_uri=str(tmp_path / "x"))
    sinks_env.setenv("LOOM_TEST_SINKS", "delta,topic,sql")
    message = _failure(_materialize(defs))
    assert "3 sink(s)" in message
    assert message.count("\n  - ") == 3


def test_compilation_errors_are_rendered_issue_by_issue(
    tmp_path: Path, sinks_env: pytest.MonkeyPatch
) -> None:
    cfg = shapes_config(tmp_path / "cfg")
    defs = _defs(cfg)
    text = (cfg / "base.yaml").read_text()
    text = text.replace("delivery: at_least_once", "delivery: sometimes")
    text = text.replace("events_delta: {uri:", "events_delta: {colour: red, uri:")
    (cfg / "base.yaml").write_text(text)
    message = _failure(_materialize(defs))
    assert "loom refused to compile flow 'events'" in message
    lines = [line for line in message.splitlines() if line.startswith("  - ")]
    assert len(lines) >= 2, message
    assert any("KAFKA_CONFIG_INVALID" in line.upper() or "kafka" in line.lower() for line in lines), message
    assert any("SINK_CONFIG_INVALID" in line.upper() and "events_delta" in line for line in lines), message
    assert "nothing was deployed" in message


def test_one_failing_flow_does_not_hide_the_others(tmp_path: Path) -> None:
    """Three flows in one run of the location's deploy op: each is deployed (validated) on its own;
    the ones whose lineage broke fail, the others still report their materialization, and the run's
    failure names each failed flow with its own error."""
    from bench.generated_flows import write_flows

    specs = write_flows(tmp_path / "flows", 4)
    defs = build_loom_defs(specs)
    for broken in ("gen_0001", "gen_0003"):
        base = tmp_path / "flows" / "config" / broken / "base.yaml"
        base.write_text(base.read_text().replace(f"/delta/{broken}_rows", f"/delta/{broken}_moved"))
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            list(defs.assets or []),
            selection=[dg.AssetKey(["loom", f"gen_{i:04d}"]) for i in range(4)],
            resources={"loom": LoomDeployResource(mode="validate")},
            instance=instance,
            raise_on_error=False,
        )
    materialized = {m.asset_key.to_user_string() for m in result.asset_materializations_for_node(DEPLOY_OP)}
    assert materialized == {"loom/gen_0000", "loom/gen_0002"}
    checks = [(e.asset_key.to_user_string(), e.check_name) for e in result.get_asset_check_evaluations()]
    assert sorted(checks) == [("loom/gen_0000", "deploy_checks"), ("loom/gen_0002", "deploy_checks")]
    message = _failure(result)
    assert "Failure: flow 'gen_0001': lineage check failed for flow 'gen_0001'" in message, message
    assert "\n\nflow 'gen_0003': lineage check failed for flow 'gen_0003'" in message
    assert "gen_0000" not in message and "gen_0002" not in message
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    metadata = failure.event_specific_data.user_failure_data.metadata  # type: ignore[union-attr]
    assert metadata["loom/failed_flows"].value == "gen_0001, gen_0003"
