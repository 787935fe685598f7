"""The ClickHouse table check (``system.columns`` through clickhouse-connect): the table exists and every
payload field has a column of a compatible type, Nullable when the field admits None (ClickHouse fills
omitted columns with their defaults). With ``create_missing`` a missing table (and database) is created."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loom_dagster.core.redact import redact_url
from loom_dagster.core.sinks.connections import clickhouse_client, clickhouse_server_url, is_connect_error
from loom_dagster.core.sinks.ddl import ch_accepts_null, ch_quote, clickhouse_create_ddl, clickhouse_type
from loom_dagster.core.sinks.payload import PayloadField, compatible
from loom_dagster.core.sinks.table_report import (
    ERROR,
    MISSING_COLUMN,
    MISSING_TABLE,
    TYPE_MISMATCH,
    UNREACHABLE,
    SinkToCheck,
    TableOutcome,
    TableProblem,
)

_CH_COLUMNS_SQL = (
    "SELECT name, type, default_kind FROM system.columns "
    "WHERE database = {db:String} AND table = {t:String} ORDER BY position"
)
_CH_DATABASE_SQL = "SELECT count() FROM system.databases WHERE name = {db:String}"


def check_clickhouse(
    sink: SinkToCheck, fields: Sequence[PayloadField], create_missing: bool, timeout_s: float
) -> TableOutcome:
    """Check (and with *create_missing*, create) the ClickHouse table of *sink*."""
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    database, name = sink.target.database or "default", sink.target.table
    server = clickhouse_server_url(sink.target.connect_url)
    where = f"ClickHouse {redact_url(server)}"
    try:
        client = clickhouse_client(sink.target.connect_url, timeout_s)
    except (OperationalError, DatabaseError, OSError) as exc:
        detail = f"cannot connect to {where} within {timeout_s:g}s: {exc}"
        fix = "start ClickHouse or make it reachable from this host, and check the sink's database url in the flow's config"
        return TableOutcome(problems=(sink.problem(UNREACHABLE, detail, fix),))
    params = {"db": database, "t": name}
    try:
        columns = client.query(_CH_COLUMNS_SQL, parameters=params).result_rows
        created: tuple[str, ...] = ()
        if not columns:
            has_database = bool(client.query(_CH_DATABASE_SQL, parameters=params).result_rows[0][0])
            statements = clickhouse_create_ddl(database, name, fields, with_database=not has_database)
            if not create_missing:
                detail = f"table {database}.{name} does not exist ({where})"
                fix = "\n".join(f"{s};" for s in statements)
                return TableOutcome(problems=(sink.problem(MISSING_TABLE, detail, fix),))
            for statement in statements:
                client.command(statement)
            created = (sink.label,)
            columns = client.query(_CH_COLUMNS_SQL, parameters=params).result_rows
    except (OperationalError, DatabaseError, OSError) as exc:
        kind = UNREACHABLE if is_connect_error(exc) else ERROR
        return TableOutcome(
            problems=(sink.problem(kind, f"cannot read table {database}.{name} ({where}): {exc}"),)
        )
    finally:
        client.close()
    actual = {str(n): (str(t), str(k)) for n, t, k in columns}
    problems = _compare_clickhouse(sink, f"{ch_quote(database)}.{ch_quote(name)}", fields, actual, where)
    return TableOutcome(problems=tuple(problems), created=created, checked=(sink.label,))


def _compare_clickhouse(
    sink: SinkToCheck,
    qualified: str,
    fields: Sequence[PayloadField],
    actual: Mapping[str, tuple[str, str]],
    where: str,
) -> list[TableProblem]:
    problems = []
    for f in fields:
        expected = clickhouse_type(f.spec)
        column = ch_quote(f.name)
        if f.name not in actual:
            detail = (
                f"column {f.name!r} ({expected}, payload field of {sink.record.payload_type}) is missing from "
                f"table {sink.target.database}.{sink.target.table} ({where})"
            )
            problems.append(
                sink.problem(
                    MISSING_COLUMN, detail, f"ALTER TABLE {qualified} ADD COLUMN {column} {expected};"
                )
            )
            continue
        found, default_kind = actual[f.name]
        where_column = f"column {f.name!r} of table {sink.target.database}.{sink.target.table} ({where})"
        if default_kind in ("MATERIALIZED", "ALIAS", "EPHEMERAL"):
            detail = f"{where_column} is {default_kind}: loom inserts the payload field {f.name!r} into it, which ClickHouse refuses"
            fix = f"ALTER TABLE {qualified} MODIFY COLUMN {column} REMOVE {default_kind};"
            problems.append(sink.problem(TYPE_MISMATCH, detail, fix))
        elif not compatible(f.category, clickhouse_category(found)):
            detail = f"{where_column} is {found}, but the payload field of {sink.record.payload_type} is {f.type} ({expected})"
            problems.append(
                sink.problem(
                    TYPE_MISMATCH, detail, f"ALTER TABLE {qualified} MODIFY COLUMN {column} {expected};"
                )
            )
        elif f.nullable and ch_accepts_null(expected) and not ch_accepts_null(found):
            detail = f"{where_column} is {found}, not Nullable, but the payload field admits None: a row with None would fail"
            problems.append(
                sink.problem(
                    TYPE_MISMATCH, detail, f"ALTER TABLE {qualified} MODIFY COLUMN {column} {expected};"
                )
            )
    return problems


def clickhouse_category(type_text: str) -> str | None:
    """Category of a ClickHouse column type (``Nullable`` / ``LowCardinality`` looked through)."""
    text = _ch_unwrap(type_text)
    for prefixes, category in (
        (("String", "FixedString", "Enum"), "string"),
        (("Bool",), "boolean"),
        (("Int", "UInt"), "integer"),
        (("Float", "BFloat", "Decimal"), "floating"),
        (("DateTime",), "timestamp"),
        (("Date",), "date"),
        (("UUID",), "uuid"),
        (("Array",), "list"),
        (("Map",), "map"),
        (("Tuple", "JSON", "Object", "Nested", "Variant", "Dynamic"), "struct"),
        (("Time",), "time"),
    ):
        if text.startswith(prefixes):
            return category
    return None


def _ch_unwrap(type_text: str) -> str:
    text = type_text.strip()
    for wrapper in ("LowCardinality(", "Nullable("):
        if text.startswith(wrapper) and text.endswith(")"):
            text = text[len(wrapper) : -1].strip()
    return text
