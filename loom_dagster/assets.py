"""Asset factories: one subsettable multi-asset over a code location's flows (an asset per flow;
materialize = deploy), plus external specs for their topics, collections and tables."""

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import dagster as dg

from loom_dagster.asset_check_names import DEPLOY_CHECKS, RESTART_TAG
from loom_dagster.asset_graph import FlowNode, LoomAssetGraph, build_asset_graph
from loom_dagster.core.checks.loom_checks import DeployChecksReport
from loom_dagster.core.contracts.chain import ContractsReport
from loom_dagster.core.deploy.deployer import DeployResult
from loom_dagster.core.deploy.store import Deployment
from loom_dagster.core.errors import LoomDagsterError, redacted_chain
from loom_dagster.core.flows.catalog import compile_specs, config_section
from loom_dagster.core.flows.defs_state import STALE_METADATA_KEY, DefsState, default_defs_state
from loom_dagster.core.flows.records import LoomFlow
from loom_dagster.core.flows.spec import LoomFlowSpec
from loom_dagster.core.redact import redact_text
from loom_dagster.resource import LoomDeployResource
from loom_dagster.translator import LoomDeployMetadataSet, LoomTranslator, metadata_json

RESOURCE_KEY = "loom"


class LoomDeployConfig(dg.Config):
    """Run config of a flow materialization."""

    environment: str | None = None
    accept_offset_reset: bool = False
    accept_contract_change: bool = False
    """Deploy even when a payload contract with another flow of the code location breaks (its readers
    will send what they cannot decode to their dead-letter topics)."""


def build_loom_asset_graph(
    flows: Sequence[LoomFlowSpec],
    translator: LoomTranslator | None = None,
    *,
    state: DefsState | bool | None = True,
) -> LoomAssetGraph:
    """Lay out every flow's specs and edges (no Dagster definitions yet).

    The flows' records come from the defs *state* (``True``: the default ``DefsState``, unless
    ``LOOM_DAGSTER_DEFS_STATE=off``; see ``loom_dagster.core.flows.defs_state``), refreshed there when missing
    or stale; ``False``/``None`` compiles every flow now. A flow loaded from a stale state (only with
    ``refresh="never"``) carries ``loom/defs_state`` metadata saying why.
    """
    chosen = default_defs_state() if state is True else (state or None)
    if chosen is None:
        return build_asset_graph(compile_specs(flows), translator or LoomTranslator())
    load = chosen.load(flows)
    graph = build_asset_graph(load.compiled, translator or LoomTranslator())
    stale = {f.flow_name: f.reason for f in load.flows if f.status == "stale"}  # one pass, not one a flow
    for node in graph.flows:
        reason = stale.get(node.compiled.flow.name)
        if reason is not None:
            node.spec = node.spec.merge_attributes(
                metadata={
                    STALE_METADATA_KEY: dg.MetadataValue.text(
                        f"stale: {reason}. The asset graph may not match the flow; run `loom-dagster "
                        "refresh` and reload. A deploy compiles the flow anew and checks its lineage."
                    )
                }
            )
    return graph


def build_loom_flow_assets(
    flows: Sequence[LoomFlowSpec],
    *,
    translator: LoomTranslator | None = None,
    state: DefsState | bool | None = True,
) -> list[dg.AssetsDefinition | dg.AssetSpec]:
    """The assets of a set of flows: one deploy multi-asset over the flows and an external spec per
    topic/table.

    Example:
        >>> assets = build_loom_flow_assets([LoomFlowSpec(  # doctest: +SKIP
        ...     "definitions.flows.orders:orders_flow", config="definitions/config")])
    """
    graph = build_loom_asset_graph(flows, translator, state=state)
    return assets_from_graph(graph)


DEPLOY_OP = "loom_deploy"
"""Name of the deploy op (one per code location) and of its Dagster pool (``offset_safety`` names it
too, without importing Dagster)."""


