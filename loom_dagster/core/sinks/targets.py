"""Sink targets: the physical tables loom's flows write, where they live and which flows write them.

``sink_targets`` resolves them from compiled plans (with connection settings), ``declared_sink_targets``
from the flows' records alone (what the sensor and checks are declared with at load). A target keeps its
connection secrets in fields left out of ``repr``; ``scrub`` removes them from any text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

from loom_dagster.core.flows.describe import clickhouse_table
from loom_dagster.core.flows.records import LoomStorageSink, SinkBackend
from loom_dagster.core.redact import REDACTED, is_secret_key, redact_text
from loom_dagster.core.sensor_settings import SinkHealthSettings

if TYPE_CHECKING:
    from loom.streaming.compiler import CompiledStorageSink

    from loom_dagster.core.flows.catalog import CompiledFlow


@dataclass(frozen=True)
class SinkTarget:
    """One physical table to watch: its asset key, where it lives, and which flows write it.

    ``location`` is redacted and safe to show; ``connect_url`` / ``storage_options`` carry secrets and
    are excluded from ``repr``: never put them into metadata or logs.
    """

    asset_key: str
    backend: SinkBackend
    table: str
    database: str | None
    location: str
    flow_names: tuple[str, ...]
    flow_keys: tuple[str, ...]
    timestamp_column: str | None = None
    connect_url: str = field(default="", repr=False)
    storage_options: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Secret strings to scrub from any message about this target."""
        found = [v for k, v in self.storage_options if is_secret_key(k) and v]
        try:
            password = urlsplit(self.connect_url).password
        except ValueError:
            password = None
        if password:
            found += [password, unquote(password), quote(password, safe="")]
        return tuple(s for s in dict.fromkeys(found) if len(s) >= 3)

    def with_writer(self, flow_name: str, flow_key: str) -> SinkTarget:
        """The same target, also written by *flow_name*."""
        if flow_key in self.flow_keys:
            return self
        return replace(self, flow_names=(*self.flow_names, flow_name), flow_keys=(*self.flow_keys, flow_key))


def scrub(text: str, secrets: Sequence[str] = ()) -> str:
    """Remove URL passwords and every known secret string from *text*."""
    cleaned = redact_text(text)
    for secret in secrets:
        cleaned = cleaned.replace(secret, REDACTED)
    return cleaned


FlowSinks = tuple[str, "CompiledFlow", Mapping[str, str]]
"""One flow as the sink targets need it: its asset key, its compiled flow, and its sinks' asset keys by slot."""


def sink_targets(flows: Iterable[FlowSinks], settings: SinkHealthSettings | None = None) -> list[SinkTarget]:
    """One target per sink asset of *flows* (a table written by several flows is one target)."""
    columns = (settings or SinkHealthSettings()).sql_timestamp_columns
    found: dict[str, SinkTarget] = {}
    for flow_key, flow, sink_keys in flows:
        records = {s.node_path: s for s in flow.flow.storage_sinks}
        for path, compiled in sorted(flow.plan.terminal_storage_sinks.items()):
            record = records.get(tuple(path))
            key = sink_keys.get(record.slot) if record is not None else None
            if record is None or key is None:
                continue
            prior = found.get(key)
            found[key] = (
                prior.with_writer(record.flow_name, flow_key)
                if prior is not None
                else target_for(key, record, compiled, flow_key, columns.get(key))
            )
    return sorted(found.values(), key=lambda t: t.asset_key)


def declared_sink_targets(
    flows: Iterable[FlowSinks], settings: SinkHealthSettings | None = None
) -> list[SinkTarget]:
    """``sink_targets`` from the flows' records alone: no plan is compiled and no connection setting is
    filled in (``connect_url`` empty). What the sensor and checks are declared with at load; a tick
    resolves the real targets with ``sink_targets``."""
    columns = (settings or SinkHealthSettings()).sql_timestamp_columns
    found: dict[str, SinkTarget] = {}
    for flow_key, flow, sink_keys in flows:
        for record in sorted(flow.flow.storage_sinks, key=lambda r: r.node_path):
            key = sink_keys.get(record.slot)
            if key is None:
                continue
            prior = found.get(key)
            found[key] = (
                prior.with_writer(record.flow_name, flow_key)
                if prior is not None
                else replace(
                    declared_target(key, record, flow_key),
                    timestamp_column=columns.get(key) if record.backend is SinkBackend.SQL else None,
                )
            )
    return sorted(found.values(), key=lambda t: t.asset_key)


def declared_target(asset_key: str, record: LoomStorageSink, flow_key: str) -> SinkTarget:
    """A sink's target from its record alone (no connection settings yet)."""
    return SinkTarget(
        asset_key=asset_key,
        backend=record.backend,
        table=record.table,
        database=record.database,
        location=record.uri or "",
        flow_names=(record.flow_name,),
        flow_keys=(flow_key,),
    )


def target_for(
    asset_key: str,
    record: LoomStorageSink,
    compiled: CompiledStorageSink,
    flow_key: str,
    timestamp_column: str | None = None,
) -> SinkTarget:
    """The target of one compiled ``IntoTable`` sink (its secrets kept out of ``repr``)."""
    config: Any = compiled.config
    common = declared_target(asset_key, record, flow_key)
    if record.backend is SinkBackend.DELTA:
        options = getattr(config, "storage_options", None) or {}
        return replace(
            common,
            connect_url=str(config.uri),
            storage_options=tuple(sorted((str(k), str(v)) for k, v in options.items())),
        )
    if record.backend is SinkBackend.CLICKHOUSE:
        database, table = clickhouse_table(config.url, config.table)
        return replace(common, table=table, database=database, connect_url=str(config.url))
    db_config = getattr(compiled, "database_config", None)
    url = db_config.url if db_config is not None else getattr(config, "url", "")
    return replace(common, connect_url=str(url), timestamp_column=timestamp_column)
