"""The Delta table check (the table's schema through deltalake): a table that does not exist yet is fine,
loom creates it on the first write (reported as *pending*); an existing one must have exactly the
payload's columns (delta-rs refuses an append whose columns differ in number) with compatible types."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from loom_dagster.core.redact import redact_url
from loom_dagster.core.sinks.connections import delta_storage_options, local_delta_log
from loom_dagster.core.sinks.ddl import DELTA_TYPE
from loom_dagster.core.sinks.payload import PayloadField, compatible
from loom_dagster.core.sinks.table_report import (
    EXTRA_COLUMN,
    MISSING_COLUMN,
    TYPE_MISMATCH,
    UNREACHABLE,
    SinkToCheck,
    TableOutcome,
    TableProblem,
)


def check_delta(sink: SinkToCheck, fields: Sequence[PayloadField], timeout_s: float) -> TableOutcome:
    """Check the schema of *sink*'s Delta table, when it exists."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    uri = sink.target.connect_url
    shown = redact_url(uri)
    pending = (f"{sink.label} (Delta table at {shown}: will be created by loom on its first write)",)
    log_dir = local_delta_log(uri)
    if log_dir is not None and not log_dir.is_dir():
        return TableOutcome(pending=pending)
    options = delta_storage_options(uri, sink.target.storage_options, timeout_s)
    try:
        table = DeltaTable(uri, storage_options=options or None)
    except TableNotFoundError:
        return TableOutcome(pending=pending)
    except OSError as exc:
        detail = f"cannot reach the Delta table at {shown}: {exc}"
        return TableOutcome(
            problems=(sink.problem(UNREACHABLE, detail, "check the sink's uri and storage_options"),)
        )
    actual = {f.name: f for f in table.schema().fields}
    problems = _compare_delta(sink, fields, actual, shown)
    return TableOutcome(problems=tuple(problems), checked=(sink.label,))


def _compare_delta(
    sink: SinkToCheck, fields: Sequence[PayloadField], actual: Mapping[str, Any], shown: str
) -> list[TableProblem]:
    problems = []
    payload = {f.name for f in fields}
    rewrite = (
        "rewrite the table with the payload's schema (write_deltalake(uri, data, mode='overwrite', "
        "schema_mode='overwrite')), or move the sink's uri to a new table"
    )
    for f in fields:
        found = actual.get(f.name)
        if found is None:
            delta_type = DELTA_TYPE.get(f.category or "", f.type)
            detail = f"column {f.name!r} ({f.type}, payload field of {sink.record.payload_type}) is missing from the Delta table at {shown}"
            fix = (
                f"from deltalake import DeltaTable, Field; DeltaTable({shown!r}).alter.add_columns("
                f"[Field({f.name!r}, {delta_type!r}, nullable=True)])"
            )
            problems.append(sink.problem(MISSING_COLUMN, detail, fix))
            continue
        found_type = _delta_type_text(found.type)
        if not compatible(f.category, delta_category(found.type)):
            detail = f"column {f.name!r} of the Delta table at {shown} is {found_type}, but the payload field of {sink.record.payload_type} is {f.type}"
            problems.append(sink.problem(TYPE_MISMATCH, detail, rewrite))
        elif f.nullable and not found.nullable:
            detail = f"column {f.name!r} of the Delta table at {shown} is not nullable, but the payload field admits None: a batch with None would fail"
            problems.append(sink.problem(TYPE_MISMATCH, detail, rewrite))
    for name, found in actual.items():
        if name in payload:
            continue
        detail = (
            f"column {name!r} ({_delta_type_text(found.type)}) of the Delta table at {shown} is not a field of the "
            f"payload {sink.record.payload_type}: delta-rs refuses appends whose columns differ from the table's"
        )
        fix = f"add a field {name!r} to the payload, or drop the column: {rewrite}"
        problems.append(sink.problem(EXTRA_COLUMN, detail, fix))
    return problems


def delta_category(delta_type: Any) -> str | None:
    """Category of a deltalake schema type."""
    kind = type(delta_type).__name__
    if kind == "ArrayType":
        return "list"
    if kind == "MapType":
        return "map"
    if kind == "StructType":
        return "struct"
    name = str(getattr(delta_type, "type", ""))
    for prefixes, category in (
        (("string",), "string"),
        (("long", "integer", "short", "byte"), "integer"),
        (("double", "float", "decimal"), "floating"),
        (("boolean",), "boolean"),
        (("binary",), "binary"),
        (("timestamp",), "timestamp"),
        (("date",), "date"),
    ):
        if name.startswith(prefixes):
            return category
    return None


def _delta_type_text(delta_type: Any) -> str:
    name = getattr(delta_type, "type", None)
    return str(name) if isinstance(name, str) else type(delta_type).__name__
