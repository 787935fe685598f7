"""``LoomFlowsComponent``: declare loom flows in a ``defs.yaml`` instead of Python.

The component builds exactly what ``build_loom_defs`` builds for the equivalent Python call: a deploy
asset per flow, external assets for its topics, collections and tables, the deploy resource, the
undeploy job, the sensors with their checks and (opt-in) the redeploy schedule.

Every field, with its default where it has one (this file works as
``definitions/yaml_location/defs/loom_flows/defs.yaml`` of the example; config paths are relative to
the directory of the defs.yaml):

.. code-block:: yaml

    type: loom_dagster.component.LoomFlowsComponent
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
      sensors:                     # LoomSensorSettings; every field optional
        default_status_running: true
        job_health: {enabled: true, interval_s: 15, restart: true,
                     backoff_initial_s: 10, backoff_max_s: 600, max_restarts: 5, restart_window_s: 3600}
        kafka_lag: {enabled: true, interval_s: 30, window: 10, warn_lag: 1000, error_lag: 100000,
                    request_timeout_s: 10}
        sink_health:
          enabled: true
          interval_s: 60
          default_freshness: {warn_after_s: 900, fail_after_s: 3600}
          freshness:               # per sink, by asset key with the prefix
            streaming/delta/orders_enriched: {warn_after_s: 60, fail_after_s: 600}
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

Templates (``{{ env('X', 'default') }}``) work in every value, as in any Dagster component. A wrong
key or value fails the code location load with the defs.yaml, the line and the field path, e.g.
``defs.yaml:8 - attributes.flows.0.processes: Input should be a valid integer ... (got 'two')``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import dagster as dg
from dagster.components import Component, ComponentLoadContext, Model, ResolutionContext, Resolvable
from dagster.components.resolved.errors import ResolutionException
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator
from pydantic.fields import FieldInfo

from loom_dagster.errors import LoomDagsterError
from loom_dagster.records import LoomFlow, LoomSourceCollection, LoomStorageSink, LoomTopic
from loom_dagster.resources import LoomDeployResource
from loom_dagster.sensors.settings import (
    JobHealthSettings,
    KafkaLagSettings,
    LoomSensorSettings,
    SinkFreshness,
    SinkHealthSettings,
)
from loom_dagster.spec import LoomFlowSpec
from loom_dagster.translator import LoomTranslator

__all__ = [
    "DeployResourceModel",
    "JobHealthModel",
    "KafkaLagModel",
    "LoomFlowModel",
    "LoomFlowsComponent",
    "PrefixedLoomTranslator",
    "SensorsModel",
    "SinkFreshnessModel",
    "SinkHealthModel",
]

# Defaults come from the dataclasses / resource themselves, so YAML and Python can never drift apart.
_JOB = JobHealthSettings()
_LAG = KafkaLagSettings()
_SINK = SinkHealthSettings()
_FRESH = SinkFreshness()
_SENSORS = LoomSensorSettings()
_RES = LoomDeployResource.model_fields


class PrefixedLoomTranslator(LoomTranslator):
    """A ``LoomTranslator`` that prefixes every asset key (flows, topics, collections, tables) and can
    put every asset in one group.

    Example:
        >>> spec = PrefixedLoomTranslator(key_prefix=["yaml"]).get_source_topic_spec(topic)  # doctest: +SKIP
        >>> spec.key.path  # doctest: +SKIP
        ['yaml', 'kafka', 'orders']
    """

    def __init__(self, key_prefix: Sequence[str] = (), group_name: str | None = None) -> None:
        self.key_prefix = list(key_prefix)
        self.group_name = group_name

    def _adjust(self, spec: dg.AssetSpec) -> dg.AssetSpec:
        if self.key_prefix:
            spec = spec.replace_attributes(key=spec.key.with_prefix(self.key_prefix))
        if self.group_name:
            spec = spec.replace_attributes(group_name=self.group_name)
        return spec

    def get_flow_spec(self, flow: LoomFlow) -> dg.AssetSpec:
        return self._adjust(super().get_flow_spec(flow))

    def get_source_topic_spec(self, topic: LoomTopic) -> dg.AssetSpec:
        return self._adjust(super().get_source_topic_spec(topic))

    def get_output_topic_spec(self, topic: LoomTopic) -> dg.AssetSpec:
        return self._adjust(super().get_output_topic_spec(topic))

    def get_source_collection_spec(self, collection: LoomSourceCollection) -> dg.AssetSpec:
        return self._adjust(super().get_source_collection_spec(collection))

    def get_storage_sink_spec(self, sink: LoomStorageSink, flow: LoomFlow) -> dg.AssetSpec:
        return self._adjust(super().get_storage_sink_spec(sink, flow))


class _YamlModel(Resolvable, Model):
    """A resolvable model whose validation errors name the defs.yaml, the line and the field."""

    @classmethod
    def resolve_from_model(cls, context: ResolutionContext, model: BaseModel) -> Any:
        try:
            return super().resolve_from_model(context, model)
        except ValidationError as exc:
            raise ResolutionException(_describe_errors(context, exc)) from None


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _non_negative(value: float) -> float:
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


class LoomFlowModel(_YamlModel):
    """One loom flow; mirrors ``LoomFlowSpec``."""

    import_path: str = Field(
        description="'package.module:attribute' of the StreamFlow (or of a function returning it)."
    )
    config: str | list[str] = Field(
        description="loom config: a YAML file, a directory with base.yaml + <environment>.yaml, or a list "
        "of them merged left to right. Relative paths are relative to the directory of this defs.yaml."
    )
    environment: str | None = Field(
        default=None, description="loom environment; default: $LOOM_ENV, else production."
    )
    group_name: str | None = Field(default=None, description="Asset group of the flow and its tables.")
    owners: list[str] = Field(default_factory=list, description="Asset owners of the flow and its tables.")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags of the flow asset.")
    description: str | None = Field(default=None, description="Description of the flow asset.")
    processes: int = Field(default=1, description="Bytewax processes of the deployed job (at least 1).")
    workers_per_process: int = Field(default=1, description="Bytewax workers per process (at least 1).")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables of the deployed job."
    )

    _check_positive = field_validator("processes", "workers_per_process")(_positive)

    @field_validator("config")
    @classmethod
    def _config_not_empty(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("give a config file or directory (or a non-empty list of them)")
        return value

    def to_spec(self, base_dir: Path) -> LoomFlowSpec:
        """The ``LoomFlowSpec``, relative config paths resolved against *base_dir*."""
        if isinstance(self.config, str):
            config: str | list[str] = str(_resolve_path(self.config, base_dir))
        else:
            config = [str(_resolve_path(source, base_dir)) for source in self.config]
        return LoomFlowSpec(
            self.import_path,
            config=config,
            environment=self.environment,
            group_name=self.group_name,
            owners=list(self.owners),
            tags=dict(self.tags),
            description=self.description,
            processes=self.processes,
            workers_per_process=self.workers_per_process,
            env=dict(self.env),
        )


class JobHealthModel(_YamlModel):
    """Job health sensor; mirrors ``JobHealthSettings``."""

    enabled: bool = _JOB.enabled
    interval_s: int = _JOB.interval_s
    restart: bool = _JOB.restart
    backoff_initial_s: float = _JOB.backoff_initial_s
    backoff_max_s: float = _JOB.backoff_max_s
    max_restarts: int = _JOB.max_restarts
    restart_window_s: float = _JOB.restart_window_s

    _check_positive = field_validator("interval_s", "restart_window_s")(_positive)
    _check_non_negative = field_validator("backoff_initial_s", "backoff_max_s", "max_restarts")(_non_negative)

    def to_settings(self) -> JobHealthSettings:
        return JobHealthSettings(**self.model_dump())


class KafkaLagModel(_YamlModel):
    """Kafka lag sensor; mirrors ``KafkaLagSettings``."""

    enabled: bool = _LAG.enabled
    interval_s: int = _LAG.interval_s
    window: int = _LAG.window
    warn_lag: int = _LAG.warn_lag
    error_lag: int = _LAG.error_lag
    request_timeout_s: float = _LAG.request_timeout_s

    _check_positive = field_validator("interval_s", "window", "request_timeout_s")(_positive)
    _check_non_negative = field_validator("warn_lag", "error_lag")(_non_negative)

    def to_settings(self) -> KafkaLagSettings:
        return KafkaLagSettings(**self.model_dump())


class SinkFreshnessModel(_YamlModel):
    """Freshness windows of a sink; mirrors ``SinkFreshness``."""

    warn_after_s: float = _FRESH.warn_after_s
    fail_after_s: float = _FRESH.fail_after_s

    _check_positive = field_validator("warn_after_s", "fail_after_s")(_positive)

    def to_settings(self) -> SinkFreshness:
        return SinkFreshness(**self.model_dump())


class SinkHealthModel(_YamlModel):
    """Sink health sensor; mirrors ``SinkHealthSettings``. ``freshness`` and ``sql_timestamp_columns``
    are keyed by the sink's asset key string, key prefix included (e.g. ``yaml/delta/orders``)."""

    enabled: bool = _SINK.enabled
    interval_s: int = _SINK.interval_s
    default_freshness: SinkFreshnessModel | None = None
    freshness: dict[str, SinkFreshnessModel] = Field(default_factory=dict)
    sql_timestamp_columns: dict[str, str] = Field(default_factory=dict)

    _check_positive = field_validator("interval_s")(_positive)

    def to_settings(self) -> SinkHealthSettings:
        return SinkHealthSettings(
            enabled=self.enabled,
            interval_s=self.interval_s,
            default_freshness=(
                self.default_freshness.to_settings() if self.default_freshness else SinkFreshness()
            ),
            freshness={key: value.to_settings() for key, value in self.freshness.items()},
            sql_timestamp_columns=dict(self.sql_timestamp_columns),
        )


