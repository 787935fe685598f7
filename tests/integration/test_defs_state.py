"""State-backed definitions: a load with a fresh defs state imports no flow and compiles nothing; a stale
state is refreshed at load (or, with ``refresh="never"``, loaded and reported); credentials never reach
the state; the sensors resolve them on first use; a deploy still compiles and checks lineage for real."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from bench.generated_flows import plain_graph, write_flows
from loom_dagster import DefsState, LoomDeployResource, LoomFlowSpec, build_loom_defs
from loom_dagster.cli.main import main as cli_main
from loom_dagster.core.flows.defs_state import STALE_METADATA_KEY
from loom_dagster.core.sensor_settings import KafkaLagSettings
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.sensors.lag import build_kafka_lag_sensor
from tests.conftest import make_topics, shapes_config, ticks_config

ROOT = Path(__file__).resolve().parents[2]
SECRET = "Sup3rS3cret-pw"
_LOAD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import loom.core.config.overrides as overrides
    import loom.streaming.compiler as compiler
    calls = {"compile_flow": 0, "config_loads": 0}
    compile_flow, load_config = compiler.compile_flow, overrides.load_application_config
    def counted_compile(*args, **kwargs):
        calls["compile_flow"] += 1
        return compile_flow(*args, **kwargs)
    def counted_load(*args, **kwargs):
        calls["config_loads"] += 1
        return load_config(*args, **kwargs)
    compiler.compile_flow, overrides.load_application_config = counted_compile, counted_load
    import dagster as dg
    from bench.generated_flows import default_package, load_specs
    from loom_dagster import build_loom_defs
    directory = Path(sys.argv[1])
    defs = build_loom_defs(load_specs(directory, int(sys.argv[2])))
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    package = default_package(directory) + "."
    print(json.dumps({
        **calls,
        "flows_imported": sum(1 for m in sys.modules if m.startswith(package)),
        "keys": sorted(k.to_user_string() for k in graph.get_all_asset_keys()),
        "sensors": sorted(s.name for s in defs.sensors or []),
    }))
    """
)


def _load_in_subprocess(directory: Path, count: int, state: Path, **env: str) -> dict[str, object]:
    environ = {
        **os.environ,
        "LOOM_DAGSTER_DEFS_STATE": str(state),
        "LOOM_DAGSTER_COMPILE_CACHE": "off",
        **env,
    }
    environ.pop("LOOM_ENV", None)
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, str(directory), str(count)],
        capture_output=True, text=True, env=environ, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_load_with_a_fresh_state_imports_no_flow_and_compiles_nothing(tmp_path: Path) -> None:
    write_flows(tmp_path / "flows", 4, add_to_path=False)
    state = tmp_path / "state"
    url = f"http://default:{SECRET}@127.0.0.1:8123"
    cold = _load_in_subprocess(tmp_path / "flows", 4, state, LOOM_CLICKHOUSE_URL=url)
    assert cold["compile_flow"] == 4 and cold["flows_imported"] == 4  # the automatic refresh
    warm = _load_in_subprocess(tmp_path / "flows", 4, state, LOOM_CLICKHOUSE_URL=url)
    assert warm["compile_flow"] == 0 and warm["config_loads"] == 0 and warm["flows_imported"] == 0
    assert warm["keys"] == cold["keys"] == sorted(plain_graph(4).all_keys)
    assert warm["sensors"] == cold["sensors"] == ["loom_job_health", "loom_kafka_lag", "loom_sink_health"]

    entries = list(state.glob("*.json"))
    assert len(entries) == 4
    for entry in entries:
        text = entry.read_text()
        assert SECRET not in text and "http://default:***@127.0.0.1:8123" in text  # redacted URL only
    # another value of a variable the config reads: the state is stale and refreshed at load
    changed = _load_in_subprocess(tmp_path / "flows", 4, state, LOOM_CLICKHOUSE_URL=url + "/other")
    assert changed["compile_flow"] == 4


def _spec(cfg: Path) -> LoomFlowSpec:
    return LoomFlowSpec("tests.flows.shapes:make_flow", config=cfg, environment="test")


