"""Sink tables checked physically before launch: each ``IntoTable`` sink's real table against its payload.

``check_sink_tables`` reads every storage sink of a compiled flow from the real system (one check per
backend: ``check_sql``, ``check_clickhouse``, ``check_delta``) and returns a ``SinkTablesReport`` listing
each difference (``TableProblem``) with its asset key and the DDL (or remedy) that fixes it.
``create_missing=True`` creates missing SQL / ClickHouse tables from the payload struct (SQL through loom's
own mapping, ``loom.core.backend.sqlalchemy.sa_table_for``, the one its sink inserts with). Every
connection is bounded by ``timeout_s``; an unreachable database is a problem, never a hang or an
exception. Texts never carry a password (``loom_dagster.core.redact`` + the sink's known secrets).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from loom_dagster.core.flows.describe import storage_sink
from loom_dagster.core.flows.records import SinkBackend
from loom_dagster.core.sinks.check_clickhouse import check_clickhouse
from loom_dagster.core.sinks.check_delta import check_delta
from loom_dagster.core.sinks.check_sql import check_sql
from loom_dagster.core.sinks.payload import payload_fields
from loom_dagster.core.sinks.table_report import ERROR, SinkTablesReport, SinkToCheck, TableOutcome
from loom_dagster.core.sinks.targets import target_for

if TYPE_CHECKING:
    from loom_dagster.core.flows.catalog import CompiledFlow


def check_sink_tables(
    compiled: CompiledFlow,
    *,
    sink_keys: Mapping[str, str] | None = None,
    create_missing: bool = False,
    timeout_s: float = 10.0,
    backends: Collection[str] | None = None,
) -> SinkTablesReport:
    """Check (and with *create_missing*, create) the real table of every storage sink of *compiled*.

    *sink_keys* maps a sink's slot (``LoomStorageSink.slot``) to its asset key; *backends* (``"sql"``,
    ``"clickhouse"``, ``"delta"``) limits the check to those sinks. Never raises for a table or
    database problem: each is a ``TableProblem`` of the report.
    """
    sinks = _sinks(compiled, sink_keys or {})
    if backends is not None:
        sinks = [s for s in sinks if s.record.backend.value in {str(b) for b in backends}]

    def one(sink: SinkToCheck) -> TableOutcome:
        return _check_one(sink, create_missing=create_missing, timeout_s=timeout_s)

    if len(sinks) > 1:
        with ThreadPoolExecutor(max_workers=min(8, len(sinks)), thread_name_prefix="sink-tables") as pool:
            outcomes = list(pool.map(one, sinks))
    else:
        outcomes = [one(s) for s in sinks]
    return SinkTablesReport(
        problems=tuple(p for o in outcomes for p in o.problems),
        created=tuple(c for o in outcomes for c in o.created),
        checked=tuple(c for o in outcomes for c in o.checked),
        pending=tuple(c for o in outcomes for c in o.pending),
    )


def _sinks(compiled: CompiledFlow, sink_keys: Mapping[str, str]) -> list[SinkToCheck]:
    flow = compiled.flow
    records = {tuple(s.node_path): s for s in flow.storage_sinks}
    found = []
    for path, compiled_sink in sorted(compiled.plan.terminal_storage_sinks.items()):
        record = records.get(tuple(path)) or storage_sink(flow.name, tuple(path), compiled_sink)
        key = sink_keys.get(record.slot)
        label = key or f"{flow.name}/{record.slot}"
        target = target_for(label, record, compiled_sink, "")
        payload = getattr(compiled_sink.node, "payload", None)
        found.append(SinkToCheck(label, key, record, target, payload))
    return found


def _check_one(sink: SinkToCheck, *, create_missing: bool, timeout_s: float) -> TableOutcome:
    try:
        fields = payload_fields(sink.payload)
        if sink.record.backend is SinkBackend.DELTA:
            return check_delta(sink, fields, timeout_s)
        if sink.record.backend is SinkBackend.CLICKHOUSE:
            return check_clickhouse(sink, fields, create_missing, timeout_s)
        return check_sql(sink, fields, create_missing, timeout_s)
    except Exception as exc:  # a bug or an unexpected driver error must still name the sink
        detail = f"could not check the table: {type(exc).__name__}: {exc}"
        return TableOutcome(problems=(sink.problem(ERROR, detail, None),))
