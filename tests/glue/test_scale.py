"""Scale: 200 generated flows (Delta, ClickHouse, SQL, output topic and DLQ each) load into
``build_loom_defs`` and validate, with the expected assets and edges; the compile cache and the
config cache give the same records as a fresh compile and notice every change that matters.

No timing is asserted here; ``bench/load_defs.py`` measures.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from bench.generated_flows import plain_graph, write_flows
from loom_dagster import LoomFlowSpec, build_loom_defs
from loom_dagster.asset_check_names import DEPLOY_CHECKS, JOB_RUNNING, KAFKA_LAG, SINK_FRESHNESS
from loom_dagster.assets import DEPLOY_OP
from loom_dagster.core.flows.catalog import CompileCache, compile_spec, compile_specs
from loom_dagster.core.flows.describe import class_source, flow_fingerprint
from loom_dagster.core.flows.loading import clear_config_cache, load_config
from loom_dagster.definitions import FLOW_CHECKS_OP
from loom_dagster.sensors.check_ops import CHECKS_PER_OP
from tests.conftest import shapes_config
from tests.support.example import asset_edges

COUNT = 200
# Per flow: the flow, a Delta, a ClickHouse and a SQL table, an output topic and a DLQ; half the flows
# have a source topic of their own (a quarter share the previous flow's, a quarter read its output).
EXPECTED_ASSETS = COUNT * 6 + COUNT // 2
EXPECTED_EDGES = COUNT * 6


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[LoomFlowSpec]]]:
    """200 flows written once for the module, with a compile cache of their own."""
    directory = tmp_path_factory.mktemp("scale")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOM_DAGSTER_COMPILE_CACHE", str(directory / "compile-cache"))
        mp.delenv("LOOM_ENV", raising=False)
        specs = write_flows(directory / "flows", COUNT)
        yield directory, specs


def test_200_flows_load_and_validate(generated: tuple[Path, list[LoomFlowSpec]]) -> None:
    directory, specs = generated
    defs = build_loom_defs(specs)
    dg.Definitions.validate_loadable(defs)

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    edges = asset_edges(defs)
    expected = plain_graph(COUNT)
    assert len(keys) == EXPECTED_ASSETS == len(expected.all_keys)
    assert len(edges) == EXPECTED_EDGES == len(expected.edges)
    assert keys == set(expected.all_keys)
    assert edges == expected.edges
    assert ("loom/gen_0001", "kafka/gen.0001.out") in edges
    assert ("kafka/gen.0001.out", "loom/gen_0002") in edges  # chained
    assert {("kafka/gen.0000.in", "loom/gen_0000"), ("kafka/gen.0000.in", "loom/gen_0001")} <= edges  # shared
    flow = defs.resolve_assets_def(dg.AssetKey(["loom", "gen_0007"])).specs_by_key[
        dg.AssetKey(["loom", "gen_0007"])
    ]
    assert flow.group_name == "gen_group_00" and list(flow.owners) == ["team:generated"]
    assert len(list(defs.resolve_all_job_defs())) >= 1


def test_one_deploy_op_and_few_check_ops_for_200_flows(generated: tuple[Path, list[LoomFlowSpec]]) -> None:
    """What the location declares for N flows (Dagster's load cost is per op, output and check): ONE
    subsettable deploy op over every flow (each flow its ``deploy_checks``), the flows' ``job_running``
    and ``kafka_lag`` checks in shared ops of CHECKS_PER_OP checks (a flow's two checks in one op, one
    input per flow), the sinks' ``freshness`` in ops without inputs; 6 checks per flow in all."""
    directory, specs = generated
    defs = build_loom_defs(specs)
    graph = defs.resolve_asset_graph()
    ops = {ad.node_def.name: ad for ad in graph.assets_defs if ad.is_executable}
    flow_keys = {dg.AssetKey(["loom", f"gen_{i:04d}"]) for i in range(COUNT)}

    deploy = ops.pop(DEPLOY_OP)
    assert deploy.keys == flow_keys and deploy.can_subset and deploy.op.pool == DEPLOY_OP
    assert deploy.check_keys == {dg.AssetCheckKey(k, DEPLOY_CHECKS) for k in flow_keys}
    assert all(not ad.keys for ad in ops.values())  # every other op only checks

    flow_checks = [ops.pop(FLOW_CHECKS_OP if n == 1 else f"{FLOW_CHECKS_OP}_{n}") for n in range(1, 5)]
    assert [len(ad.check_keys) for ad in flow_checks] == [CHECKS_PER_OP] * 4
    assert [len(ad.node_keys_by_input_name) for ad in flow_checks] == [CHECKS_PER_OP // 2] * 4
    assert {k for ad in flow_checks for k in ad.check_keys} == {
        dg.AssetCheckKey(k, name) for k in flow_keys for name in (JOB_RUNNING, KAFKA_LAG)
    }

    freshness = [
        ops.pop("loom_sink_freshness" if n == 1 else f"loom_sink_freshness_{n}") for n in range(1, 7)
    ]
    assert not ops
    assert [len(ad.check_keys) for ad in freshness] == [CHECKS_PER_OP] * 6
    assert all(not ad.node_keys_by_input_name for ad in freshness)
    assert {k.name for ad in freshness for k in ad.check_keys} == {SINK_FRESHNESS}
    assert {k.asset_key.path[0] for ad in freshness for k in ad.check_keys} == {"delta", "clickhouse", "sql"}
    assert len(graph.asset_check_keys) == 6 * COUNT


def test_cached_records_equal_a_fresh_compile(generated: tuple[Path, list[LoomFlowSpec]]) -> None:
    """After the load above filled the cache, every flow comes from it, with the same records."""
    directory, specs = generated
    cache = CompileCache(directory / "compile-cache")
    compile_specs(specs, cache=cache)  # fills the cache if this test runs alone
    cached = compile_specs(specs, cache=cache)
    assert all(c.from_cache for c in cached)
    for spec, hit in list(zip(specs, cached, strict=True))[::40]:
        fresh = compile_spec(spec)
        assert hit.flow == fresh.flow
        assert hit.plan.name == fresh.plan.name  # the plan itself compiles on first use


def test_cache_notices_config_env_and_flow_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sinks_env: pytest.MonkeyPatch
) -> None:
    cache = CompileCache(tmp_path / "cache")
    specs = write_flows(tmp_path / "flows", 2)
    first = compile_specs(specs, cache=cache)
    assert not any(c.from_cache for c in first)
    assert all(c.from_cache for c in compile_specs(specs, cache=cache))

    # a config edit: a miss, and the new table shows up
    base = tmp_path / "flows" / "config" / "gen_0000" / "base.yaml"
    base.write_text(base.read_text().replace("table: gen_0000_rows\n", "table: gen_0000_renamed\n"))
    edited = compile_specs(specs, cache=cache)
    assert [c.from_cache for c in edited] == [False, True]
    assert "gen_0000_renamed" in {s.table for s in edited[0].flow.storage_sinks}

    # a variable the config reads: a miss (even though these records do not change)
    monkeypatch.setenv("LOOM_KAFKA_BOOTSTRAP", "10.0.0.1:9092")
    assert not any(c.from_cache for c in compile_specs(specs, cache=cache))

    # the same import path and config, but a flow built differently (LOOM_TEST_SINKS): a miss
    cfg = shapes_config(tmp_path / "shapes")
    shapes = [LoomFlowSpec("tests.flows.shapes:make_flow", config=cfg, environment="test")]
    with_topic = compile_specs(shapes, cache=cache)[0]
    sinks_env.setenv("LOOM_TEST_SINKS", "delta")
    delta_only = compile_specs(shapes, cache=cache)[0]
    assert not delta_only.from_cache
    assert {s.slot for s in delta_only.flow.storage_sinks} == {"events_delta"}
    assert {s.slot for s in with_topic.flow.storage_sinks} == {"events_delta", "events_ch"}


def test_uncacheable_configs_always_compile(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    """A config with ``includes`` (files outside the key) is never served from the cache."""
    cfg = shapes_config(tmp_path / "cfg")
    text = (cfg / "base.yaml").read_text()
    (cfg / "kafka.yaml").write_text(text[: text.index("streaming:")])
    (cfg / "base.yaml").write_text("includes: [kafka.yaml]\n" + text[text.index("streaming:") :])
    cache = CompileCache(tmp_path / "cache")
    spec = LoomFlowSpec("tests.flows.shapes:make_flow", config=cfg, environment="test")
    compile_specs([spec], cache=cache)
    assert not compile_specs([spec], cache=cache)[0].from_cache


def test_config_cache_is_keyed_on_bytes(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    clear_config_cache()
    cfg = shapes_config(tmp_path / "cfg")
    first = load_config([cfg], "test")
    assert load_config([cfg], "test") is first  # flows sharing a config directory parse it once
    (cfg / "base.yaml").write_text((cfg / "base.yaml").read_text().replace("table: events}", "table: other}"))
    edited = load_config([cfg], "test")
    assert edited is not first and edited.raw("streaming.sinks.events_sql.table") == "other"
    sinks_env.setenv("LOOM__STREAMING__RUNTIME__EPOCH_INTERVAL_MS", "250")
    overridden = load_config([cfg], "test")
    assert overridden is not edited and overridden.raw("streaming.runtime.epoch_interval_ms") == 250


def test_shared_config_compiles_unchanged(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    """Compiling with a config another flow already compiled with gives the same plan hash."""
    cfg = shapes_config(tmp_path / "cfg")
    spec = LoomFlowSpec("tests.flows.shapes:make_flow", config=cfg, environment="test")
    clear_config_cache()
    once = compile_spec(spec).flow
    twice = compile_spec(spec).flow
    clear_config_cache()
    fresh = compile_spec(spec).flow
    assert once == twice == fresh


def test_fingerprints_and_class_sources(generated: tuple[Path, list[LoomFlowSpec]]) -> None:
    _, specs = generated
    flows = [s.load_flow() for s in specs[:8]]
    assert len({flow_fingerprint(f) for f in flows}) == len(flows)
    assert flow_fingerprint(flows[0]) == flow_fingerprint(specs[0].load_flow())
    module = sys.modules[specs[0].import_path.split(":")[0]]
    classes = [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__]
    assert len(classes) >= 3
    for cls in classes:
        assert class_source(cls) == inspect.getsource(cls)


def test_shared_config_layout_loads_the_config_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flows sharing one config directory (a section per flow) parse and hash it once per process."""
    import loom.core.config.overrides as overrides

    import loom_dagster.core.flows.catalog as catalog

    calls = {"load": 0, "hash": 0}
    load, digest = overrides.load_application_config, catalog.config_hash

    def counted_load(*args: object, **kwargs: object) -> object:
        calls["load"] += 1
        return load(*args, **kwargs)  # type: ignore[arg-type]

    def counted_hash(config: object) -> str:
        calls["hash"] += 1
        return digest(config)

    monkeypatch.setattr(overrides, "load_application_config", counted_load)
    monkeypatch.setattr(catalog, "config_hash", counted_hash)
    monkeypatch.setenv("LOOM_DAGSTER_COMPILE_CACHE", "off")
    clear_config_cache()
    specs = write_flows(tmp_path / "flows", 8, layout="shared")
    assert len({s.config_sources for s in specs}) == 1
    defs = build_loom_defs(specs)
    dg.Definitions.validate_loadable(defs)
    expected = plain_graph(8)
    assert {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()} == set(
        expected.all_keys
    )
    assert asset_edges(defs) == expected.edges
    assert calls == {"load": 1, "hash": 1}
