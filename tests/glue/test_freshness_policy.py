"""Every sink table's Dagster ``FreshnessPolicy``, from ``SinkHealthSettings``: per sink and by default,
a cron deadline, overridden through the translator (Python) or ``translation`` (YAML), none when the
sink health sensor is disabled; settings Dagster cannot take fail the load naming the sink and the fix.

The example code location (definitions/: three sink tables) is loaded for real, with its defs state.
"""

from __future__ import annotations

import textwrap
from datetime import timedelta

import dagster as dg
import pytest
from dagster._core.definitions.freshness import CronFreshnessPolicy, TimeWindowFreshnessPolicy

from loom_dagster import LoomFlowSpec, LoomSensorSettings, build_loom_asset_graph, build_loom_defs
from loom_dagster.components.loom_flows.component import PrefixedLoomTranslator
from loom_dagster.core.flows.records import LoomFlow, LoomStorageSink
from loom_dagster.core.sensor_settings import SinkFreshness, SinkHealthSettings
from loom_dagster.freshness_policy import FreshnessSettingsError, freshness_policy
from loom_dagster.translator import LoomTranslator
from tests.glue.test_component import EXAMPLE_FLOWS_YAML, chain_text, example_specs, yaml_component

DELTA = "delta/orders_enriched"
CLICKHOUSE = "clickhouse/analytics/orders_enriched"
SQL = "sql/warehouse/order_ledger"
SINKS = {DELTA, CLICKHOUSE, SQL}


def policies(defs: dg.Definitions, prefix: str = "") -> dict[str, dg.FreshnessPolicy | None]:
    """The freshness policy of every asset (keys with *prefix* stripped)."""
    graph = defs.resolve_asset_graph()
    return {
        key.to_user_string().removeprefix(prefix): graph.get(key).freshness_policy
        for key in graph.get_all_asset_keys()
    }


def window(policy: dg.FreshnessPolicy | None) -> tuple[float, float | None]:
    assert isinstance(policy, TimeWindowFreshnessPolicy), policy
    warn = policy.warn_window.to_timedelta().total_seconds() if policy.warn_window else None
    return policy.fail_window.to_timedelta().total_seconds(), warn


def sensors(**sink_health: object) -> LoomSensorSettings:
    return LoomSensorSettings(sink_health=SinkHealthSettings(**sink_health))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def default_defs() -> dg.Definitions:
    return build_loom_defs(example_specs())


def test_every_sink_table_gets_the_default_window_and_nothing_else_a_policy(
    default_defs: dg.Definitions,
) -> None:
    found = policies(default_defs)
    with_policy = {key for key, policy in found.items() if policy is not None}
    assert with_policy == SINKS  # not the flows, not the topics
    for key in SINKS:
        assert window(found[key]) == (3600.0, 900.0)
    # one shared instance per distinct window, as the table schemas are
    assert found[DELTA] is found[CLICKHOUSE] is found[SQL]


def test_per_sink_windows_and_cron_deadline_come_from_the_settings() -> None:
    settings = sensors(
        default_freshness=SinkFreshness(warn_after_s=600, fail_after_s=7200),
        freshness={
            DELTA: SinkFreshness(warn_after_s=120, fail_after_s=300),
            SQL: SinkFreshness(
                deadline_cron="0 9 * * *", cron_lower_bound_s=3600, cron_timezone="Europe/Paris"
            ),
        },
    )
    found = policies(build_loom_defs(example_specs(), sensors=settings))
    assert window(found[DELTA]) == (300.0, 120.0)
    assert window(found[CLICKHOUSE]) == (7200.0, 600.0)
    cron = found[SQL]
    assert isinstance(cron, CronFreshnessPolicy)
    assert (cron.deadline_cron, cron.lower_bound_delta, cron.timezone) == (
        "0 9 * * *",
        timedelta(hours=1),
        "Europe/Paris",
    )


def test_cron_lower_bound_defaults_to_fail_after_s() -> None:
    policy = freshness_policy(SinkFreshness(fail_after_s=1800, deadline_cron="*/30 * * * *"))
    assert isinstance(policy, CronFreshnessPolicy)
    assert (policy.lower_bound_delta, policy.timezone) == (timedelta(minutes=30), "UTC")


def test_no_policy_when_the_sink_health_sensor_is_disabled() -> None:
    defs = build_loom_defs(example_specs(), sensors=sensors(enabled=False))
    assert not any(policy is not None for policy in policies(defs).values())
    assert "loom_sink_health" not in {s.name for s in defs.sensors or []}


class ScratchlessTranslator(LoomTranslator):
    """No policy on the ClickHouse table, a daily deadline on the SQL one, the settings elsewhere."""

    def get_freshness_policy(
        self, sink: LoomStorageSink, flow: LoomFlow, asset_key: dg.AssetKey
    ) -> dg.FreshnessPolicy | None:
        if asset_key.path[0] == "clickhouse":
            return None
        if asset_key.path[0] == "sql":
            return dg.FreshnessPolicy.cron("0 6 * * *", timedelta(hours=6))
        return super().get_freshness_policy(sink, flow, asset_key)


