"""``@loom_flow_assets``: your own asset body around loom's deploy, as ``@dbt_assets`` is for dbt.

The decorated function becomes ONE ``multi_asset`` over the flows it is given (``can_subset=True``,
each flow with its ``deploy_checks`` check), as ``build_loom_defs``'s own ``loom_deploy`` op is. Its
body runs your code and, where you call ``deploy_loom_flows(context, loom)``, the same deploy as that op,
once per selected flow: compile, lineage, deploy checks, sink tables, topics, offsets, snapshot,
preflight, drain, launch, health gate (or the restart the job health sensor asks for, or the checks
alone when only a flow's ``deploy_checks`` is selected).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import dagster as dg

from loom_dagster.asset_graph import FlowNode, LoomAssetGraph
from loom_dagster.assets import (
    LoomDeployConfig,
    build_loom_asset_graph,
    deploy_check_spec,
    deploy_flow_nodes,
)
from loom_dagster.core.flows.defs_state import DefsState
from loom_dagster.core.flows.spec import LoomFlowSpec
from loom_dagster.resource import LoomDeployResource
from loom_dagster.translator import LoomTranslator


@dataclass(frozen=True)
class _Body:
    """The flows of the decorated asset whose body is running, and the run config it was given."""

    nodes: tuple[FlowNode, ...]
    config: LoomDeployConfig | None


_ACTIVE: ContextVar[_Body | None] = ContextVar("loom_flow_assets_body", default=None)


def loom_flow_assets(
    *,
    flows: Sequence[LoomFlowSpec] | None = None,
    graph: LoomAssetGraph | None = None,
    translator: LoomTranslator | None = None,
    state: DefsState | bool | None = True,
    name: str | None = None,
    pool: str | None = None,
    description: str | None = None,
) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    """Make the decorated function the asset of the given loom flows (one ``multi_asset``).

    Pass the *flows* (with a *translator* and the defs *state*, as ``build_loom_asset_graph`` takes
    them) or a *graph* already built, to also put its topics and tables (``graph.external_specs``)
    and its sensors into your definitions. The function takes the execution context first, then
    ``loom: LoomDeployResource`` (and optionally ``config: LoomDeployConfig``, which the deploy then
    uses), and yields from ``deploy_loom_flows(context, loom)``. Code before it runs before any flow
    is deployed, code after it once every selected flow is deployed; the health sensor's restart
    runs go through the same body. The op is named after the function (run config goes under
    ``ops: {<name>: {config: ...}}``).

    Example:
        >>> import dagster as dg
        >>> from loom_dagster import LoomDeployResource, LoomFlowSpec, build_loom_asset_graph
        >>> from loom_dagster.asset_decorator import deploy_loom_flows, loom_flow_assets
        >>> graph = build_loom_asset_graph(  # doctest: +SKIP
        ...     [LoomFlowSpec("my_pipelines.orders:orders_flow", config="config/orders")])
        >>> @loom_flow_assets(graph=graph)  # doctest: +SKIP
        ... def orders_flows(context: dg.AssetExecutionContext, loom: LoomDeployResource):
        ...     context.log.info("before the deploy: e.g. announce it")
        ...     yield from deploy_loom_flows(context, loom)
        ...     context.log.info("after the deploy: e.g. warm a cache")
        >>> defs = dg.Definitions(  # doctest: +SKIP
        ...     assets=[orders_flows, *graph.external_specs], resources={"loom": LoomDeployResource()})
    """
    if (flows is None) == (graph is None):
        raise TypeError(
            "loom_flow_assets takes flows=[LoomFlowSpec, ...] or graph=<LoomAssetGraph>, one of them"
        )
    if graph is not None and translator is not None:
        raise TypeError("pass translator= to build_loom_asset_graph, not with graph=")
    chosen = graph if graph is not None else build_loom_asset_graph(flows or [], translator, state=state)
    nodes = tuple(chosen.flows)
    if not nodes:
        raise ValueError("loom_flow_assets needs at least one flow")

    def decorator(fn: Callable[..., Any]) -> dg.AssetsDefinition:
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(f"@loom_flow_assets does not take async functions ({fn.__name__})")

        @functools.wraps(fn)
        def body(*args: Any, **kwargs: Any) -> Iterator[Any]:
            config = kwargs.get("config")
            bound = _Body(nodes, config if isinstance(config, LoomDeployConfig) else None)
            token = _ACTIVE.set(bound)
            try:
                result = fn(*args, **kwargs)
            finally:
                _ACTIVE.reset(token)
            if inspect.isgenerator(result):
                yield from _drive(result, bound)
            elif isinstance(result, (list, tuple)):
                yield from result
            elif result is not None:
                yield result

        return dg.multi_asset(
            specs=[node.spec for node in nodes],
            check_specs=[deploy_check_spec(node.spec.key) for node in nodes],
            name=name or fn.__name__,
            pool=pool,
            description=description or fn.__doc__ or "Deploys loom flows (materialize = deploy).",
            can_subset=True,
        )(body)

    return decorator


def deploy_loom_flows(
    context: dg.AssetExecutionContext,
    loom: LoomDeployResource,
    config: LoomDeployConfig | None = None,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Deploy each flow of the running ``@loom_flow_assets`` body that the run selected.

    Yields each flow's ``MaterializeResult`` (and ``deploy_checks`` result), as ``build_loom_defs``'s
    ``loom_deploy`` op does (``deploy_flow_nodes``). A flow that fails does not stop the others; the
    failures are raised together at the end.
    *config* defaults to the body's own ``config: LoomDeployConfig`` parameter, else the defaults.

    Example:
        >>> def body(context, loom):  # inside a function decorated with @loom_flow_assets
        ...     yield from deploy_loom_flows(context, loom)
    """
    active = _ACTIVE.get()
    if active is None:
        raise RuntimeError("deploy_loom_flows is called from the body of a @loom_flow_assets function")
    yield from deploy_flow_nodes(context, active.nodes, config or active.config or LoomDeployConfig(), loom)


def _drive(generator: Iterator[Any], bound: _Body) -> Iterator[Any]:
    """Iterate the body's generator with *bound* active only while the body's own code runs."""
    try:
        while True:
            token = _ACTIVE.set(bound)
            try:
                item = next(generator)
            except StopIteration:
                return
            finally:
                _ACTIVE.reset(token)
            yield item
    finally:
        close = getattr(generator, "close", None)
        if close is not None:
            close()


__all__ = ["deploy_loom_flows", "loom_flow_assets"]
