"""Scheduled redeploys: re-materialize selected flows on a cron, optionally skipping unchanged ones."""

from collections.abc import Sequence
from typing import Any

import dagster as dg
import msgspec

from loom_dagster.asset_graph import LoomAssetGraph
from loom_dagster.core.errors import LoomDagsterError
from loom_dagster.core.flows.catalog import compile_spec
from loom_dagster.resource import LoomDeployResource


class RedeployDecision(msgspec.Struct, frozen=True):
    """Whether one flow is redeployed by a schedule tick, and why."""

    flow_name: str
    redeploy: bool
    reason: str


def decide_redeploy(
    graph: LoomAssetGraph, flow_name: str, loom: LoomDeployResource, skip_unchanged: bool
) -> RedeployDecision:
    """Compile the flow as it is now and compare plan and config hashes with the running deployment."""
    node = next(n for n in graph.flows if n.compiled.flow.name == flow_name)
    if not skip_unchanged:
        return RedeployDecision(flow_name, True, "skip_unchanged is off")
    deployment = loom.deployer().store.current(flow_name)
    if deployment is None:
        return RedeployDecision(flow_name, True, "never deployed")
    if deployment.stopped_on_purpose:
        return RedeployDecision(flow_name, False, f"undeployed by {deployment.stopped_by}; not redeploying")
    try:
        now = compile_spec(node.compiled.spec).flow
    except LoomDagsterError as exc:
        return RedeployDecision(flow_name, True, f"does not compile now ({exc}); the run will report it")
    if now.plan_hash == deployment.plan_hash and now.config_hash == deployment.config_hash:
        return RedeployDecision(
            flow_name, False, f"unchanged (plan {now.plan_hash}, config {now.config_hash})"
        )
    return RedeployDecision(
        flow_name,
        True,
        f"changed: plan {deployment.plan_hash} -> {now.plan_hash}, config {deployment.config_hash} -> {now.config_hash}",
    )


def build_redeploy_schedule(
    graph: LoomAssetGraph,
    cron_schedule: str,
    *,
    flows: Sequence[str] | None = None,
    skip_unchanged: bool = True,
    name: str = "loom_redeploy",
    execution_timezone: str | None = None,
    default_status: dg.DefaultScheduleStatus = dg.DefaultScheduleStatus.STOPPED,
) -> dg.ScheduleDefinition:
    """A schedule that redeploys the selected flows (default: all) on *cron_schedule*.

    With ``skip_unchanged`` a flow whose compiled plan hash and config hash equal its running
    deployment's is skipped, as is a flow stopped on purpose. Each redeploy is its own run.

    Example:
        >>> schedule = build_redeploy_schedule(graph, "0 3 * * *")  # doctest: +SKIP
    """
    all_names = [node.compiled.flow.name for node in graph.flows]
    selected = list(flows) if flows is not None else all_names
    unknown = sorted(set(selected) - set(all_names))
    if unknown:
        raise LoomDagsterError(f"redeploy schedule {name!r} names unknown flow(s): {', '.join(unknown)}")
    keys = {node.compiled.flow.name: node.spec.key for node in graph.flows}

    @dg.schedule(
        name=name,
        cron_schedule=cron_schedule,
        target=dg.AssetSelection.assets(*(keys[f] for f in selected)),
        execution_timezone=execution_timezone,
        default_status=default_status,
        description=f"Redeploys {', '.join(selected)} on '{cron_schedule}'"
        + ("; skips flows whose plan and config are unchanged." if skip_unchanged else "."),
    )
    def _schedule(context: dg.ScheduleEvaluationContext, loom: LoomDeployResource) -> Any:
        requests = []
        skipped = []
        for flow_name in selected:
            decision = decide_redeploy(graph, flow_name, loom, skip_unchanged)
            context.log.info(
                f"{flow_name}: {'redeploy' if decision.redeploy else 'skip'} ({decision.reason})"
            )
            if decision.redeploy:
                requests.append(
                    dg.RunRequest(
                        run_key=f"loom-redeploy-{flow_name}-{context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else ''}",
                        asset_selection=[keys[flow_name]],
                        tags={
                            "loom/redeploy": "scheduled",
                            "loom/flow": flow_name,
                            "loom/reason": decision.reason[:200],
                        },
                    )
                )
            else:
                skipped.append(f"{flow_name}: {decision.reason}")
        if not requests:
            return dg.SkipReason("; ".join(skipped) or "no flows selected")
        return requests

    return _schedule