class SensorsModel(_YamlModel):
    """Every loom sensor; mirrors ``LoomSensorSettings``. Omitted parts keep their defaults."""

    job_health: JobHealthModel | None = None
    kafka_lag: KafkaLagModel | None = None
    sink_health: SinkHealthModel | None = None
    default_status_running: bool = _SENSORS.default_status_running

    def to_settings(self) -> LoomSensorSettings:
        return LoomSensorSettings(
            job_health=self.job_health.to_settings() if self.job_health else JobHealthSettings(),
            kafka_lag=self.kafka_lag.to_settings() if self.kafka_lag else KafkaLagSettings(),
            sink_health=self.sink_health.to_settings() if self.sink_health else SinkHealthSettings(),
            default_status_running=self.default_status_running,
        )


class DeployResourceModel(_YamlModel):
    """The deploy resource; mirrors ``LoomDeployResource``."""

    state_dir: str | None = Field(default=None, description=_RES["state_dir"].description)
    mode: Literal["deploy", "validate"] = Field(default="deploy", description=_RES["mode"].description)
    health_timeout_s: float = Field(
        default=_RES["health_timeout_s"].default, description=_RES["health_timeout_s"].description
    )
    drain_timeout_s: float = Field(
        default=_RES["drain_timeout_s"].default, description=_RES["drain_timeout_s"].description
    )
    preflight: bool = Field(default=_RES["preflight"].default, description=_RES["preflight"].description)
    python_executable: str | None = Field(default=None, description=_RES["python_executable"].description)
    heartbeat_timeout_s: float = Field(
        default=_RES["heartbeat_timeout_s"].default, description=_RES["heartbeat_timeout_s"].description
    )
    create_missing_tables: bool = Field(
        default=_RES["create_missing_tables"].default, description=_RES["create_missing_tables"].description
    )
    connect_timeout_s: float = Field(
        default=_RES["connect_timeout_s"].default, description=_RES["connect_timeout_s"].description
    )

    _check_positive = field_validator("health_timeout_s", "heartbeat_timeout_s", "connect_timeout_s")(
        _positive
    )
    _check_non_negative = field_validator("drain_timeout_s")(_non_negative)

    def to_resource(self) -> LoomDeployResource:
        """The resource, with exactly the fields the YAML set (others keep the resource defaults)."""
        return LoomDeployResource(**self.model_dump(exclude_unset=True))


