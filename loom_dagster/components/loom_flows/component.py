"""``LoomFlowsComponent``: declare loom flows in a ``defs.yaml`` instead of Python.

The component builds exactly what ``build_loom_defs`` builds for the equivalent Python call: the
deploy multi-asset (an asset per flow, one ``loom_deploy`` op), external assets for its topics,
collections and tables, the deploy resource, the undeploy job, the sensors with their checks and
(opt-in) the redeploy schedule.

Every field, with its default where it has one (this file works as
``definitions/yaml_location/defs/loom_flows/defs.yaml`` of the example; config paths are relative to
the directory of the defs.yaml):

.. code-block:: yaml

    type: loom_dagster.LoomFlowsComponent
    attributes:
      key_prefix: [streaming]      # default []: prefix of every loom asset key (flows, topics, tables)
      group_name: null             # set: every loom asset of this component goes in this group
      flows:                       # required, at least one
        - import_path: definitions.flows.orders:orders_flow         # required
          config: ../../../config/orders                            # required: file, directory or list
          environment: "{{ env('LOOM_ENV', 'development') }}"     # default $LOOM_ENV, else production
          group_name: orders
          owners: ["team:data-platform"]
          tags: {domain: orders}
          description: null
          processes: 1
          workers_per_process: 1
          env: {}                  # extra environment variables of the deployed job
        - import_path: definitions.flows.payments:ledger_flow
          config: [../../../config/ledger/base.yaml, ../../../config/ledger/development.yaml]
          environment: development
          group_name: ledger
      redeploy_cron: "0 3 * * *"   # default null: no redeploy schedule
      redeploy_flows: [orders_enrichment]                           # default null: every flow
      redeploy_skip_unchanged: true
      translation:                 # default null: per loom object, override what its AssetSpec says
        group_name: "{{ 'kafka_topics' if kind == 'topic' else spec.group_name }}"
        tags: {loom/kind: "{{ kind }}"}
        metadata: {loom/object: "{{ name }}"}
      sensors:                     # LoomSensorSettings; every field optional
        default_status_running: true
        job_health: {enabled: true, interval_s: 15, restart: true,
                     backoff_initial_s: 10, backoff_max_s: 600, max_restarts: 5, restart_window_s: 3600}
        kafka_lag: {enabled: true, interval_s: 30, window: 10, warn_lag: 1000, error_lag: 100000,
                    request_timeout_s: 10}
        sink_health:
          enabled: true
          interval_s: 60
          default_freshness: {warn_after_s: 900, fail_after_s: 3600}   # each table's FreshnessPolicy
          freshness:               # per sink, by asset key with the prefix
            streaming/delta/orders_enriched: {warn_after_s: 60, fail_after_s: 600}
            streaming/clickhouse/analytics/orders_enriched:   # a cron deadline instead of the window
              {deadline_cron: "0 9 * * *", cron_lower_bound_s: 3600, cron_timezone: Europe/Paris}
          sql_timestamp_columns: {}
      deploy:                      # LoomDeployResource; every field optional
        state_dir: null            # default $LOOM_DAGSTER_STATE_DIR, else $DAGSTER_HOME/loom
        mode: deploy               # or validate (CI: compile and check lineage, launch nothing)
        health_timeout_s: 60
        drain_timeout_s: 30
        preflight: true
        python_executable: null
        heartbeat_timeout_s: 30
        create_missing_tables: false   # create missing SQL/ClickHouse sink tables before launch
        connect_timeout_s: 10      # each pre-launch check (broker, databases)
        log_max_bytes: 10485760    # job logs rotate at this size ...
        log_max_files: 5           # ... keeping this many files per launch
        launcher: local            # or kubernetes, or package.module:Class (a Launcher subclass)
        launcher_config: {}        # its keyword arguments (kubernetes: {namespace: ..., pod: {image: ...}})
    post_processing:               # Dagster's own (any component): edit assets picked by a selection
      assets:
        - target: "kind:kafka"
          attributes: {owners: ["team:platform"]}

The ``sensors`` and ``deploy`` fields are generated from ``LoomSensorSettings`` (and the settings it
holds) and ``LoomDeployResource``, a flow's from ``LoomFlowSpec`` (``loom_dagster.components.loom_flows.models``):
a field added there is a YAML key here, with the same default.

``translation`` works as in the dbt and Sling components: an ``AssetSpec`` attributes block (``key``,
``key_prefix``, ``group_name``, ``tags``, ``kinds``, ``metadata``, ``owners``, ``description``, ...)
rendered for each loom asset, after ``key_prefix`` / ``group_name``; ``tags`` and ``metadata`` are
merged, the rest replaced. Its templates see ``kind`` (``flow``, ``topic``, ``collection`` or
``table``), ``name`` (flow name, topic, ``db.collection`` or table), ``spec`` (the AssetSpec so far)
and the loom record: ``flow`` (flows and tables), ``topic``, ``collection``, ``sink`` (tables). Edges
follow the new keys. ``translation: "{{ my_fn }}"`` (a ``template_vars_module`` function returning an
``AssetSpec`` or a dict of attributes) works too. For bulk edits by asset selection use Dagster's
``post_processing`` block, a sibling of ``attributes``.

Each table's ``freshness_policy`` comes from ``sensors.sink_health`` (see ``build_loom_defs``);
``translation`` may replace it (``freshness_policy: "{{ my_policy(sink) }}"``, a
``template_vars_module`` function returning a ``dg.FreshnessPolicy``) or remove it
(``freshness_policy: "{{ spec.freshness_policy if kind != 'table' or not name.startswith('tmp_') else None }}"``,
or ``freshness_policy: null`` for every asset).

Templates (``{{ env('X', 'default') }}``) work in every value, as in any Dagster component. A wrong
key or value fails the code location load with the defs.yaml, the line and the field path, e.g.
``defs.yaml:8 - attributes.flows.0.processes: Input should be a valid integer ... (got 'two')``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import dagster as dg
from dagster.components import Component, ComponentLoadContext
from dagster.components.utils.translation import TranslationFn, TranslationFnResolver
from pydantic import Field, field_validator

from loom_dagster.components.loom_flows.models import (
    SettingsModel,
    YamlModel,
    non_negative,
    positive,
    settings_model,
)
from loom_dagster.components.loom_flows.scaffolder import LoomFlowsScaffolder
from loom_dagster.core.errors import LoomDagsterError
from loom_dagster.core.flows.records import LoomFlow, LoomSourceCollection, LoomStorageSink, LoomTopic
from loom_dagster.core.flows.spec import LoomFlowSpec
from loom_dagster.core.sensor_settings import (
    JobHealthSettings,
    KafkaLagSettings,
    LoomSensorSettings,
    SinkFreshness,
    SinkHealthSettings,
)
from loom_dagster.freshness_policy import cron_problem, timezone_problem
from loom_dagster.resource import LoomDeployResource
from loom_dagster.translator import LoomTranslator

__all__ = [
    "DeployResourceModel",
    "JobHealthModel",
    "KafkaLagModel",
    "LoomAssetData",
    "LoomFlowModel",
    "LoomFlowsComponent",
    "PrefixedLoomTranslator",
    "SensorsModel",
    "SinkFreshnessModel",
    "SinkHealthModel",
]


@dataclass(frozen=True)
class LoomAssetData:
    """The loom object behind one asset, as ``translation`` templates see it."""

    kind: Literal["flow", "topic", "collection", "table"]
    name: str
    flow: LoomFlow | None = None
    topic: LoomTopic | None = None
    collection: LoomSourceCollection | None = None
    sink: LoomStorageSink | None = None


def translation_vars(data: LoomAssetData) -> dict[str, Any]:
    """Template variables of ``translation`` for one loom object (Dagster adds ``spec``)."""
    return {field.name: getattr(data, field.name) for field in dataclasses.fields(data)}


class PrefixedLoomTranslator(LoomTranslator):
    """A ``LoomTranslator`` that prefixes every asset key (flows, topics, collections, tables), can
    put every asset in one group, then applies a per-object ``translation`` (the component's).

    Example:
        >>> spec = PrefixedLoomTranslator(key_prefix=["yaml"]).get_source_topic_spec(topic)  # doctest: +SKIP
        >>> spec.key.path  # doctest: +SKIP
        ['yaml', 'kafka', 'orders']
    """

    def __init__(
        self,
        key_prefix: Sequence[str] = (),
        group_name: str | None = None,
        translation: TranslationFn[LoomAssetData] | None = None,
    ) -> None:
        self.key_prefix = list(key_prefix)
        self.group_name = group_name
        self.translation = translation

    def _adjust(self, spec: dg.AssetSpec, data: LoomAssetData) -> dg.AssetSpec:
        spec = self._placed(spec)
        if self.translation is not None:
            spec = self.translation(spec, data)
        return spec

    def _placed(self, spec: dg.AssetSpec) -> dg.AssetSpec:
        """*spec* under the key prefix and in the group."""
        if self.key_prefix:
            spec = spec.replace_attributes(key=spec.key.with_prefix(self.key_prefix))
        if self.group_name:
            spec = spec.replace_attributes(group_name=self.group_name)
        return spec

    def get_flow_spec(self, flow: LoomFlow) -> dg.AssetSpec:
        return self._adjust(super().get_flow_spec(flow), LoomAssetData("flow", flow.name, flow=flow))

    def get_source_topic_spec(self, topic: LoomTopic) -> dg.AssetSpec:
        return self._adjust(
            super().get_source_topic_spec(topic), LoomAssetData("topic", topic.topic, topic=topic)
        )

    def get_output_topic_spec(self, topic: LoomTopic) -> dg.AssetSpec:
        return self._adjust(
            super().get_output_topic_spec(topic), LoomAssetData("topic", topic.topic, topic=topic)
        )

    def get_source_collection_spec(self, collection: LoomSourceCollection) -> dg.AssetSpec:
        name = f"{collection.database}.{collection.collection}"
        data = LoomAssetData("collection", name, collection=collection)
        return self._adjust(super().get_source_collection_spec(collection), data)

    def get_storage_sink_spec(self, sink: LoomStorageSink, flow: LoomFlow) -> dg.AssetSpec:
        """The table's spec, its freshness policy that of its final key: prefixed (see
        ``get_freshness_policy``) and, when ``translation`` changes the key and leaves the policy, the
        policy of the new key. A policy ``translation`` sets (or removes, ``freshness_policy: null``)
        stays."""
        placed = self._placed(super().get_storage_sink_spec(sink, flow))
        if self.translation is None:
            return placed
        spec = self.translation(placed, LoomAssetData("table", sink.table, flow=flow, sink=sink))
        if spec.key != placed.key and spec.freshness_policy is placed.freshness_policy:
            policy = LoomTranslator.get_freshness_policy(self, sink, flow, spec.key)  # a final key: no prefix
            spec = spec.replace_attributes(freshness_policy=policy)
        return spec

    def get_freshness_policy(
        self, sink: LoomStorageSink, flow: LoomFlow, asset_key: dg.AssetKey
    ) -> dg.FreshnessPolicy | None:
        """The policy for *asset_key* with the component's ``key_prefix`` (the key the sensor watches)."""
        return super().get_freshness_policy(sink, flow, asset_key.with_prefix(self.key_prefix))


