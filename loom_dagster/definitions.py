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
from loom_dagster.core.sensor_settings import LoomSensorSettings, SinkHealthSettings
from loom_dagster.freshness_policy import FreshnessSettingsError
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

    Every sink table gets a Dagster ``FreshnessPolicy`` from ``sensors.sink_health`` (its warn/fail
    windows, or a cron deadline), judged by Dagster's freshness daemon on the materializations the sink
    health sensor reports; the *translator* is given those settings (``get_freshness_policy`` changes a
    policy). Per-sink settings are keyed by the sink's final asset key (after the translator).

    Example:
        >>> defs = build_loom_defs([LoomFlowSpec(  # doctest: +SKIP
        ...     "definitions.flows.orders:orders_flow", config="definitions/config/orders",
        ...     environment="development")], redeploy_cron="0 3 * * *")
    """
    with gc_paused():
        settings = sensors or LoomSensorSettings()
        graph = build_loom_asset_graph(flows, translator_for(translator, settings.sink_health), state=state)
        check_sink_settings_keys(graph, settings.sink_health)
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


def translator_for(translator: LoomTranslator | None, sink_health: SinkHealthSettings) -> LoomTranslator:
    """*translator* (default ``LoomTranslator()``) bound to *sink_health*, the settings of the sensor
    that reports the materializations its freshness policies are judged on; the caller's object is
    left as it is.

    Raises:
        FreshnessSettingsError: the translator was made with other sink health settings.
    """
    chosen = translator or LoomTranslator()
    own = getattr(chosen, "__dict__", {}).get("sink_health")
    if own is not None and own != sink_health:
        raise FreshnessSettingsError(
            f"{type(chosen).__name__} was given sink_health settings that differ from those of "
            "build_loom_defs(sensors=...) (the sink health sensor's, whose materializations the freshness "
            "policies judge): give them once, as build_loom_defs(sensors=LoomSensorSettings(sink_health=...)), "
            "and make the translator without sink_health"
        )
    return chosen.with_sink_health(sink_health)


def check_sink_settings_keys(graph: LoomAssetGraph, sink_health: SinkHealthSettings) -> None:
    """Per-sink freshness settings must name sink assets of *graph* (by their final keys).

    Raises:
        FreshnessSettingsError: a key is no sink asset here; names it and the sink keys there are.
    """
    keys = {
        node.sink_keys[sink.slot]
        for node in graph.flows
        for sink in node.compiled.flow.storage_sinks
        if sink.slot in node.sink_keys
    }
    unknown = sorted(set(sink_health.freshness) - keys)
    if unknown:
        raise FreshnessSettingsError(
            f"SinkHealthSettings.freshness names {', '.join(map(repr, unknown))}, not a sink asset of this "
            f"code location: key it by a sink's asset key as the translator makes it (with any prefix); "
            f"the sink assets are {', '.join(sorted(keys)) or 'none'}"
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
        sensors.append(
            build_sink_health_sensor(
                graph,
                settings.sink_health,
                default_status=status,
                end_to_end_step_s=float(settings.kafka_lag.interval_s),
            )
        )
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