def assets_from_graph(
    graph: LoomAssetGraph, *, name: str = DEPLOY_OP, pool: str | None = DEPLOY_OP
) -> list[dg.AssetsDefinition | dg.AssetSpec]:
    """The deploy multi-asset of the graph's flows (``flows_deploy_asset``) plus its external specs."""
    if not graph.flows:
        return list(graph.external_specs)
    return [flows_deploy_asset(graph.flows, name=name, pool=pool), *graph.external_specs]


def flows_deploy_asset(
    nodes: Sequence[FlowNode], *, name: str = DEPLOY_OP, pool: str | None = DEPLOY_OP
) -> dg.AssetsDefinition:
    """One subsettable multi-asset over every flow, as ``@dbt_assets`` is over a dbt project: each flow
    an asset materialized alone or with others (materialize = deploy), each with its ``deploy_checks``
    check (executing that check alone runs the checks and deploys nothing).

    A run deploys the flows it selected one after the other, each under its own flow lock and with
    its own result and metadata; a flow that fails does not stop the others (``deploy_flow_nodes``).
    One op for every flow keeps the code location's load at about the cost of plain Dagster assets
    (an op per flow cost Dagster ~1 ms each to build and validate); the op's *pool* (``loom_deploy``)
    is therefore shared by the location's flows: see the README (concurrency).
    """
    chosen = tuple(nodes)

    @dg.multi_asset(
        specs=[node.spec for node in chosen],
        check_specs=[deploy_check_spec(node.spec.key) for node in chosen],
        name=name,
        pool=pool,
        description="Deploys the selected loom flows (materialize = deploy), one after the other.",
        can_subset=True,
        config_schema=_deploy_config_schema(),
    )
    def _deploy(
        context: dg.AssetExecutionContext, loom: LoomDeployResource
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        config = LoomDeployConfig(**context.op_execution_context.op_config)
        yield from deploy_flow_nodes(context, chosen, config, loom)

    return _deploy


@functools.cache
def _deploy_config_schema() -> Any:
    """``LoomDeployConfig``'s Dagster config schema, made once (inferring it from a typed ``config``
    parameter costs ~0.4 ms a time)."""
    return LoomDeployConfig.to_fields_dict()


def deploy_flow_nodes(
    context: dg.AssetExecutionContext,
    nodes: Sequence[FlowNode],
    config: LoomDeployConfig,
    loom: LoomDeployResource,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Deploy each of *nodes* the run selected (the asset, or only its ``deploy_checks``), in order.

    Yields each flow's results as ``deploy_flow_node`` does. A flow that fails does not stop the
    others: their results are yielded, and the failures are raised together at the end (one failure
    as it is). *nodes* are every flow of the asset (the code location's): each deploy checks its
    payload contracts with them.
    """
    location = tuple(node.compiled.flow for node in nodes)
    selected_checks = {
        key.asset_key for key in context.selected_asset_check_keys if key.name == DEPLOY_CHECKS
    }
    selected = context.selected_asset_keys
    failures: list[tuple[str, dg.Failure]] = []
    for node in nodes:
        key = node.spec.key
        if key not in selected and key not in selected_checks:
            continue
        try:
            yield from deploy_flow_node(context, node, config, loom, location_flows=location)
        except dg.Failure as failure:
            failures.append((node.compiled.flow.name, failure))
    if len(failures) == 1:
        raise failures[0][1]
    if failures:
        raise dg.Failure(
            description="\n\n".join(f"flow {flow!r}: {failure.description}" for flow, failure in failures),
            metadata={"loom/failed_flows": ", ".join(flow for flow, _ in failures)},
            allow_retries=False,
        )


def deploy_check_spec(key: dg.AssetKey) -> dg.AssetCheckSpec:
    """The ``deploy_checks`` check declared on the flow asset *key*."""
    return dg.AssetCheckSpec(
        DEPLOY_CHECKS,
        asset=key,
        description="loom's deploy checks (loom.core.checks) for the target environment: errors block the "
        "deploy where loom enforces them (production, staging), warnings WARN, silenced ids listed.",
    )


def deploy_flow_node(
    context: dg.AssetExecutionContext,
    node: FlowNode,
    config: LoomDeployConfig,
    loom: LoomDeployResource,
    location_flows: Sequence[LoomFlow] = (),
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Materialize one flow in an asset body: deploy it (or restart it, for the health sensor's runs),
    or, when only its ``deploy_checks`` check is selected, run the checks and deploy nothing.

    *location_flows* are the flows loaded with it (its code location): the deploy, and the check, compare
    its payload contracts with theirs (``loom_dagster.core.contracts``); flows of another code location
    are not seen."""
    spec, compiled = node.spec, node.compiled
    declared, sink_keys = compiled.flow, dict(node.sink_keys)
    flow_spec = compiled.spec
    deployer = loom.deployer()
    reports: list[DeployChecksReport] = []
    report_checks = dg.AssetCheckKey(spec.key, DEPLOY_CHECKS) in context.selected_asset_check_keys
    try:
        if context.run.tags.get(RESTART_TAG) == "true" and deployer.store.current(declared.name):
            restarted = deployer.restart(
                declared.name, by=f"run {context.run.run_id} (job health sensor)", log=context.log.info
            )
            yield dg.MaterializeResult(
                asset_key=spec.key,
                metadata=restart_metadata(restarted),
                data_version=dg.DataVersion(restarted.plan_hash),
            )
            return
        if spec.key not in context.selected_asset_keys:
            fresh = deployer.validate(flow_spec, declared, sink_keys, config.environment)
            deployer.run_deploy_checks(fresh, reports.append, log=context.log.info)
            contracts = deployer.check_contracts(fresh, location_flows, log=context.log.info)
            yield deploy_checks_result(spec.key, reports[-1], contracts)
            return
        result = deployer.deploy(
            flow_spec,
            declared,
            sink_keys=sink_keys,
            environment=config.environment,
            run_id=context.run.run_id,
            log=context.log.info,
            accept_offset_reset=config.accept_offset_reset,
            on_checks=reports.append,
            location_flows=location_flows,
            accept_contract_change=config.accept_contract_change,
        )
    except LoomDagsterError as exc:
        deployer.observer.failed(declared.name, exc)
        if reports and report_checks:
            yield deploy_checks_result(spec.key, reports[-1], getattr(exc, "contracts", None))
        raise dg.Failure(
            description=str(exc),
            metadata=failure_metadata(exc),
            allow_retries=False,
        ) from exc
    except Exception as exc:  # not ours: its text may hold anything (a driver's DSN): redacted, chain too
        deployer.observer.failed(declared.name, exc)
        raise dg.Failure(
            description=redact_text(f"deploying flow {declared.name!r} failed: {type(exc).__name__}: {exc}"),
            allow_retries=True,
        ) from redacted_chain(exc)
    if reports and report_checks:
        yield deploy_checks_result(spec.key, reports[-1], result.contracts)
    yield dg.MaterializeResult(
        asset_key=spec.key,
        metadata=deploy_metadata(declared, result),
        data_version=dg.DataVersion(result.compiled.flow.plan_hash),
    )


def deploy_checks_result(
    key: dg.AssetKey, report: DeployChecksReport, contracts: ContractsReport | None = None
) -> dg.AssetCheckResult:
    """The ``deploy_checks`` result: fails (ERROR) when loom's checks block or a payload contract with
    another flow breaks (unless the run accepted it), WARN on any other finding of loom's checks. The
    contracts' findings are in ``contracts`` (text) and ``loom/contracts`` (JSON)."""
    broken = contracts is not None and bool(contracts.broken)
    if report.blocks or (contracts is not None and contracts.blocks):
        passed, severity = False, dg.AssetCheckSeverity.ERROR
    elif report.findings or broken:
        passed, severity = False, dg.AssetCheckSeverity.WARN
    else:
        passed, severity = True, dg.AssetCheckSeverity.WARN
    description = report.summary()
    metadata: dict[str, Any] = {
        "errors": dg.MetadataValue.text("\n".join(f.describe() for f in report.errors) or "none"),
        "warnings": dg.MetadataValue.text("\n".join(f.describe() for f in report.warnings) or "none"),
        "silenced": ", ".join(report.silenced) or "none",
        "environment": report.environment,
        "enforced": report.enforced,
    }
    if contracts is not None:
        description = f"{description}; contracts: {contracts.summary()}"
        metadata["contracts"] = dg.MetadataValue.text(contracts.describe())
        metadata.update(LoomDeployMetadataSet(contracts=metadata_json(contracts.metadata())))
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=DEPLOY_CHECKS,
        passed=passed,
        severity=severity,
        description=description,
        metadata=metadata,
    )


def restart_metadata(deployment: Deployment) -> dict[str, Any]:
    """Metadata of a restart: the same deployment (plan, config snapshot), a new job."""
    job = deployment.job
    return dict(
        LoomDeployMetadataSet(
            deployed=True,
            restarted=True,
            restarts=deployment.restarts,
            plan_hash=deployment.plan_hash,
            config_hash=deployment.config_hash,
            pid=job.processes[0].pid,
            pids=_pids(job),
            host=job.host,
            started_at=dg.MetadataValue.timestamp(job.started_at),
            log_path=dg.MetadataValue.path(job.log_path),
            config_snapshot=", ".join(job.request.config_files),
        )
    )


def failure_metadata(exc: Exception) -> dict[str, Any]:
    """Metadata of a failed deploy: the error class, and the measured numbers where there are some
    (a refused contract's report in ``loom/contracts``)."""
    report, plan = getattr(exc, "report", None), getattr(exc, "plan", None)
    contracts = getattr(exc, "contracts", None)
    return dict(
        LoomDeployMetadataSet(
            error=type(exc).__name__,
            report=metadata_json(report.metadata()) if report is not None else None,
            offsets=metadata_json(plan.metadata()) if plan is not None else None,
            contracts=metadata_json(contracts.metadata()) if contracts is not None else None,
        )
    )


def deploy_metadata(declared: LoomFlow, result: DeployResult) -> dict[str, Any]:
    """Materialization metadata: plan hash, resolved sinks, compile time; deployment facts if launched."""
    flow = result.compiled.flow
    deployment, previous = result.deployment, result.previous
    job = deployment.job if deployment is not None else None
    return dict(
        LoomDeployMetadataSet(
            plan_hash=flow.plan_hash,
            config_hash=flow.config_hash,
            environment=flow.environment,
            compile_ms=round(result.compiled.compile_seconds * 1000, 2),
            sinks=metadata_json(flow.sink_identities),
            summary=metadata_json(config_section(result.compiled)),
            declared_plan_hash=declared.plan_hash if declared.plan_hash != flow.plan_hash else None,
            sink_tables=metadata_json(result.tables.metadata()) if result.tables is not None else None,
            offsets=metadata_json(result.offsets.metadata()) if result.offsets is not None else None,
            contracts=metadata_json(result.contracts.metadata()) if result.contracts is not None else None,
            deployed=job is not None,
            pid=job.processes[0].pid if job else None,
            pids=_pids(job) if job else None,
            host=job.host if job else None,
            started_at=dg.MetadataValue.timestamp(job.started_at) if job else None,
            log_path=dg.MetadataValue.path(job.log_path) if job else None,
            processes=len(job.processes) if job else None,
            previous_deployment=(
                (f"plan {previous.plan_hash}, {previous.job.processes_text}" if previous else "none")
                if job
                else None
            ),
            drain_s=round(result.drain_seconds, 3) if result.drain_seconds is not None else None,
            gate_s=round(result.gate_seconds, 3) if result.gate_seconds is not None else None,
            progress=result.progress.message if result.progress is not None else None,
        )
    )


def _pids(job: Any) -> str:
    return ", ".join(str(p.pid) for p in job.processes)