# --- the YAML models, generated from the objects they configure (see loom_dagster.components.loom_flows.models) ---


class _SettingsBase(SettingsModel):
    def to_settings(self) -> Any:
        """The settings dataclass."""
        return self.to_value()


class _ResourceBase(SettingsModel):
    def to_resource(self) -> LoomDeployResource:
        """The resource, with exactly the fields the YAML set (others keep the resource defaults)."""
        resource: LoomDeployResource = self.to_value()
        return resource


class _FlowBase(SettingsModel):
    def to_spec(self, base_dir: Path) -> LoomFlowSpec:
        """The ``LoomFlowSpec``, relative config paths resolved against *base_dir*."""
        spec: LoomFlowSpec = self.to_value()
        config = spec.config
        if isinstance(config, str | os.PathLike):
            return dataclasses.replace(spec, config=str(_resolve_path(config, base_dir)))
        return dataclasses.replace(spec, config=[str(_resolve_path(source, base_dir)) for source in config])


def _not_empty(value: Any) -> Any:
    if not value:
        raise ValueError("give a config file or directory (or a non-empty list of them)")
    return value


def _valid_cron(value: str | None) -> str | None:
    problem = cron_problem(value) if value is not None else None
    if problem:
        raise ValueError(problem)
    return value


def _valid_timezone(value: str) -> str:
    problem = timezone_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _optional(check: Any) -> Any:
    def optional(value: Any) -> Any:
        return value if value is None else check(value)

    return optional


