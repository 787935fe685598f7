"""Dagster ``FreshnessPolicy`` of loom's sink assets, from ``SinkHealthSettings``.

The sink health sensor reports a runless materialization of a sink each time new data lands in it, so
Dagster's freshness daemon can judge the sink's age from those: the per-sink ``warn_after_s`` /
``fail_after_s`` become the policy's ``warn_window`` / ``fail_window``; a ``deadline_cron`` makes it a
cron policy instead. With the sensor disabled nothing reports materializations: no policy.

Policies are shared: one instance per distinct window (a code location has hundreds of sinks and a
handful of distinct settings).
"""

from __future__ import annotations

import functools
from datetime import timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import dagster as dg
from dagster._utils.schedules import get_smallest_cron_interval, is_valid_cron_string

from loom_dagster.core.errors import LoomDagsterError
from loom_dagster.core.sensor_settings import SinkFreshness, SinkHealthSettings

MIN_WINDOW_S = 60.0
"""Dagster's smallest freshness window (``warn_window``, ``fail_window``, ``lower_bound_delta``)."""


class FreshnessSettingsError(LoomDagsterError, ValueError):
    """A sink's freshness settings cannot make a Dagster ``FreshnessPolicy``."""


def sink_freshness_policy(settings: SinkHealthSettings, asset_key: str) -> dg.FreshnessPolicy | None:
    """The policy of the sink asset *asset_key* (its user string, e.g. ``delta/orders``), or ``None``
    when the sink health sensor is disabled (no materializations to judge).

    Example:
        >>> policy = sink_freshness_policy(SinkHealthSettings(), "delta/orders")
        >>> policy.warn_window.to_timedelta(), policy.fail_window.to_timedelta()
        (datetime.timedelta(seconds=900), datetime.timedelta(seconds=3600))

    Raises:
        FreshnessSettingsError: the settings cannot make a policy (window under a minute, warn not
            before fail, bad cron or timezone); names the sink and the fix.
    """
    if not settings.enabled:
        return None
    return freshness_policy(settings.freshness_for(asset_key), asset_key)


def freshness_policy(freshness: SinkFreshness, asset_key: str = "the sink") -> dg.FreshnessPolicy:
    """The policy of one sink's ``SinkFreshness``: a cron deadline when ``deadline_cron`` is set, else
    the warn/fail time window.

    Raises:
        FreshnessSettingsError: as ``sink_freshness_policy``.
    """
    if freshness.deadline_cron is not None:
        lower_bound_s = (
            freshness.cron_lower_bound_s
            if freshness.cron_lower_bound_s is not None
            else freshness.fail_after_s
        )
        return _cron_policy(freshness.deadline_cron, float(lower_bound_s), freshness.cron_timezone, asset_key)
    return _time_window_policy(float(freshness.warn_after_s), float(freshness.fail_after_s), asset_key)


def _time_window_policy(warn_s: float, fail_s: float, asset_key: str) -> dg.FreshnessPolicy:
    problems = []
    if fail_s < MIN_WINDOW_S:
        problems.append(f"fail_after_s is {fail_s:g}, under Dagster's minimum of {MIN_WINDOW_S:g}")
    if warn_s < MIN_WINDOW_S:
        problems.append(f"warn_after_s is {warn_s:g}, under Dagster's minimum of {MIN_WINDOW_S:g}")
    if warn_s >= fail_s:
        problems.append(f"warn_after_s ({warn_s:g}) is not below fail_after_s ({fail_s:g})")
    if problems:
        raise FreshnessSettingsError(
            f"freshness settings of sink {asset_key}: {'; '.join(problems)}. Dagster's "
            f"FreshnessPolicy.time_window needs windows of at least {MIN_WINDOW_S:g} s and warn before "
            "fail: set SinkHealthSettings.freshness[...] (or default_freshness) to e.g. "
            "SinkFreshness(warn_after_s=900, fail_after_s=3600)"
        )
    return _shared_time_window(warn_s, fail_s)


def _cron_policy(cron: str, lower_bound_s: float, timezone: str, asset_key: str) -> dg.FreshnessPolicy:
    where = f"freshness settings of sink {asset_key}"
    problem = cron_problem(cron) or timezone_problem(timezone)
    if problem:
        raise FreshnessSettingsError(f"{where}: {problem}")
    if lower_bound_s < MIN_WINDOW_S:
        raise FreshnessSettingsError(
            f"{where}: the cron lower bound (cron_lower_bound_s, else fail_after_s) is {lower_bound_s:g} s, "
            f"under Dagster's minimum of {MIN_WINDOW_S:g} s: set cron_lower_bound_s to at least "
            f"{MIN_WINDOW_S:g}"
        )
    interval_s = _smallest_interval_s(cron, timezone)
    if lower_bound_s > interval_s:
        raise FreshnessSettingsError(
            f"{where}: the cron lower bound (cron_lower_bound_s, else fail_after_s) is {lower_bound_s:g} s, "
            f"longer than the {interval_s:g} s between ticks of deadline_cron {cron!r}: set "
            f"cron_lower_bound_s to at most {interval_s:g}"
        )
    return _shared_cron(cron, lower_bound_s, timezone)


def cron_problem(cron: str) -> str | None:
    """Why *cron* cannot be a freshness deadline (``None``: it can)."""
    if is_valid_cron_string(cron):
        return None
    return (
        f"deadline_cron {cron!r} is not a valid cron string: give five fields, minute hour day-of-month "
        "month day-of-week, e.g. '0 9 * * *' (09:00 every day)"
    )


def timezone_problem(timezone: str) -> str | None:
    """Why *timezone* is not an IANA time zone (``None``: it is)."""
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return f"cron_timezone {timezone!r} is not an IANA time zone: e.g. 'UTC' or 'Europe/Paris'"
    return None


@functools.cache
def _smallest_interval_s(cron: str, timezone: str) -> float:
    return get_smallest_cron_interval(cron, timezone).total_seconds()


@functools.cache
def _shared_time_window(warn_s: float, fail_s: float) -> dg.FreshnessPolicy:
    return dg.FreshnessPolicy.time_window(
        fail_window=timedelta(seconds=fail_s), warn_window=timedelta(seconds=warn_s)
    )


@functools.cache
def _shared_cron(cron: str, lower_bound_s: float, timezone: str) -> dg.FreshnessPolicy:
    return dg.FreshnessPolicy.cron(
        deadline_cron=cron, lower_bound_delta=timedelta(seconds=lower_bound_s), timezone=timezone
    )