class LoomFlowsComponent(Component, _YamlModel):
    """Loom streaming flows as Dagster assets, declared in YAML: the same definitions as
    ``build_loom_defs(flows, translator=..., resource=..., sensors=..., redeploy_cron=...)``.

    Relative ``config`` paths are resolved against the directory of the ``defs.yaml``. Flow import
    paths must import from the code location's working directory (as in Python).

    Example ``defs.yaml``:

    .. code-block:: yaml

        type: loom_dagster.component.LoomFlowsComponent
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
          sensors:
            kafka_lag: {warn_lag: 5000}
          deploy:
            mode: validate

    See the module docstring of ``loom_dagster.component`` for every field.
    """

    flows: list[LoomFlowModel] = Field(description="The loom flows of this component (at least one).")
    key_prefix: list[str] = Field(
        default_factory=list,
        description="Prefix of every loom asset key (flows, topics, collections, tables), e.g. [yaml].",
    )
    group_name: str | None = Field(
        default=None, description="Put every loom asset of this component in this group (overrides flows')."
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
    def _at_least_one_flow(cls, value: list[LoomFlowModel]) -> list[LoomFlowModel]:
        if not value:
            raise ValueError("declare at least one flow")
        return value

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        """The attributes schema: Dagster's derived model, but lists, mappings and nested objects are
        not also accepted as a template string, so a wrong key is reported at its own line."""
        return _yaml_schema(cls.model())

    def flow_specs(self, base_dir: Path) -> list[LoomFlowSpec]:
        """The ``LoomFlowSpec`` of every flow, relative config paths resolved against *base_dir*."""
        return [flow.to_spec(base_dir) for flow in self.flows]

    def translator(self) -> LoomTranslator | None:
        """The translator for the key prefix / group override, or ``None`` (the default translator)."""
        if not self.key_prefix and not self.group_name:
            return None
        return PrefixedLoomTranslator(self.key_prefix, self.group_name)

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
        from loom_dagster.definitions_builder import build_loom_defs

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


def _resolve_path(source: str, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(source))
    return path if path.is_absolute() else (base_dir / path).resolve()


def _describe_errors(context: ResolutionContext, exc: ValidationError) -> str:
    """One entry per error: ``file:line - attributes.flows.0.processes: message (got 'two')`` + snippet."""
    parts = []
    for error in exc.errors():
        path = [*context.path, *error["loc"]]
        where = ".".join(str(p) for p in path)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] != "missing":
            message += f" (got {error['input']!r})"
        tree = context.source_position_tree
        if tree is None:
            parts.append(f"{where}: {message}")
            continue
        source = tree.source_error(yaml_path=path, inline_error_message=message, value_error=True)
        parts.append(f"{source.file_name}:{source.start_line_no} - {where}: {message}\n{source.snippet}")
    count = len(parts)
    return f"{count} invalid LoomFlowsComponent attribute{'s' if count > 1 else ''}:\n" + "\n".join(parts)


