"""``build_loom_defs``: the one call a code location needs."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence

import dagster as dg

from loom_dagster.asset_graph import LoomAssetGraph
from loom_dagster.assets import RESOURCE_KEY, assets_from_graph, build_loom_asset_graph
from loom_dagster.core.flows.defs_state import DefsState
from loom_dagster.core.flows.spec import LoomFlowSpec
from loom_dagster.core.sensor_settings import LoomSensorSettings
from loom_dagster.jobs.reset_offsets import build_reset_offsets_job
from loom_dagster.jobs.undeploy import build_undeploy_job
from loom_dagster.resource import LoomDeployResource
from loom_dagster.schedules import build_redeploy_schedule
from loom_dagster.translator import LoomTranslator


def build_loom_defs(
    flows: Sequence[LoomFlowSpec],
    *,
    translator: LoomTranslator | None = None,
    resource: LoomDeployResource | None = None,
    sensors: LoomSensorSettings | None = None,
    redeploy_cron: str | None = None,
    redeploy_flows: Sequence[str] | None = None,
    redeploy_skip_unchanged: bool = True,
    state: DefsState | bool | None = True,
) -> dg.Definitions:
    """Dagster definitions for loom flows: assets with lineage, the deploy resource, the undeploy and
    ``loom_reset_offsets`` jobs, the health / lag / sink sensors with their declared checks, and (opt-in) a
    redeploy schedule.

    Loading compiles nothing when the defs *state* is fresh: the flows' secret-free records come from
    it (``loom_dagster.core.flows.defs_state``; refreshed at load when missing or stale, or ahead of time with
    ``loom-dagster refresh``), and the sensors compile a flow's plan (its credentials) on first use.
    ``state=False`` compiles every flow at load instead.

    Example:
        >>> defs = build_loom_defs([LoomFlowSpec(  # doctest: +SKIP
        ...     "definitions.flows.orders:orders_flow", config="definitions/config/orders",
        ...     environment="development")], redeploy_cron="0 3 * * *")
    """
    with gc_paused():
        graph = build_loom_asset_graph(flows, translator, state=state)
        settings = sensors or LoomSensorSettings()
        sensor_defs, check_defs = build_loom_sensors(graph, settings)
        schedules = []
        if redeploy_cron:
            schedules.append(
                build_redeploy_schedule(
                    graph, redeploy_cron, flows=redeploy_flows, skip_unchanged=redeploy_skip_unchanged
                )
            )
    return dg.Definitions(
        assets=assets_from_graph(graph),
        asset_checks=check_defs,
        jobs=[
            build_undeploy_job([node.compiled.flow.name for node in graph.flows]),
            build_reset_offsets_job({node.compiled.flow.name: node.spec.key for node in graph.flows}),
        ],
        sensors=sensor_defs,
        schedules=schedules,
        resources={RESOURCE_KEY: resource or LoomDeployResource()},
    )


FLOW_CHECKS_OP = "loom_flow_checks"
"""The ops of the flows' ``job_running`` and ``kafka_lag`` checks (``loom_flow_checks``, ``_2``...)."""


def build_loom_sensors(
    graph: LoomAssetGraph, settings: LoomSensorSettings
) -> tuple[list[dg.SensorDefinition], list[dg.AssetChecksDefinition]]:
    """The enabled sensors and every check they report (declared so the UI lists them): a flow's
    ``job_running`` and ``kafka_lag`` in one op (``loom_flow_checks``), the sinks' ``freshness`` in
    ``loom_sink_freshness``."""
    from loom_dagster.sensors.check_ops import flow_check_ops
    from loom_dagster.sensors.health import build_job_health_sensor, job_running_check_kind
    from loom_dagster.sensors.lag import build_kafka_lag_sensor, kafka_lag_check_kind, kafka_lag_flows
    from loom_dagster.sensors.sinks import build_sink_freshness_checks, build_sink_health_sensor

    status = (
        dg.DefaultSensorStatus.RUNNING if settings.default_status_running else dg.DefaultSensorStatus.STOPPED
    )
    sensors: list[dg.SensorDefinition] = []
    checks: list[dg.AssetChecksDefinition] = []
    if not graph.flows:
        return sensors, checks
    kinds = []
    if settings.job_health.enabled:
        sensors.append(build_job_health_sensor(graph, settings.job_health, default_status=status))
        kinds.append(job_running_check_kind(graph))
    if settings.kafka_lag.enabled and kafka_lag_flows(graph):
        sensors.append(build_kafka_lag_sensor(graph, settings.kafka_lag, default_status=status))
        kinds.append(kafka_lag_check_kind(graph, settings.kafka_lag))
    checks += flow_check_ops(
        FLOW_CHECKS_OP,
        [kind for kind in kinds if kind is not None],
        description="One-shot job_running / kafka_lag of loom flows (the sensors report them on their ticks).",
    )
    if settings.sink_health.enabled and any(node.compiled.flow.storage_sinks for node in graph.flows):
        sensors.append(build_sink_health_sensor(graph, settings.sink_health, default_status=status))
        checks += build_sink_freshness_checks(graph, settings.sink_health)
    return sensors, checks


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while definitions are built, then restore it.

    A build allocates tens of thousands of long-lived objects (specs, ops, checks), which trips full
    collections; each one walks every object Dagster's import made (~50 ms at 200 flows, a tenth of
    the build). Nothing built here is garbage, so deferring the collector loses nothing.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