def test_translator_subclass_overrides_the_policy_and_sees_the_sensor_settings() -> None:
    translator = ScratchlessTranslator()
    settings = sensors(freshness={DELTA: SinkFreshness(warn_after_s=60, fail_after_s=120)})
    found = policies(build_loom_defs(example_specs(), translator=translator, sensors=settings))
    assert window(found[DELTA]) == (120.0, 60.0)  # super() used build_loom_defs' sensors settings
    assert found[CLICKHOUSE] is None
    assert isinstance(found[SQL], CronFreshnessPolicy) and found[SQL].deadline_cron == "0 6 * * *"
    assert translator.sink_health == SinkHealthSettings()  # the caller's object is left as it is


def test_translator_settings_that_differ_from_the_sensors_are_refused() -> None:
    translator = LoomTranslator(sink_health=SinkHealthSettings(interval_s=5))
    with pytest.raises(FreshnessSettingsError, match=r"give them once, as build_loom_defs\(sensors="):
        build_loom_defs(example_specs(), translator=translator)
    same = SinkHealthSettings(interval_s=5)
    build_loom_defs(example_specs(), translator=translator, sensors=LoomSensorSettings(sink_health=same))
    # standalone (no build_loom_defs), the translator's own settings make the policy
    flow = build_loom_asset_graph(example_specs()[:1]).flows[0].compiled.flow
    delta = next(sink for sink in flow.storage_sinks if sink.table == "orders_enriched")
    standalone = LoomTranslator(
        sink_health=SinkHealthSettings(default_freshness=SinkFreshness(warn_after_s=61, fail_after_s=62))
    )
    assert window(standalone.get_asset_spec(delta, flow=flow).freshness_policy) == (62.0, 61.0)


def test_settings_are_keyed_by_the_final_asset_key() -> None:
    prefixed = sensors(freshness={f"p/{DELTA}": SinkFreshness(warn_after_s=60, fail_after_s=90)})
    found = policies(
        build_loom_defs(example_specs(), translator=PrefixedLoomTranslator(["p"]), sensors=prefixed), "p/"
    )
    assert window(found[DELTA]) == (90.0, 60.0) and window(found[SQL]) == (3600.0, 900.0)
    # a key that names no sink asset (here: the unprefixed one) is refused, naming the real keys
    unprefixed = sensors(freshness={DELTA: SinkFreshness(warn_after_s=60, fail_after_s=90)})
    with pytest.raises(FreshnessSettingsError) as info:
        build_loom_defs(example_specs(), translator=PrefixedLoomTranslator(["p"]), sensors=unprefixed)
    assert f"'{DELTA}', not a sink asset of this code location" in str(info.value)
    assert f"p/{DELTA}" in str(info.value)


@pytest.mark.parametrize(
    ("freshness", "expected"),
    [
        (SinkFreshness(warn_after_s=30), "warn_after_s is 30, under Dagster's minimum of 60"),
        (SinkFreshness(warn_after_s=600, fail_after_s=600), "warn_after_s (600) is not below fail_after_s"),
        (SinkFreshness(fail_after_s=45), "fail_after_s is 45, under Dagster's minimum of 60"),
        (SinkFreshness(deadline_cron="0 25 * * *"), "deadline_cron '0 25 * * *' is not a valid cron string"),
        (
            SinkFreshness(deadline_cron="*/10 * * * *"),
            "3600 s, longer than the 600 s between ticks of deadline_cron '*/10 * * * *'",
        ),
        (
            SinkFreshness(deadline_cron="0 9 * * *", cron_timezone="Mars/Olympus"),
            "cron_timezone 'Mars/Olympus' is not an IANA time zone",
        ),
    ],
)
def test_settings_dagster_cannot_take_fail_the_load_naming_the_sink(
    freshness: SinkFreshness, expected: str
) -> None:
    with pytest.raises(FreshnessSettingsError) as info:
        build_loom_defs(example_specs(), sensors=sensors(freshness={SQL: freshness}))
    assert expected in str(info.value)
    assert f"freshness settings of sink {SQL}" in str(info.value)


# -- the component ---------------------------------------------------------------------------------

PREFIXED_WITH_SETTINGS = EXAMPLE_FLOWS_YAML + textwrap.dedent(
    """
    key_prefix: [yaml]
    sensors:
      sink_health:
        freshness:
          yaml/delta/orders_enriched: {warn_after_s: 120, fail_after_s: 240}
          yaml/sql/warehouse/order_ledger: {deadline_cron: "30 6 * * 1-5", cron_timezone: Europe/Berlin}
    """
)


def test_component_sink_health_settings_make_the_policies() -> None:
    with yaml_component(PREFIXED_WITH_SETTINGS) as (_, sandbox), sandbox.build_all_defs() as defs:
        found = policies(defs, "yaml/")
    assert window(found[DELTA]) == (240.0, 120.0)
    assert window(found[CLICKHOUSE]) == (3600.0, 900.0)
    cron = found[SQL]
    assert isinstance(cron, CronFreshnessPolicy)
    assert (cron.deadline_cron, cron.timezone, cron.lower_bound_delta) == (
        "30 6 * * 1-5",
        "Europe/Berlin",
        timedelta(hours=1),
    )