_SETTINGS: dict[type, type[SettingsModel]] = {}


def _settings(source: type, name: str, **checks: Any) -> type[SettingsModel]:
    model = settings_model(source, name=name, base=_SettingsBase, nested=_SETTINGS, checks=checks)
    _SETTINGS[source] = model
    return model


if TYPE_CHECKING:  # the classes are built at import; for type checkers they are their bases
    JobHealthModel = _SettingsBase
    KafkaLagModel = _SettingsBase
    SinkFreshnessModel = _SettingsBase
    SinkHealthModel = _SettingsBase
    SensorsModel = _SettingsBase
    DeployResourceModel = _ResourceBase
    LoomFlowModel = _FlowBase
else:
    JobHealthModel = _settings(
        JobHealthSettings,
        "JobHealthModel",
        interval_s=positive,
        restart_window_s=positive,
        backoff_initial_s=non_negative,
        backoff_max_s=non_negative,
        max_restarts=non_negative,
        backoff_reset_after_s=non_negative,
        regression_watch_ticks=non_negative,
    )
    KafkaLagModel = _settings(
        KafkaLagSettings,
        "KafkaLagModel",
        interval_s=positive,
        window=positive,
        request_timeout_s=positive,
        warn_lag=non_negative,
        error_lag=non_negative,
        delay_timeout_s=positive,
        delay_max_partitions=positive,
    )
    SinkFreshnessModel = _settings(
        SinkFreshness,
        "SinkFreshnessModel",
        warn_after_s=positive,
        fail_after_s=positive,
        deadline_cron=_valid_cron,
        cron_lower_bound_s=_optional(positive),
        cron_timezone=_valid_timezone,
    )
    SinkHealthModel = _settings(SinkHealthSettings, "SinkHealthModel", interval_s=positive)
    SensorsModel = _settings(LoomSensorSettings, "SensorsModel")
    DeployResourceModel = settings_model(
        LoomDeployResource,
        name="DeployResourceModel",
        base=_ResourceBase,
        checks={
            "health_timeout_s": positive,
            "heartbeat_timeout_s": positive,
            "connect_timeout_s": positive,
            "drain_timeout_s": non_negative,
        },
    )
    LoomFlowModel = settings_model(
        LoomFlowSpec,
        name="LoomFlowModel",
        base=_FlowBase,
        checks={"processes": positive, "workers_per_process": positive, "config": _not_empty},
        descriptions={
            "config": "loom config: a YAML file, a directory with base.yaml + <environment>.yaml, or a list "
            "of them merged left to right. Relative paths are relative to the directory of this defs.yaml.",
        },
    )


