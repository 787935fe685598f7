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

from loom_dagster.core import moved_modules

moved_modules.install()

_EXPORTS: dict[str, str] = {
    "DeployObserver": "loom_dagster.core.deploy.deployer",
    "DeployOptions": "loom_dagster.core.deploy.deployer",
    "Deployment": "loom_dagster.core.deploy.store",
    "DeploymentError": "loom_dagster.core.errors",
    "DeploymentStore": "loom_dagster.core.deploy.store",
    "DefsState": "loom_dagster.core.flows.defs_state",
    "DuplicateAssetKeyError": "loom_dagster.core.errors",
    "FlowCompileError": "loom_dagster.core.errors",
    "FlowDeployer": "loom_dagster.core.deploy.deployer",
    "FlowLoadError": "loom_dagster.core.errors",
    "JobHealthSettings": "loom_dagster.core.sensor_settings",
    "KafkaLagSettings": "loom_dagster.core.sensor_settings",
    "Launcher": "loom_dagster.core.launchers",
    "LineageMismatchError": "loom_dagster.core.errors",
    "LocalProcessLauncher": "loom_dagster.core.launchers",
    "LoomColumn": "loom_dagster.core.flows.records",
    "LoomDagsterError": "loom_dagster.core.errors",
    "LoomDeployConfig": "loom_dagster.assets",
    "LoomDeployResource": "loom_dagster.resource",
    "LoomFlow": "loom_dagster.core.flows.records",
    "LoomFlowSpec": "loom_dagster.core.flows.spec",
    "LoomMetadataSet": "loom_dagster.translator",
    "LoomFlowsComponent": "loom_dagster.components.loom_flows.component",
    "LoomOutputTopic": "loom_dagster.core.flows.records",
    "LoomSensorSettings": "loom_dagster.core.sensor_settings",
    "LoomSourceCollection": "loom_dagster.core.flows.records",
    "LoomSourceTopic": "loom_dagster.core.flows.records",
    "LoomStorageSink": "loom_dagster.core.flows.records",
    "LoomTopic": "loom_dagster.core.flows.records",
    "LoomTranslator": "loom_dagster.translator",
    "OpenLineageObserver": "loom_dagster.core.openlineage",
    "OpenLineageSettings": "loom_dagster.core.openlineage",
    "SinkBackend": "loom_dagster.core.flows.records",
    "SinkFreshness": "loom_dagster.core.sensor_settings",
    "SinkHealthSettings": "loom_dagster.core.sensor_settings",
    "TopicRole": "loom_dagster.core.flows.records",
    "build_job_health_sensor": "loom_dagster.sensors.health",
    "build_kafka_lag_sensor": "loom_dagster.sensors.lag",
    "build_loom_asset_graph": "loom_dagster.assets",
    "build_loom_defs": "loom_dagster.definitions",
    "build_loom_flow_assets": "loom_dagster.assets",
    "build_redeploy_schedule": "loom_dagster.schedules",
    "build_sink_health_sensor": "loom_dagster.sensors.sinks",
    "build_undeploy_job": "loom_dagster.jobs.undeploy",
    "deploy_loom_flows": "loom_dagster.asset_decorator",
    "loom_flow_assets": "loom_dagster.asset_decorator",
}


def __getattr__(name: str) -> Any:
    """Import public names on first use, so ``python -m loom_dagster.runtime`` does not load Dagster."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loom_dagster' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names with the lazily imported exports (``dg`` finds the component by ``dir()``)."""
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:
    from loom_dagster.asset_decorator import deploy_loom_flows, loom_flow_assets
    from loom_dagster.assets import LoomDeployConfig, build_loom_asset_graph, build_loom_flow_assets
    from loom_dagster.components.loom_flows.component import LoomFlowsComponent
    from loom_dagster.core.deploy.deployer import DeployObserver, DeployOptions, FlowDeployer
    from loom_dagster.core.deploy.store import Deployment, DeploymentStore
    from loom_dagster.core.errors import (
        DeploymentError,
        DuplicateAssetKeyError,
        FlowCompileError,
        FlowLoadError,
        LineageMismatchError,
        LoomDagsterError,
    )
    from loom_dagster.core.flows.defs_state import DefsState
    from loom_dagster.core.flows.records import (
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
    from loom_dagster.core.flows.spec import LoomFlowSpec
    from loom_dagster.core.launchers import Launcher, LocalProcessLauncher
    from loom_dagster.core.openlineage import OpenLineageObserver, OpenLineageSettings
    from loom_dagster.core.sensor_settings import (
        JobHealthSettings,
        KafkaLagSettings,
        LoomSensorSettings,
        SinkFreshness,
        SinkHealthSettings,
    )
    from loom_dagster.definitions import build_loom_defs
    from loom_dagster.jobs.undeploy import build_undeploy_job
    from loom_dagster.resource import LoomDeployResource
    from loom_dagster.schedules import build_redeploy_schedule
    from loom_dagster.sensors.health import build_job_health_sensor
    from loom_dagster.sensors.lag import build_kafka_lag_sensor
    from loom_dagster.sensors.sinks import build_sink_health_sensor
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