# --- attributes schema -------------------------------------------------------------------------------
# Dagster derives the YAML model from the classes above and lets EVERY field also be a template
# string. For lists, mappings and nested objects that makes pydantic report an extra, misleading
# "Input should be a valid string" and hide the line of a wrong nested key; scalars keep the string
# alternative (``processes: "{{ env('P') }}"`` stays possible) and are checked when resolved.


def _resolvable_by_model() -> dict[type[BaseModel], type[Resolvable]]:
    classes: list[type[Resolvable]] = [
        LoomFlowsComponent,
        LoomFlowModel,
        JobHealthModel,
        KafkaLagModel,
        SinkFreshnessModel,
        SinkHealthModel,
        SensorsModel,
        DeployResourceModel,
    ]
    return {resolvable.model(): resolvable for resolvable in classes}


@cache
def _yaml_schema(derived: type[BaseModel]) -> type[BaseModel]:
    original = _resolvable_by_model()[derived]
    original_fields = original.model_fields if issubclass(original, BaseModel) else {}
    fields: dict[str, Any] = {}
    for name, info in derived.model_fields.items():
        declared = original_fields.get(name)
        if declared is not None and declared.description and not info.description:
            # Dagster drops the description of fields with a default; keep it for editors and `dg`.
            info = FieldInfo.merge_field_infos(info, description=declared.description)
        annotation = _yaml_annotation(info.annotation, declared.annotation if declared else str)
        fields[name] = (annotation, info)
    schema = create_model(derived.__name__, __base__=Model, **fields)
    schema.model_config["json_schema_extra"] = derived.model_config.get("json_schema_extra")
    return schema


def _members(annotation: Any) -> tuple[Any, ...]:
    return get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)


def _is_structured(annotation: Any) -> bool:
    return get_origin(annotation) in (list, tuple, dict) or (
        isinstance(annotation, type) and issubclass(annotation, BaseModel)
    )


def _yaml_annotation(derived: Any, declared: Any) -> Any:
    members = [_yaml_member(m) for m in _members(derived)]
    if str not in _members(declared) and any(_is_structured(m) for m in members):
        members = [m for m in members if m is not str]
    result = members[0]
    for member in members[1:]:
        result = result | member
    return result


def _yaml_member(annotation: Any) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _yaml_member(args[0])
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return tuple[_yaml_member(args[0]), ...]  # type: ignore[misc]
    if origin is list:
        return list[_yaml_member(args[0])]  # type: ignore[misc]
    if origin is dict:
        return dict[str, _yaml_member(args[1])]  # type: ignore[misc]
    if isinstance(annotation, type) and annotation in _resolvable_by_model():
        return _yaml_schema(annotation)
    return annotation
