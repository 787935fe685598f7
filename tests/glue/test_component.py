"""``LoomFlowsComponent``: a defs.yaml builds the same asset graph as ``build_loom_defs``; its errors name
the field, the defs.yaml and the line; relative config paths resolve against the defs.yaml directory."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import re
import shutil
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster.components.resolved.errors import ResolutionException
from dagster.components.testing import create_defs_folder_sandbox

import loom_dagster.components.loom_flows.component as component_module
from loom_dagster import FlowLoadError, LoomDeployResource, LoomFlowSpec, build_loom_defs
from loom_dagster.components.loom_flows.component import (
    DeployResourceModel,
    JobHealthModel,
    KafkaLagModel,
    LoomFlowModel,
    LoomFlowsComponent,
    PrefixedLoomTranslator,
    SensorsModel,
    SinkFreshnessModel,
    SinkHealthModel,
)
from loom_dagster.components.loom_flows.models import SettingsModel, settings_model
from loom_dagster.core.sensor_settings import (
    JobHealthSettings,
    KafkaLagSettings,
    LoomSensorSettings,
    SinkFreshness,
    SinkHealthSettings,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "definitions" / "config"
COMPONENT_TYPE = "loom_dagster.LoomFlowsComponent"
# Metadata Dagster itself adds to every asset a YAML component builds (a link to the defs.yaml).
COMPONENT_METADATA = {"dagster/code_references", "dagster/component_origin"}

EXAMPLE_FLOWS_YAML = f"""
flows:
  - import_path: definitions.flows.orders:orders_flow
    config: {CONFIG / "orders"}
    environment: development
    group_name: orders
    owners: ["team:data-platform"]
    tags: {{domain: orders}}
  - import_path: definitions.flows.payments:ledger_flow
    config: {CONFIG / "ledger"}
    environment: development
    group_name: ledger
    owners: ["team:finance"]