def test_component_translation_removes_or_replaces_the_policy() -> None:
    removed = PREFIXED_WITH_SETTINGS + (
        "translation:\n"
        "  freshness_policy: \"{{ None if kind == 'table' and name == 'orders_enriched' "
        'else spec.freshness_policy }}"\n'
    )
    with yaml_component(removed) as (_, sandbox), sandbox.build_all_defs() as defs:
        found = policies(defs, "yaml/")
    assert found[DELTA] is None and found[CLICKHOUSE] is None  # both tables are named orders_enriched
    assert isinstance(found[SQL], CronFreshnessPolicy)

    with yaml_component(PREFIXED_WITH_SETTINGS + "translation: {freshness_policy: null}\n") as (_, sandbox):
        with sandbox.build_all_defs() as defs:
            assert not any(p is not None for p in policies(defs).values())

    with yaml_component(
        PREFIXED_WITH_SETTINGS + 'translation: {freshness_policy: "{{ daily_at_seven(sink) }}"}\n'
    ) as (component_dir, sandbox):
        (component_dir / "template_vars.py").write_text(
            textwrap.dedent(
                """
                from datetime import timedelta

                import dagster as dg


                @dg.template_var
                def daily_at_seven():
                    def policy(sink):
                        if sink is None:
                            return None
                        return dg.FreshnessPolicy.cron("0 7 * * *", timedelta(minutes=30))

                    return policy
                """
            )
        )
        defs_yaml = component_dir / "defs.yaml"
        defs_yaml.write_text(defs_yaml.read_text() + "template_vars_module: .template_vars\n")
        with sandbox.build_all_defs() as defs:
            found = policies(defs, "yaml/")
    for key in SINKS:
        policy = found[key]
        assert isinstance(policy, CronFreshnessPolicy) and policy.deadline_cron == "0 7 * * *", key
    assert found["loom/orders_enrichment"] is None


def test_component_translation_that_rekeys_a_table_keeps_its_settings_by_the_final_key() -> None:
    rekeyed = EXAMPLE_FLOWS_YAML + textwrap.dedent(
        """
        key_prefix: [yaml]
        translation:
          key: "{{ 'lake/' + name if kind == 'table' and sink.backend.value == 'delta' else spec.key.to_user_string() }}"
        sensors:
          sink_health:
            freshness:
              lake/orders_enriched: {warn_after_s: 100, fail_after_s: 200}
        """
    )
    with yaml_component(rekeyed) as (_, sandbox), sandbox.build_all_defs() as defs:
        found = policies(defs)
    assert window(found["lake/orders_enriched"]) == (200.0, 100.0)
    assert window(found[f"yaml/{CLICKHOUSE}"]) == (3600.0, 900.0)


def test_component_bad_cron_and_timezone_are_named_with_their_line() -> None:
    attributes = EXAMPLE_FLOWS_YAML + textwrap.dedent(
        """
        sensors:
          sink_health:
            default_freshness: {deadline_cron: "every morning", cron_timezone: Paris}
        """
    )
    with yaml_component(attributes) as (component_dir, sandbox):
        defs_yaml = component_dir / "defs.yaml"
        line = 1 + next(i for i, x in enumerate(defs_yaml.read_text().splitlines()) if "deadline_cron" in x)
        with pytest.raises(Exception) as info:
            with sandbox.build_all_defs():
                pass
    text = chain_text(info.value)
    assert "2 invalid LoomFlowsComponent attributes" in text
    assert (
        f"{defs_yaml}:{line} - attributes.sensors.sink_health.default_freshness.deadline_cron: "
        "deadline_cron 'every morning' is not a valid cron string: give five fields" in text
    )
    assert "default_freshness.cron_timezone: cron_timezone 'Paris' is not an IANA time zone" in text


def test_component_windows_dagster_cannot_take_name_the_defs_yaml() -> None:
    attributes = EXAMPLE_FLOWS_YAML + "sensors: {sink_health: {default_freshness: {warn_after_s: 10}}}\n"
    with yaml_component(attributes) as (component_dir, sandbox):
        with pytest.raises(Exception) as info:
            with sandbox.build_all_defs():
                pass
    text = chain_text(info.value)
    assert f"{component_dir / 'defs.yaml'}: freshness settings of sink delta/orders_enriched" in text
    assert "warn_after_s is 10, under Dagster's minimum of 60" in text


def test_existing_build_loom_defs_calls_keep_working() -> None:
    defs = build_loom_defs(
        [LoomFlowSpec("definitions.flows.orders:orders_flow", config=example_specs()[0].config)],
        translator=None,
        sensors=None,
    )
    assert window(policies(defs)[DELTA]) == (3600.0, 900.0)