def test_a_config_edited_after_the_refresh_is_refreshed_at_load(
    tmp_path: Path, sinks_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = shapes_config(tmp_path / "cfg")
    state = DefsState(tmp_path / "state")
    first = state.load([_spec(cfg)])
    assert [f.status for f in first.flows] == ["refreshed"] and first.flows[0].reason == "no state yet"
    second = state.load([_spec(cfg)])
    assert [f.status for f in second.flows] == ["fresh"] and second.compiled[0].from_cache
    assert second.compiled[0].flow == first.compiled[0].flow

    time.sleep(0.01)
    shapes_config(cfg, delta_uri=str(tmp_path / "elsewhere"))
    with caplog.at_level(logging.WARNING, logger="loom_dagster.core.flows.defs_state"):
        third = state.load([_spec(cfg)])
    (flow,) = third.flows
    assert flow.status == "refreshed" and str(cfg / "base.yaml") in (flow.reason or "")
    assert "changed after the refresh" in (flow.reason or "")
    assert any(
        "defs state was stale" in r.getMessage() and "'events'" in r.getMessage() for r in caplog.records
    )
    (sink,) = [s for s in third.compiled[0].flow.storage_sinks if s.slot == "events_delta"]
    assert sink.uri == str(tmp_path / "elsewhere")
    assert [f.status for f in state.load([_spec(cfg)]).flows] == ["fresh"]

    # a new environment overlay in the config directory makes it stale too
    (cfg / "test.yaml").write_text("streaming: {}\n")
    assert "other YAML files" in (state.load([_spec(cfg)]).flows[0].reason or "")


def test_a_stale_state_loaded_as_it_is_is_reported_and_the_deploy_checks_the_fresh_plan(
    tmp_path: Path, sinks_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = shapes_config(tmp_path / "cfg")
    DefsState(tmp_path / "state").load([_spec(cfg)])
    key = dg.AssetKey(["loom", "events"])
    fresh = build_loom_defs([_spec(cfg)], state=DefsState(tmp_path / "state", refresh="never"))
    assert STALE_METADATA_KEY not in fresh.resolve_assets_def(key).specs_by_key[key].metadata

    shapes_config(cfg, delta_uri=str(tmp_path / "elsewhere"))
    with caplog.at_level(logging.WARNING, logger="loom_dagster.core.flows.defs_state"):
        stale = build_loom_defs([_spec(cfg)], state=DefsState(tmp_path / "state", refresh="never"))
    (warning,) = [r.getMessage() for r in caplog.records if "are stale" in r.getMessage()]
    assert "'events'" in warning and "base.yaml changed after the refresh" in warning
    note = stale.resolve_assets_def(key).specs_by_key[key].metadata[STALE_METADATA_KEY]
    assert str(note.value).startswith("stale: ") and "loom-dagster refresh" in str(note.value)

    with dg.instance_for_test() as instance:
        from_fresh_load = dg.materialize(
            list(fresh.assets or []), selection=[key], instance=instance, raise_on_error=False,
            resources={"loom": LoomDeployResource(mode="validate", state_dir=str(tmp_path / "deploy"))},
        )  # fmt: skip
        from_stale_load = dg.materialize(
            list(stale.assets or []), selection=[key], instance=instance, raise_on_error=False,
            resources={"loom": LoomDeployResource(mode="validate", state_dir=str(tmp_path / "deploy"))},
        )  # fmt: skip
    # the load from the fresh state declared the old lineage: the run compiles the edited config anew
    for result in (from_fresh_load, from_stale_load):
        assert not result.success
        (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        message = failure.event_specific_data.error.message  # type: ignore[union-attr]
        assert "lineage check failed for flow 'events'" in message
        assert f"resolves it to delta:{tmp_path / 'elsewhere'}" in message


def test_refresh_command_writes_the_state_a_load_then_uses(
    tmp_path: Path, sinks_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = shapes_config(tmp_path / "cfg")
    location = tmp_path / "location.py"
    location.write_text(
        "from loom_dagster import DefsState, LoomFlowSpec, build_loom_defs\n"
        f"defs = build_loom_defs([LoomFlowSpec('tests.flows.shapes:make_flow', config={str(cfg)!r}, "
        f"environment='test')], state=DefsState({str(tmp_path / 'state')!r}, refresh='never'))\n"
    )
    assert cli_main(["refresh", "-f", str(location)]) == 0
    out = capsys.readouterr().out
    assert "refreshed events" in out and "1 flow(s): 0 from the state, 1 refreshed, 0 stale" in out
    load = DefsState(tmp_path / "state", refresh="never").load([_spec(cfg)])
    assert [f.status for f in load.flows] == ["fresh"]

    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    assert cli_main(["refresh", "-f", str(empty)]) == 2
    assert "built no state-backed loom definitions" in capsys.readouterr().err


@pytest.mark.kafka
def test_lag_sensor_after_a_state_backed_load_resolves_its_cluster_on_first_tick(
    kafka: KafkaBroker, tmp_path: Path, topic_prefix: str
) -> None:
    bootstrap = kafka.bootstrap_servers
    (topic,) = make_topics(bootstrap, topic_prefix, ["ticks"], partitions=2)
    config = ticks_config(
        tmp_path / "config", brokers=bootstrap, prefix=topic_prefix, delta_uri=str(tmp_path / "d")
    )
    spec = LoomFlowSpec("tests.flows.delta_only:ticks_flow", config=config, environment="test")
    state = DefsState(tmp_path / "state")
    state.load([spec])  # the refresh
    defs = build_loom_defs([spec], state=state)
    (node_flow,) = [a for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)]
    assert node_flow.key == dg.AssetKey(["loom", "ticks"])

    producer = Producer({"bootstrap.servers": bootstrap})
    for p in range(2):
        for i in range(7):
            producer.produce(topic, value=b"x%d" % i, partition=p)
    assert producer.flush(30) == 0
    committer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic_prefix}-ticks"})
    try:  # the group has read 3 of 7 messages per partition: lag 8
        committer.commit(offsets=[TopicPartition(topic, p, 3) for p in range(2)], asynchronous=False)
    finally:
        committer.close()

    from loom_dagster.assets import build_loom_asset_graph

    graph = build_loom_asset_graph([spec], state=state)
    assert all(node.compiled.from_cache and node.compiled._plan is None for node in graph.flows)
    sensor = build_kafka_lag_sensor(
        graph, KafkaLagSettings(request_timeout_s=5.0), read_deployments=False,
        default_status=dg.DefaultSensorStatus.STOPPED,
    )  # fmt: skip
    assert all(node.compiled._plan is None for node in graph.flows)  # building it compiled nothing
    deadline = time.monotonic() + 20
    with dg.instance_for_test() as instance:
        while True:
            data = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
            (event,) = data.asset_events
            if event.metadata["total_lag"].value == 8 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    assert event.metadata["total_lag"].value == 8, event.description
    assert event.metadata["consumer_group"].value == f"{topic_prefix}-ticks"
    assert all(node.compiled._plan is not None for node in graph.flows)  # compiled on the first tick


def test_a_load_hashes_configs_with_the_deploys_key_and_another_installations_state_is_stale(
    tmp_path: Path, sinks_env: pytest.MonkeyPatch
) -> None:
    """The config hash is keyed per installation: the records a load takes from the defs state carry the
    hash a deploy computes (the redeploy schedule compares them), and a state (or compile cache entry)
    written under another installation's key is refreshed, never taken with a hash nobody here makes."""
    from loom_dagster.core.deploy.store import HASH_KEY_VARIABLE
    from loom_dagster.core.flows.catalog import compile_spec

    cfg = shapes_config(tmp_path / "cfg")
    sinks_env.delenv(HASH_KEY_VARIABLE, raising=False)
    sinks_env.setenv("LOOM_DAGSTER_COMPILE_CACHE", str(tmp_path / "cache"))
    sinks_env.setenv("LOOM_DAGSTER_STATE_DIR", str(tmp_path / "installation-a"))
    state = DefsState(tmp_path / "state")
    written = state.load([_spec(cfg)])
    loaded = state.load([_spec(cfg)])
    assert [f.status for f in loaded.flows] == ["fresh"]
    deployed = compile_spec(_spec(cfg)).flow  # what a deploy compiles and records
    assert loaded.compiled[0].flow.config_hash == written.compiled[0].flow.config_hash == deployed.config_hash

    sinks_env.setenv("LOOM_DAGSTER_STATE_DIR", str(tmp_path / "installation-b"))
    elsewhere = state.load([_spec(cfg)])
    (flow,) = elsewhere.flows
    assert flow.status == "refreshed" and "another installation's key" in (flow.reason or "")
    here = compile_spec(_spec(cfg)).flow
    assert elsewhere.compiled[0].flow.config_hash == here.config_hash != deployed.config_hash
    assert elsewhere.compiled[0].flow.plan_hash == deployed.plan_hash
    never = DefsState(tmp_path / "state", refresh="never")
    assert [f.status for f in never.load([_spec(cfg)]).flows] == ["fresh"]  # rewritten under key b
