"""loom-dagster: run loom streaming flows under Dagster.

Each loom ``StreamFlow`` becomes a Dagster asset fed by its Kafka topics (or Mongo collections) and
feeding its Delta, ClickHouse and SQL tables and output topics. Materializing a flow asset compiles
its plan, checks it against the declared lineage, and deploys it as a long-running Bytewax job.

Example:
    >>> from loom_dagster import LoomFlowSpec, build_loom_defs
    >>> defs = build_loom_defs([  # doctest: +SKIP
    ...     LoomFlowSpec("definitions.flows.orders:orders_flow", config="definitions/config",
    ...                  environment="development"),
    ... ])
"""

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "DeployObserver": "loom_dagster.deploy",
    "DeployOptions": "loom_dagster.deploy",
    "Deployment": "loom_dagster.deployments",
    "DeploymentError": "loom_dagster.errors",
    "DeploymentStore": "loom_dagster.deployments",
    "DefsState": "loom_dagster.defs_state",
    "DuplicateAssetKeyError": "loom_dagster.errors",
    "FlowCompileError": "loom_dagster.errors",
    "FlowDeployer": "loom_dagster.deploy",
    "FlowLoadError": "loom_dagster.errors",
    "JobHealthSettings": "loom_dagster.settings",
    "KafkaLagSettings": "loom_dagster.settings",
    "Launcher": "loom_dagster.launchers",
    "LineageMismatchError": "loom_dagster.errors",
    "LocalProcessLauncher": "loom_dagster.launchers",
    "LoomColumn": "loom_dagster.records",
    "LoomDagsterError": "loom_dagster.errors",
    "LoomDeployConfig": "loom_dagster.assets",
    "LoomDeployResource": "loom_dagster.resources",
    "LoomFlow": "loom_dagster.records",
    "LoomFlowSpec": "loom_dagster.spec",
    "LoomMetadataSet": "loom_dagster.translator",
    "LoomFlowsComponent": "loom_dagster.component",
    "LoomOutputTopic": "loom_dagster.records",
    "LoomSensorSettings": "loom_dagster.settings",
    "LoomSourceCollection": "loom_dagster.records",
    "LoomSourceTopic": "loom_dagster.records",
    "LoomStorageSink": "loom_dagster.records",
    "LoomTopic": "loom_dagster.records",
    "LoomTranslator": "loom_dagster.translator",
    "OpenLineageObserver": "loom_dagster.lineage_events",
    "OpenLineageSettings": "loom_dagster.lineage_events",
    "SinkBackend": "loom_dagster.records",
    "SinkFreshness": "loom_dagster.settings",
    "SinkHealthSettings": "loom_dagster.settings",
    "TopicRole": "loom_dagster.records",
    "build_job_health_sensor": "loom_dagster.sensors.health",
    "build_kafka_lag_sensor": "loom_dagster.sensors.lag",
    "build_loom_asset_graph": "loom_dagster.assets",
    "build_loom_defs": "loom_dagster.definitions_builder",
    "build_loom_flow_assets": "loom_dagster.assets",
    "build_redeploy_schedule": "loom_dagster.schedules",
    "build_sink_health_sensor": "loom_dagster.sensors.sinks",
    "build_undeploy_job": "loom_dagster.jobs",
    "deploy_loom_flows": "loom_dagster.decorator",
    "loom_flow_assets": "loom_dagster.decorator",
}


def __getattr__(name: str) -> Any:
    """Import public names on first use, so ``python -m loom_dagster.runtime`` does not load Dagster."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loom_dagster' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from loom_dagster.assets import LoomDeployConfig, build_loom_asset_graph, build_loom_flow_assets
    from loom_dagster.component import LoomFlowsComponent
    from loom_dagster.decorator import deploy_loom_flows, loom_flow_assets
    from loom_dagster.definitions_builder import build_loom_defs
    from loom_dagster.defs_state import DefsState
    from loom_dagster.deploy import DeployObserver, DeployOptions, FlowDeployer
    from loom_dagster.deployments import Deployment, DeploymentStore
    from loom_dagster.errors import (
        DeploymentError,
        DuplicateAssetKeyError,
        FlowCompileError,
        FlowLoadError,
        LineageMismatchError,
        LoomDagsterError,
    )
    from loom_dagster.jobs import build_undeploy_job
    from loom_dagster.launchers import Launcher, LocalProcessLauncher
    from loom_dagster.lineage_events import OpenLineageObserver, OpenLineageSettings
    from loom_dagster.records import (
        LoomColumn,
        LoomFlow,
        LoomOutputTopic,
        LoomSourceCollection,
        LoomSourceTopic,
        LoomStorageSink,
        LoomTopic,
        SinkBackend,
        TopicRole,
    )
    from loom_dagster.resources import LoomDeployResource
    from loom_dagster.schedules import build_redeploy_schedule
    from loom_dagster.sensors.health import build_job_health_sensor
    from loom_dagster.sensors.lag import build_kafka_lag_sensor
    from loom_dagster.sensors.sinks import build_sink_health_sensor
    from loom_dagster.settings import (
        JobHealthSettings,
        KafkaLagSettings,
        LoomSensorSettings,
        SinkFreshness,
        SinkHealthSettings,
    )
    from loom_dagster.spec import LoomFlowSpec
    from loom_dagster.translator import LoomMetadataSet, LoomTranslator

__all__ = [
    "build_job_health_sensor",
    "build_kafka_lag_sensor",
    "build_loom_asset_graph",
    "build_loom_defs",
    "build_loom_flow_assets",
    "build_redeploy_schedule",
    "build_sink_health_sensor",
    "build_undeploy_job",
    "deploy_loom_flows",
    "loom_flow_assets",
    "DefsState",
    "Deployment",
    "DeploymentError",
    "DeploymentStore",
    "DeployObserver",
    "DeployOptions",
    "DuplicateAssetKeyError",
    "FlowCompileError",
    "FlowDeployer",
    "FlowLoadError",
    "JobHealthSettings",
    "KafkaLagSettings",
    "Launcher",
    "LineageMismatchError",
    "LocalProcessLauncher",
    "LoomColumn",
    "LoomDagsterError",
    "LoomDeployConfig",
    "LoomDeployResource",
    "LoomFlow",
    "LoomFlowsComponent",
    "LoomFlowSpec",
    "LoomMetadataSet",
    "LoomOutputTopic",
    "LoomSensorSettings",
    "LoomSourceCollection",
    "LoomSourceTopic",
    "LoomStorageSink",
    "LoomTopic",
    "LoomTranslator",
    "OpenLineageObserver",
    "OpenLineageSettings",
    "SinkBackend",
    "SinkFreshness",
    "SinkHealthSettings",
    "TopicRole",
]