"""


def example_specs() -> list[LoomFlowSpec]:
    """The Python equivalent of EXAMPLE_FLOWS_YAML (as in definitions/definitions.py)."""
    return [
        LoomFlowSpec(
            "definitions.flows.orders:orders_flow",
            config=CONFIG / "orders",
            environment="development",
            group_name="orders",
            owners=["team:data-platform"],
            tags={"domain": "orders"},
        ),
        LoomFlowSpec(
            "definitions.flows.payments:ledger_flow",
            config=CONFIG / "ledger",
            environment="development",
            group_name="ledger",
            owners=["team:finance"],
        ),
    ]


@contextmanager
def yaml_component(attributes: str, *, copy_config: bool = False) -> Iterator[tuple[Path, Any]]:
    """Write ``defs/loom_flows/defs.yaml`` in a fresh components project; yield its directory and the
    sandbox (``sandbox.build_all_defs()`` loads the project, so errors raise where the test wants them)."""
    with create_defs_folder_sandbox() as sandbox:
        component_dir = sandbox.defs_folder_path / "loom_flows"
        component_dir.mkdir()
        if copy_config:
            shutil.copytree(CONFIG / "orders", component_dir / "conf" / "orders")
        body = textwrap.indent(textwrap.dedent(attributes).strip(), "  ")
        (component_dir / "defs.yaml").write_text(f"type: {COMPONENT_TYPE}\nattributes:\n{body}\n")
        yield component_dir, sandbox


def load_error(attributes: str) -> tuple[Path, str]:
    """Load a broken defs.yaml; return its path and the text of the whole exception chain."""
    with yaml_component(attributes) as (component_dir, sandbox):
        with pytest.raises(Exception) as info:
            with sandbox.build_all_defs():
                pass
        return component_dir / "defs.yaml", chain_text(info.value)


def chain_text(exc: BaseException | None) -> str:
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def graph_summary(
    defs: dg.Definitions, prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], dict[str, Any]]:
    """Per asset key (``prefix`` stripped): upstream keys, kinds, group, materializable, metadata keys."""

    def strip(key: dg.AssetKey) -> tuple[str, ...]:
        path = tuple(key.path)
        assert path[: len(prefix)] == prefix, f"{key.to_user_string()} lacks prefix {prefix}"
        return path[len(prefix) :]

    graph = defs.resolve_asset_graph()
    summary = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        summary[strip(key)] = {
            "deps": sorted(strip(parent) for parent in node.parent_keys),
            "kinds": sorted(node.kinds),
            "group": node.group_name,
            "materializable": node.is_materializable,
            "metadata": sorted(set(node.metadata) - COMPONENT_METADATA),
            "owners": sorted(node.owners),
            "code_version": node.code_version,
        }
    return summary


def assert_loadable_side_by_side(first: dg.Definitions, second: dg.Definitions) -> None:
    """No asset key of one is an asset key of the other, and their assets form one valid graph."""
    first_keys = first.resolve_asset_graph().get_all_asset_keys()
    second_keys = second.resolve_asset_graph().get_all_asset_keys()
    assert first_keys.isdisjoint(second_keys)
    together = dg.Definitions(
        assets=[*(first.assets or []), *(second.assets or [])], resources={"loom": LoomDeployResource()}
    )
    assert together.resolve_asset_graph().get_all_asset_keys() == first_keys | second_keys


@pytest.fixture(scope="module")
def python_defs() -> dg.Definitions:
    return build_loom_defs(example_specs())


def test_yaml_component_builds_the_same_graph_as_build_loom_defs(python_defs: dg.Definitions) -> None:
    with yaml_component(EXAMPLE_FLOWS_YAML) as (_, sandbox), sandbox.build_all_defs() as defs:
        yaml_summary = graph_summary(defs)
        assert yaml_summary == graph_summary(python_defs)
        assert ("loom", "orders_enrichment") in yaml_summary
        assert yaml_summary[("loom", "order_ledger")]["deps"] == [("kafka", "orders.enriched")]
        assert isinstance(defs.resources["loom"], LoomDeployResource)
        assert [job.name for job in defs.jobs or []] == [job.name for job in python_defs.jobs or []]


def test_build_defs_is_exactly_build_loom_defs(python_defs: dg.Definitions) -> None:
    component = LoomFlowsComponent.from_attributes_dict(
        attributes={
            "flows": [
                {
                    "import_path": spec.import_path,
                    "config": str(spec.config),
                    "environment": spec.environment,
                    "group_name": spec.group_name,
                    "owners": list(spec.owners),
                    "tags": dict(spec.tags),
                }
                for spec in example_specs()
            ]
        }
    )
    assert component.build_loom_defs_kwargs() == {"translator": None, "resource": None}
    defs = component.build_defs(dg.ComponentTree.for_test().load_context)
    graph, expected = defs.resolve_asset_graph(), python_defs.resolve_asset_graph()
    assert graph.get_all_asset_keys() == expected.get_all_asset_keys()
    for key in expected.get_all_asset_keys():
        assert graph.get(key).metadata.keys() == expected.get(key).metadata.keys(), key
        assert graph.get(key).description == expected.get(key).description, key
        assert graph.get(key).tags == expected.get(key).tags, key


def test_key_prefix_prefixes_every_loom_asset(python_defs: dg.Definitions) -> None:
    attributes = EXAMPLE_FLOWS_YAML + "key_prefix: [yaml, streaming]\n"
    with yaml_component(attributes) as (_, sandbox), sandbox.build_all_defs() as defs:
        assert graph_summary(defs, prefix=("yaml", "streaming")) == graph_summary(python_defs)
        # The prefixed keys sit next to the unprefixed ones without clashing.
        assert_loadable_side_by_side(python_defs, defs)


def test_group_name_overrides_every_group() -> None:
    with (
        yaml_component(EXAMPLE_FLOWS_YAML + "group_name: streaming\n") as (_, sandbox),
        sandbox.build_all_defs() as defs,
    ):
        groups = {node["group"] for node in graph_summary(defs).values()}
        assert groups == {"streaming"}


def test_prefixed_translator_keeps_everything_but_the_key(python_defs: dg.Definitions) -> None:
    prefixed = build_loom_defs(example_specs(), translator=PrefixedLoomTranslator(["p"]))
    assert graph_summary(prefixed, prefix=("p",)) == graph_summary(python_defs)


def test_relative_config_paths_resolve_against_the_defs_yaml_directory() -> None:
    attributes = """
    flows:
      - import_path: definitions.flows.orders:orders_flow
        config: conf/orders
        environment: "{{ env('LOOM_COMPONENT_TEST_ENV', 'development') }}"
      - import_path: definitions.flows.payments:ledger_flow
        config: [../loom_flows/conf/orders/base.yaml, ./conf/orders/development.yaml]
        environment: development
    """
    # The ledger flow with the orders config is nonsense for loom, so only check the specs for it.
    with (
        yaml_component(attributes, copy_config=True) as (component_dir, sandbox),
        sandbox.build_component_tree() as tree,
    ):
        component = tree.load_component(component_dir)
        assert isinstance(component, LoomFlowsComponent)
        orders, ledger = component.flow_specs(component_dir)
        assert orders.config == str(component_dir.resolve() / "conf" / "orders")
        assert orders.environment == "development"
        assert ledger.config == [
            str(component_dir.resolve() / "conf" / "orders" / "base.yaml"),
            str(component_dir.resolve() / "conf" / "orders" / "development.yaml"),
        ]
        assert not (Path.cwd() / "conf").exists()  # so it was not resolved against the working directory

    one_flow = "\n".join(attributes.splitlines()[:5])
    with yaml_component(one_flow, copy_config=True) as (_, sandbox), sandbox.build_all_defs() as defs:
        spec = defs.resolve_asset_graph().get(dg.AssetKey(["loom", "orders_enrichment"]))
        assert spec.metadata["loom/environment"] == "development"


def test_missing_relative_config_names_the_resolved_path_and_the_defs_yaml() -> None:
    defs_yaml, text = load_error(
        """
        flows:
          - import_path: definitions.flows.orders:orders_flow
            config: no/such/dir
        """
    )
    assert "FlowLoadError" in text
    assert f"{defs_yaml}: [definitions.flows.orders:orders_flow]" in text
    assert str(defs_yaml.parent.resolve() / "no" / "such" / "dir") in text


def test_unknown_field_is_named_with_its_line() -> None:
    defs_yaml, text = load_error(EXAMPLE_FLOWS_YAML + "key_prefx: [yaml]\n")
    assert f"attributes.key_prefx at {defs_yaml}:15" in text
    assert "Extra inputs are not permitted" in text


def test_unknown_nested_field_is_named_with_its_own_line() -> None:
    defs_yaml, text = load_error(
        EXAMPLE_FLOWS_YAML.replace("    group_name: ledger", "    grup_name: ledger")
    )
    assert f"attributes.flows.1.grup_name at {defs_yaml}:13" in text
    assert "valid string" not in text  # no misleading "could also be a template string" error


def test_missing_import_path_is_named() -> None:
    defs_yaml, text = load_error(
        """
        flows:
          - config: conf/orders
        """
    )
    assert f"attributes.flows.0.import_path at {defs_yaml}:4" in text
    assert "Field required" in text


@pytest.mark.parametrize(
    ("attributes", "location", "line", "message"),
    [
        (
            EXAMPLE_FLOWS_YAML + "deploy: {mode: run}\n",
            "attributes.deploy.mode",
            15,
            "'deploy' or 'validate'",
        ),
        (
            EXAMPLE_FLOWS_YAML.replace("group_name: orders", "group_name: orders\n    processes: two"),
            "attributes.flows.0.processes",
            8,
            "valid integer",
        ),
        (
            EXAMPLE_FLOWS_YAML.replace(
                "group_name: orders", "group_name: orders\n    workers_per_process: 0"
            ),
            "attributes.flows.0.workers_per_process",
            8,
            "must be greater than 0",
        ),
        (
            EXAMPLE_FLOWS_YAML + "sensors:\n  kafka_lag:\n    warn_lag: lots\n",
            "attributes.sensors.kafka_lag.warn_lag",
            17,
            "valid integer",
        ),
        (
            EXAMPLE_FLOWS_YAML + "redeploy_skip_unchanged: maybe\n",
            "attributes.redeploy_skip_unchanged",
            15,
            "bool",
        ),
        ("flows: []\n", "attributes.flows", 3, "at least one flow"),
    ],
)
def test_wrong_type_is_named_with_file_line_and_value(
    attributes: str, location: str, line: int, message: str
) -> None:
    defs_yaml, text = load_error(attributes)
    assert f"{defs_yaml}:{line} - {location}: " in text
    assert message in text


def test_bad_import_path_is_a_flow_load_error_naming_the_flow_and_defs_yaml() -> None:
    defs_yaml, text = load_error(
        EXAMPLE_FLOWS_YAML.replace(
            "definitions.flows.payments:ledger_flow", "definitions.flows.payments:ledger_flw"
        )
    )
    assert f"FlowLoadError: {defs_yaml}: [definitions.flows.payments:ledger_flw]" in text
    assert "has no attribute 'ledger_flw'" in text


def test_bad_import_path_keeps_the_flow_load_error_type() -> None:
    component = LoomFlowsComponent.from_attributes_dict(
        attributes={
            "flows": [{"import_path": "definitions.flows.nope:flow", "config": str(CONFIG / "orders")}]
        }
    )
    with pytest.raises(FlowLoadError, match=r"\[definitions\.flows\.nope:flow\] cannot import module"):
        component.build_defs(dg.ComponentTree.for_test().load_context)


def test_settings_models_default_to_the_dataclass_defaults() -> None:
    assert JobHealthModel().to_settings() == JobHealthSettings()
    assert KafkaLagModel().to_settings() == KafkaLagSettings()
    assert SinkFreshnessModel().to_settings() == SinkFreshness()
    assert SinkHealthModel().to_settings() == SinkHealthSettings()
    assert SensorsModel().to_settings() == LoomSensorSettings()
    assert DeployResourceModel().to_resource() == LoomDeployResource()
    resource_fields = set(LoomDeployResource.model_fields)
    assert set(DeployResourceModel.model_fields) == resource_fields


def test_sensor_redeploy_and_deploy_settings_map_to_build_loom_defs_kwargs() -> None:
    component = LoomFlowsComponent.from_attributes_dict(
        attributes={
            "flows": [{"import_path": "definitions.flows.orders:orders_flow", "config": "x"}],
            "redeploy_cron": "0 3 * * *",
            "redeploy_flows": ["orders_enrichment"],
            "redeploy_skip_unchanged": False,
            "sensors": {
                "default_status_running": False,
                "job_health": {"interval_s": 5, "restart": False},
                "kafka_lag": {"enabled": False},
                "sink_health": {
                    "default_freshness": {"warn_after_s": 10},
                    "freshness": {"yaml/delta/orders_enriched": {"fail_after_s": 99}},
                    "sql_timestamp_columns": {"yaml/sql/warehouse/order_ledger": "updated_at"},
                },
            },
            "deploy": {"mode": "validate", "state_dir": "/tmp/loom-state", "health_timeout_s": 5},
        }
    )
    kwargs = component.build_loom_defs_kwargs()
    assert kwargs["sensors"] == LoomSensorSettings(
        job_health=JobHealthSettings(interval_s=5, restart=False),
        kafka_lag=KafkaLagSettings(enabled=False),
        sink_health=SinkHealthSettings(
            default_freshness=SinkFreshness(warn_after_s=10),
            freshness={"yaml/delta/orders_enriched": SinkFreshness(fail_after_s=99)},
            sql_timestamp_columns={"yaml/sql/warehouse/order_ledger": "updated_at"},
        ),
        default_status_running=False,
    )
    assert kwargs["resource"] == LoomDeployResource(
        mode="validate", state_dir="/tmp/loom-state", health_timeout_s=5
    )
    assert kwargs["redeploy_cron"] == "0 3 * * *"
    assert kwargs["redeploy_flows"] == ["orders_enrichment"]
    assert kwargs["redeploy_skip_unchanged"] is False
    assert kwargs["translator"] is None


def test_deploy_settings_reach_the_resource() -> None:
    with yaml_component(EXAMPLE_FLOWS_YAML + "deploy: {mode: validate, drain_timeout_s: 3}\n") as (
        _,
        sandbox,
    ):
        with sandbox.build_all_defs() as defs:
            resource = defs.resources["loom"]
            assert isinstance(resource, LoomDeployResource)
            assert (resource.mode, resource.drain_timeout_s, resource.preflight) == ("validate", 3.0, True)


def test_deploy_yaml_selects_and_configures_the_kubernetes_launcher() -> None:
    deploy = (
        "deploy:\n  launcher: kubernetes\n  drain_timeout_s: 12\n  launcher_config:\n    namespace: streaming\n"
        "    pod: {image: 'registry.example/flows:2', env_from_secrets: [kafka-credentials]}\n"
    )
    with yaml_component(EXAMPLE_FLOWS_YAML + deploy) as (_, sandbox):
        with sandbox.build_all_defs() as defs:
            launcher = defs.resources["loom"].build_launcher()
    assert launcher.name == "kubernetes"
    settings = launcher.settings  # type: ignore[attr-defined]
    assert (settings.namespace, settings.drain_timeout_s) == ("streaming", 12.0)
    assert settings.pod_for("orders").env_from_secrets == ("kafka-credentials",)


@pytest.mark.skipif(
    "sensors" not in inspect.signature(build_loom_defs).parameters,
    reason="build_loom_defs does not take sensors / redeploy settings yet",
)
def test_sensors_checks_and_schedule_match_the_python_call() -> None:
    settings = LoomSensorSettings(kafka_lag=KafkaLagSettings(warn_lag=5), default_status_running=False)
    python = build_loom_defs(
        example_specs(), sensors=settings, redeploy_cron="0 3 * * *", redeploy_flows=["order_ledger"]
    )
    attributes = EXAMPLE_FLOWS_YAML + (
        "redeploy_cron: '0 3 * * *'\nredeploy_flows: [order_ledger]\n"
        "sensors: {default_status_running: false, kafka_lag: {warn_lag: 5}}\n"
    )
    with yaml_component(attributes) as (_, sandbox), sandbox.build_all_defs() as defs:

        def names(d: dg.Definitions) -> tuple[list[str], list[str], list[str]]:
            sensors = sorted(s.name for s in d.sensors or [])
            schedules = sorted(s.name for s in d.schedules or [])
            checks = sorted(str(k) for k in d.resolve_asset_graph().asset_check_keys)
            return sensors, schedules, checks

        assert names(defs) == names(python)
        assert names(defs)[1] == ["loom_redeploy"]


def test_example_yaml_location_is_the_python_location_under_yaml() -> None:
    from definitions.definitions import defs as python_location
    from definitions.yaml_location.definitions import defs as yaml_location

    python_summary = graph_summary(python_location)
    loom_only = {
        key: node
        for key, node in python_summary.items()
        if key not in {("orders_by_band",), ("revenue_by_customer",)}
    }
    assert graph_summary(yaml_location, prefix=("yaml",)) == loom_only
    assert_loadable_side_by_side(python_location, yaml_location)


def test_component_is_registered_for_dg_discovery() -> None:
    from dagster.components.core.package_entry import discover_entry_point_package_objects

    entry_points = importlib.metadata.entry_points(group="dagster_dg_cli.registry_modules")
    assert ("loom_dagster", "loom_dagster") in {(ep.name, ep.value) for ep in entry_points}
    discovered = {key.to_typename(): obj for key, obj in discover_entry_point_package_objects().items()}
    assert discovered[COMPONENT_TYPE] is LoomFlowsComponent
    schema = LoomFlowsComponent.get_model_cls().model_json_schema()
    assert {"flows", "key_prefix", "group_name", "sensors", "deploy", "redeploy_cron"} <= set(
        schema["properties"]
    )


def docstring_yaml_blocks(doc: str) -> list[str]:
    """The ``.. code-block:: yaml`` blocks of a docstring, dedented."""
    blocks = re.findall(r"\.\. code-block:: yaml\n\n((?:[ ]+.*\n|\n)+)", doc + "\n")
    return [textwrap.dedent(block) for block in blocks]


@pytest.mark.parametrize(
    "doc", [component_module.__doc__, LoomFlowsComponent.__doc__], ids=["module", "class"]
)
def test_docstring_examples_build_in_the_example_location(doc: str | None) -> None:
    (block,) = docstring_yaml_blocks(inspect.cleandoc(doc or ""))
    document = yaml.safe_load(block)
    assert document["type"] == COMPONENT_TYPE
    component = LoomFlowsComponent.from_attributes_dict(attributes=document["attributes"])
    base_dir = ROOT / "definitions" / "yaml_location" / "defs" / "loom_flows"
    defs = build_loom_defs(component.flow_specs(base_dir), **component.build_loom_defs_kwargs())
    prefix = tuple(component.key_prefix)
    assert (*prefix, "loom", "orders_enrichment") in {
        tuple(k.path) for k in defs.resolve_asset_graph().get_all_asset_keys()
    }


# --- models generated from the settings, the resource and LoomFlowSpec ---------------------------------

GENERATED = [
    (JobHealthModel, JobHealthSettings),
    (KafkaLagModel, KafkaLagSettings),
    (SinkFreshnessModel, SinkFreshness),
    (SinkHealthModel, SinkHealthSettings),
    (SensorsModel, LoomSensorSettings),
    (LoomFlowModel, LoomFlowSpec),
]


@pytest.mark.parametrize(("model", "source"), GENERATED, ids=[s.__name__ for _, s in GENERATED])
def test_yaml_model_has_every_field_and_default_of_its_dataclass(model: Any, source: type) -> None:
    fields = {field.name: field for field in dataclasses.fields(source)}
    assert set(model.model_fields) == set(fields)
    for name, field in fields.items():
        if field.default is not dataclasses.MISSING:
            assert model.model_fields[name].default == field.default, name
    assert model.source is source


def test_deploy_model_has_every_field_default_and_constraint_of_the_resource() -> None:
    for name, info in LoomDeployResource.model_fields.items():
        generated = DeployResourceModel.model_fields[name]
        assert (generated.default, generated.description) == (info.default, info.description), name
        assert generated.metadata == info.metadata, name  # e.g. log_max_bytes >= 1024
    assert set(DeployResourceModel.model_fields) == set(LoomDeployResource.model_fields)


def test_a_new_settings_field_is_a_yaml_key_with_no_second_edit() -> None:
    @dataclasses.dataclass(frozen=True)
    class GrownLagSettings(KafkaLagSettings):
        max_partitions: int = 64
        """Partitions sampled per flow."""

    model = settings_model(GrownLagSettings, name="GrownLagModel")
    schema = model.model().model_json_schema()["properties"]["max_partitions"]
    assert (schema["default"], schema["description"]) == (64, "Partitions sampled per flow.")
    resolved = model.resolve_from_yaml("max_partitions: 8\nwarn_lag: 5\n")
    assert resolved.to_value() == GrownLagSettings(max_partitions=8, warn_lag=5)
    with pytest.raises(ResolutionException, match=r"max_partitions: Input should be a valid integer"):
        model.resolve_from_yaml("max_partitions: lots\n")


def test_nested_settings_keep_unset_fields_at_their_dataclass_defaults() -> None:
    model = SensorsModel.resolve_from_yaml(
        "sink_health:\n  freshness:\n    delta/x: {fail_after_s: 5}\n  default_freshness: {warn_after_s: 7}\n"
    )
    assert isinstance(model, SettingsModel)
    assert model.to_settings() == LoomSensorSettings(
        sink_health=SinkHealthSettings(
            default_freshness=SinkFreshness(warn_after_s=7),
            freshness={"delta/x": SinkFreshness(fail_after_s=5)},
        )
    )


def test_schema_descriptions_come_from_the_sources() -> None:
    definitions = LoomFlowsComponent.get_model_cls().model_json_schema()["$defs"]

    def description(model: str, field: str) -> str:
        return definitions[f"{model}Model"]["properties"][field]["description"]

    assert description("JobHealthModel", "backoff_reset_after_s").startswith(
        "A restarted job must stay healthy"
    )
    assert (
        description("DeployResourceModel", "state_dir")
        == LoomDeployResource.model_fields["state_dir"].description
    )
    assert "LOOM_ENV" in description("LoomFlowModel", "environment")  # from LoomFlowSpec's Args
    assert "relative to the directory of this defs.yaml" in description("LoomFlowModel", "config")


# --- translation and post_processing --------------------------------------------------------------------

TRANSLATION_YAML = (
    EXAMPLE_FLOWS_YAML
    + """\