@dg.scaffold_with(LoomFlowsScaffolder)
class LoomFlowsComponent(Component, YamlModel):
    """Loom streaming flows as Dagster assets, declared in YAML: the same definitions as
    ``build_loom_defs(flows, translator=..., resource=..., sensors=..., redeploy_cron=...)``.

    Relative ``config`` paths are resolved against the directory of the ``defs.yaml``. Flow import
    paths must import from the code location's working directory (as in Python).
    ``dg scaffold defs loom_dagster.LoomFlowsComponent <name>`` writes a skeleton.

    Example ``defs.yaml``:

    .. code-block:: yaml

        type: loom_dagster.LoomFlowsComponent
        attributes:
          key_prefix: [yaml]
          flows:
            - import_path: definitions.flows.orders:orders_flow
              config: ../../../config/orders
              environment: development
              group_name: orders
            - import_path: definitions.flows.payments:ledger_flow
              config: ../../../config/ledger
              environment: development
              group_name: ledger
          translation:
            tags: {loom/kind: "{{ kind }}"}
          sensors:
            kafka_lag: {warn_lag: 5000}
          deploy:
            mode: validate

    See the module docstring of ``loom_dagster.components.loom_flows.component`` for every field.
    """

    flows: list[LoomFlowModel] = Field(description="The loom flows of this component (at least one).")
    key_prefix: list[str] = Field(
        default_factory=list,
        description="Prefix of every loom asset key (flows, topics, collections, tables), e.g. [yaml].",
    )
    group_name: str | None = Field(
        default=None, description="Put every loom asset of this component in this group (overrides flows')."
    )
    translation: Annotated[
        TranslationFn[LoomAssetData] | None,
        TranslationFnResolver[LoomAssetData](template_vars_for_translation_fn=translation_vars),
    ] = Field(
        default=None,
        description="AssetSpec attributes rendered per loom asset (templates see kind, name, spec, flow, "
        "topic, collection, sink); tags and metadata are merged, the rest replaced.",
    )
    redeploy_cron: str | None = Field(
        default=None, description="Cron of the redeploy schedule; omit for no schedule."
    )
    redeploy_flows: list[str] | None = Field(
        default=None, description="Flow names the schedule redeploys (default: all)."
    )
    redeploy_skip_unchanged: bool = Field(
        default=True, description="Skip flows whose compiled plan and config are unchanged."
    )
    sensors: SensorsModel | None = Field(default=None, description="Loom sensor settings.")
    deploy: DeployResourceModel | None = Field(default=None, description="LoomDeployResource settings.")

    @field_validator("flows")
    @classmethod
    def _at_least_one_flow(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise ValueError("declare at least one flow")
        return value

    def flow_specs(self, base_dir: Path) -> list[LoomFlowSpec]:
        """The ``LoomFlowSpec`` of every flow, relative config paths resolved against *base_dir*."""
        return [flow.to_spec(base_dir) for flow in self.flows]

    def translator(self) -> LoomTranslator | None:
        """The translator for the key prefix / group override / translation, or ``None`` (the default)."""
        if not self.key_prefix and not self.group_name and self.translation is None:
            return None
        return PrefixedLoomTranslator(self.key_prefix, self.group_name, self.translation)

    def build_loom_defs_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the equivalent ``build_loom_defs`` call (only those that are set)."""
        kwargs: dict[str, Any] = {
            "translator": self.translator(),
            "resource": self.deploy.to_resource() if self.deploy else None,
        }
        if self.sensors is not None:
            kwargs["sensors"] = self.sensors.to_settings()
        if self.redeploy_cron is not None:
            kwargs["redeploy_cron"] = self.redeploy_cron
        if self.redeploy_flows is not None:
            kwargs["redeploy_flows"] = list(self.redeploy_flows)
        if not self.redeploy_skip_unchanged:
            kwargs["redeploy_skip_unchanged"] = False
        return kwargs

    def build_defs(self, context: ComponentLoadContext) -> dg.Definitions:
        from loom_dagster.definitions import build_loom_defs

        directory = defs_dir(context)
        try:
            return build_loom_defs(self.flow_specs(directory), **self.build_loom_defs_kwargs())
        except LoomDagsterError as exc:
            raise type(exc)(f"{_defs_file(directory)}: {exc}") from exc


def defs_dir(context: ComponentLoadContext) -> Path:
    """The directory of the component's ``defs.yaml`` (or of its Python file)."""
    path = Path(context.path)
    return path if path.is_dir() else path.parent


def _defs_file(directory: Path) -> Path:
    for name in ("defs.yaml", "component.yaml"):
        if (directory / name).exists():
            return directory / name
    return directory


def _resolve_path(source: str | os.PathLike[str], base_dir: Path) -> Path:
    path = Path(os.path.expanduser(source))
    return path if path.is_absolute() else (base_dir / path).resolve()
