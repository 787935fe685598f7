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

from loom_dagster.assets import LoomDeployConfig, build_loom_asset_graph, build_loom_flow_assets
from loom_dagster.definitions_builder import build_loom_defs
from loom_dagster.deploy import DeployOptions, FlowDeployer
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
from loom_dagster.spec import LoomFlowSpec
from loom_dagster.translator import LoomTranslator

__all__ = [
    "Deployment",
    "DeploymentError",
    "DeploymentStore",
    "DeployOptions",
    "DuplicateAssetKeyError",
    "FlowCompileError",
    "FlowDeployer",
    "FlowLoadError",
    "Launcher",
    "LineageMismatchError",
    "LocalProcessLauncher",
    "LoomColumn",
    "LoomDagsterError",
    "LoomDeployConfig",
    "LoomDeployResource",
    "LoomFlow",
    "LoomFlowSpec",
    "LoomOutputTopic",
    "LoomSourceCollection",
    "LoomSourceTopic",
    "LoomStorageSink",
    "LoomTopic",
    "LoomTranslator",
    "SinkBackend",
    "TopicRole",
    "build_loom_asset_graph",
    "build_loom_defs",
    "build_loom_flow_assets",
    "build_undeploy_job",
]
