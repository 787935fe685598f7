"""``build_loom_defs``: the one call a code location needs."""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from loom_dagster.assets import RESOURCE_KEY, assets_from_graph, build_loom_asset_graph
from loom_dagster.jobs import build_undeploy_job
from loom_dagster.resources import LoomDeployResource
from loom_dagster.spec import LoomFlowSpec
from loom_dagster.translator import LoomTranslator


def build_loom_defs(
    flows: Sequence[LoomFlowSpec],
    *,
    translator: LoomTranslator | None = None,
    resource: LoomDeployResource | None = None,
) -> dg.Definitions:
    """Dagster definitions for loom flows: assets with lineage, the deploy resource, the undeploy job.

    Example:
        >>> defs = build_loom_defs([LoomFlowSpec(  # doctest: +SKIP
        ...     "definitions.flows.orders:orders_flow", config="definitions/config",
        ...     environment="development")])
    """
    graph = build_loom_asset_graph(flows, translator)
    return dg.Definitions(
        assets=assets_from_graph(graph),
        jobs=[build_undeploy_job([node.compiled.flow.name for node in graph.flows])],
        resources={RESOURCE_KEY: resource or LoomDeployResource()},
    )