key_prefix: [yaml]
translation:
  key: "{{ 'streams/' ~ name if kind == 'topic' else spec.key.to_user_string() }}"
  group_name: "{{ 'kafka_topics' if kind == 'topic' else spec.group_name }}"
  kinds: "{{ ['loom'] if kind == 'flow' else spec.kinds }}"
  tags: {loom/kind: "{{ kind }}"}
  metadata: {loom/object: "{{ name }}", loom/flow_env: "{{ flow.environment if flow else 'none' }}"}
"""
)


def test_translation_overrides_key_group_kinds_tags_and_metadata_per_loom_object() -> None:
    with yaml_component(TRANSLATION_YAML) as (_, sandbox), sandbox.build_all_defs() as defs:
        graph = defs.resolve_asset_graph()
        nodes = {key.to_user_string(): graph.get(key) for key in graph.get_all_asset_keys()}

    topic, flow = nodes["streams/orders"], nodes["yaml/loom/orders_enrichment"]
    assert (topic.group_name, topic.kinds, topic.tags["loom/kind"]) == ("kafka_topics", {"kafka"}, "topic")
    assert (topic.metadata["loom/object"], topic.metadata["loom/flow_env"]) == ("orders", "none")
    assert topic.metadata["kafka/topic"] == "orders"  # merged, not replaced
    assert (flow.group_name, flow.kinds, flow.tags["loom/kind"]) == ("orders", {"loom"}, "flow")
    assert flow.tags["domain"] == "orders" and flow.metadata["loom/flow_env"] == "development"
    table = nodes["yaml/delta/orders_enriched"]
    assert (table.tags["loom/kind"], table.metadata["loom/object"]) == ("table", "orders_enriched")
    assert "streams/orders.dlq" in nodes and not any(key.startswith("yaml/kafka/") for key in nodes)
    # Edges follow the translated keys.
    assert flow.parent_keys == {dg.AssetKey(["streams", "orders"])}
    assert nodes["yaml/loom/order_ledger"].parent_keys == {dg.AssetKey(["streams", "orders.enriched"])}


def test_translation_keeps_sensors_and_checks_of_the_translated_assets() -> None:
    prefixed_only = EXAMPLE_FLOWS_YAML + "key_prefix: [yaml]\n"
    with yaml_component(prefixed_only) as (_, sandbox), sandbox.build_all_defs() as defs:
        expected = {
            (k.asset_key.to_user_string(), k.name) for k in defs.resolve_asset_graph().asset_check_keys
        }
        expected_sensors = {s.name for s in defs.sensors or []}
    with yaml_component(TRANSLATION_YAML) as (_, sandbox), sandbox.build_all_defs() as defs:
        graph = defs.resolve_asset_graph()
        checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
        assert {check.asset_key for check in graph.asset_check_keys} <= graph.get_all_asset_keys()
        assert (
            {s.name for s in defs.sensors or []}
            == expected_sensors
            == {
                "loom_job_health",
                "loom_kafka_lag",
                "loom_sink_health",
            }
        )
    assert checks == {(key.replace("yaml/kafka/", "streams/"), name) for key, name in expected}
    assert ("yaml/delta/orders_enriched", "freshness") in checks


def test_translation_error_names_the_field_and_line() -> None:
    defs_yaml, text = load_error(EXAMPLE_FLOWS_YAML + "translation: {grup_name: x}\n")
    assert f"attributes.translation.AssetSpecUpdateKwargsModel.grup_name at {defs_yaml}:15" in text


def test_dagster_post_processing_edits_loom_assets_by_selection() -> None:
    post_processing = 'post_processing:\n  assets:\n    - target: "kind:kafka"\n      attributes: {owners: ["team:platform"]}\n'
    with create_defs_folder_sandbox() as sandbox:
        component_dir = sandbox.defs_folder_path / "loom_flows"
        component_dir.mkdir()
        body = textwrap.indent(EXAMPLE_FLOWS_YAML.strip(), "  ")
        (component_dir / "defs.yaml").write_text(
            f"type: {COMPONENT_TYPE}\nattributes:\n{body}\n{post_processing}"
        )
        with sandbox.build_all_defs() as defs:
            graph = defs.resolve_asset_graph()
            owners = {key.to_user_string(): graph.get(key).owners for key in graph.get_all_asset_keys()}
    assert owners["kafka/orders"] == ["team:platform"]
    assert owners["loom/orders_enrichment"] == ["team:data-platform"]
