"""Asset factories: one materializable asset per flow (materialize = deploy), plus external specs for
its topics, collections and tables."""

import re
from collections.abc import Sequence
from typing import Any

import dagster as dg

from loom_dagster.catalog import compile_specs, config_section
from loom_dagster.deploy import DeployResult
from loom_dagster.errors import LoomDagsterError
from loom_dagster.graph import FlowNode, LoomAssetGraph, build_asset_graph
from loom_dagster.records import LoomFlow
from loom_dagster.resources import LoomDeployResource
from loom_dagster.spec import LoomFlowSpec
from loom_dagster.translator import LoomTranslator, metadata_json

RESOURCE_KEY = "loom"


class LoomDeployConfig(dg.Config):
    """Run config of a flow materialization."""

    environment: str | None = None


def build_loom_asset_graph(
    flows: Sequence[LoomFlowSpec], translator: LoomTranslator | None = None
) -> LoomAssetGraph:
    """Compile every flow and lay out its specs and edges (no Dagster definitions yet)."""
    return build_asset_graph(compile_specs(flows), translator or LoomTranslator())


def build_loom_flow_assets(
    flows: Sequence[LoomFlowSpec], *, translator: LoomTranslator | None = None
) -> list[dg.AssetsDefinition | dg.AssetSpec]:
    """The assets of a set of flows: a deploy asset per flow and an external spec per topic/table.

    Example:
        >>> assets = build_loom_flow_assets([LoomFlowSpec(  # doctest: +SKIP
        ...     "definitions.flows.orders:orders_flow", config="definitions/config")])
    """
    graph = build_loom_asset_graph(flows, translator)
    return assets_from_graph(graph)


def assets_from_graph(graph: LoomAssetGraph) -> list[dg.AssetsDefinition | dg.AssetSpec]:
    """Deploy assets for the graph's flows plus its external specs."""
    return [*(flow_deploy_asset(node) for node in graph.flows), *graph.external_specs]


def op_name(flow_name: str) -> str:
    """A valid Dagster op name for a flow."""
    return "deploy_" + re.sub(r"[^A-Za-z0-9_]", "_", flow_name)


def flow_deploy_asset(node: FlowNode) -> dg.AssetsDefinition:
    """The materializable asset of one flow: materializing it deploys (or validates) the flow."""
    spec, compiled = node.spec, node.compiled
    declared, sink_keys = compiled.flow, dict(node.sink_keys)
    flow_spec = compiled.spec

    @dg.multi_asset(
        specs=[spec],
        name=op_name(declared.name),
        pool=f"loom_{op_name(declared.name)}",
        description=spec.description,
    )
    def _deploy(
        context: dg.AssetExecutionContext, config: LoomDeployConfig, loom: LoomDeployResource
    ) -> dg.MaterializeResult:
        deployer = loom.deployer()
        try:
            result = deployer.deploy(
                flow_spec,
                declared,
                sink_keys=sink_keys,
                environment=config.environment,
                run_id=context.run.run_id,
                log=context.log.info,
            )
        except LoomDagsterError as exc:
            raise dg.Failure(
                description=str(exc), metadata={"loom/error": type(exc).__name__}, allow_retries=False
            ) from exc
        return dg.MaterializeResult(
            asset_key=spec.key,
            metadata=deploy_metadata(declared, result),
            data_version=dg.DataVersion(result.compiled.flow.plan_hash),
        )

    return _deploy


def deploy_metadata(declared: LoomFlow, result: DeployResult) -> dict[str, Any]:
    """Materialization metadata: plan hash, resolved sinks, compile time; deployment facts if launched."""
    flow = result.compiled.flow
    metadata: dict[str, Any] = {
        "loom/plan_hash": flow.plan_hash,
        "loom/config_hash": flow.config_hash,
        "loom/environment": flow.environment,
        "loom/compile_ms": dg.MetadataValue.float(round(result.compiled.compile_seconds * 1000, 2)),
        "loom/sinks": metadata_json(flow.sink_identities),
        "loom/summary": metadata_json(config_section(result.compiled)),
    }
    if declared.plan_hash != flow.plan_hash:
        metadata["loom/declared_plan_hash"] = declared.plan_hash
    deployment = result.deployment
    if deployment is None:
        metadata["loom/deployed"] = False
        return metadata
    job = deployment.job
    metadata.update(
        {
            "loom/deployed": True,
            "loom/pid": dg.MetadataValue.int(job.processes[0].pid),
            "loom/pids": ", ".join(str(p.pid) for p in job.processes),
            "loom/host": job.host,
            "loom/started_at": dg.MetadataValue.timestamp(job.started_at),
            "loom/log_path": dg.MetadataValue.path(job.log_path),
            "loom/processes": dg.MetadataValue.int(len(job.processes)),
            "loom/previous_deployment": (
                f"plan {result.previous.plan_hash}, pids "
                + ", ".join(str(p.pid) for p in result.previous.job.processes)
                if result.previous
                else "none"
            ),
        }
    )
    if result.drain_seconds is not None:
        metadata["loom/drain_s"] = dg.MetadataValue.float(round(result.drain_seconds, 3))
    if result.gate_seconds is not None:
        metadata["loom/gate_s"] = dg.MetadataValue.float(round(result.gate_seconds, 3))
    return metadata
