"""The SQL table check: SQLAlchemy inspector (through a sync driver, or the async driver's ``run_sync``
when the sync one is not installed). The table exists; every payload field has a column of a compatible
type that accepts NULL when the field admits None; no NOT NULL column without a default is left unfilled.
With ``create_missing`` a missing table is created with loom's own mapping."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from loom_dagster.core.redact import redact_url
from loom_dagster.core.sinks.connections import is_connect_error, run_sql, sql_dialect, sqlite_file
from loom_dagster.core.sinks.ddl import (
    loom_sql_table,
    sql_change_type,
    sql_create_ddl,
    sql_drop_not_null,
    sql_quote,
    sql_table_name,
    sql_type_text,
)
from loom_dagster.core.sinks.payload import PayloadField, compatible
from loom_dagster.core.sinks.table_report import (
    ERROR,
    EXTRA_NOT_NULL,
    MISSING_COLUMN,
    MISSING_TABLE,
    TYPE_MISMATCH,
    UNREACHABLE,
    SinkToCheck,
    TableOutcome,
    TableProblem,
)

if TYPE_CHECKING:
    import sqlalchemy as sa


def check_sql(
    sink: SinkToCheck, fields: Sequence[PayloadField], create_missing: bool, timeout_s: float
) -> TableOutcome:
    """Check (and with *create_missing*, create) the SQL table of *sink*."""
    import sqlalchemy as sa

    url = sink.target.connect_url
    schema, _, name = sink.record.table.rpartition(".")
    where = f"SQL database {sink.record.database!r} ({redact_url(url)})"
    table = loom_sql_table(sink.payload, name, schema or None)
    dialect = sql_dialect(url)
    db_file = sqlite_file(url)
    try:
        if db_file is not None and not db_file.exists():
            columns = None  # loom's driver would create the file; the table is missing either way
        else:
            columns = run_sql(url, lambda c: reflect_columns(c, name, schema or None), timeout_s=timeout_s)
        created: tuple[str, ...] = ()
        if columns is None and create_missing:
            if db_file is not None:
                db_file.parent.mkdir(parents=True, exist_ok=True)
            run_sql(url, lambda c: table.create(c, checkfirst=True), timeout_s=timeout_s, writable=True)
            created = (sink.label,)
            columns = run_sql(url, lambda c: reflect_columns(c, name, schema or None), timeout_s=timeout_s)
    except sa.exc.SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        return _sql_failure(sink, where, cause)
    except (OSError, TimeoutError, ImportError) as exc:
        return _sql_failure(sink, where, exc)
    if columns is None:
        ddl = sql_create_ddl(table, dialect)
        detail = f"table {sink.record.table!r} does not exist in {where}"
        return TableOutcome(problems=(sink.problem(MISSING_TABLE, detail, ddl),))
    problems = _compare_sql(sink, table, fields, columns, dialect, where)
    return TableOutcome(problems=tuple(problems), created=created, checked=(sink.label,))


def _sql_failure(sink: SinkToCheck, where: str, exc: BaseException) -> TableOutcome:
    if isinstance(exc, ImportError):
        detail = f"cannot open {where}: its driver is not installed ({exc}), nor its sync counterpart"
        fix = f"install the {exc.name or 'driver'} package in the environment that deploys the flow"
        return TableOutcome(problems=(sink.problem(ERROR, detail, fix),))
    if is_connect_error(exc):
        detail = f"cannot connect to {where} within the timeout: {type(exc).__name__}: {exc}"
        fix = (
            f"start the database or make it reachable from this host, and check database.{sink.record.database}.url "
            "in the flow's config"
        )
        return TableOutcome(problems=(sink.problem(UNREACHABLE, detail, fix),))
    return TableOutcome(problems=(sink.problem(ERROR, f"cannot read {where}: {type(exc).__name__}: {exc}"),))


def reflect_columns(conn: Any, name: str, schema: str | None) -> list[dict[str, Any]] | None:
    """The table's columns (inspector dicts, ``autofilled`` added), or ``None`` when it does not exist."""
    import sqlalchemy as sa

    inspector = sa.inspect(conn)
    if not inspector.has_table(name, schema=schema):
        return None
    columns = [dict(c) for c in inspector.get_columns(name, schema=schema)]
    primary = inspector.get_pk_constraint(name, schema=schema).get("constrained_columns") or []
    rowid = conn.dialect.name == "sqlite" and len(primary) == 1
    for column in columns:
        column["autofilled"] = bool(
            column.get("default") is not None
            or column.get("autoincrement") is True
            or column.get("identity")
            or column.get("computed")
            or (rowid and column["name"] == primary[0] and isinstance(column["type"], sa.Integer))
        )
    return columns


def _compare_sql(
    sink: SinkToCheck,
    table: sa.Table,
    fields: Sequence[PayloadField],
    columns: Sequence[Mapping[str, Any]],
    dialect: Any,
    where: str,
) -> list[TableProblem]:
    actual = {str(c["name"]): c for c in columns}
    lowered = {k.lower(): v for k, v in actual.items()}
    payload = {f.name for f in fields}
    problems = []
    qualified = sql_table_name(table, dialect)
    for column in table.columns:
        found = actual.get(column.name) or lowered.get(column.name.lower())
        expected_type = sql_type_text(column.type, dialect)
        if found is None:
            detail = (
                f"column {column.name!r} ({expected_type}, payload field of {sink.record.payload_type}) is "
                f"missing from table {sink.record.table!r} in {where}"
            )
            fix = f"ALTER TABLE {qualified} ADD COLUMN {sql_quote(column.name, dialect)} {expected_type};"
            problems.append(sink.problem(MISSING_COLUMN, detail, fix))
            continue
        problems += _sql_column_problems(sink, table, column, found, dialect, where)
    for name, found in actual.items():
        if name in payload or name.lower() in {p.lower() for p in payload}:
            continue
        if found.get("nullable", True) or found.get("autofilled"):
            continue
        detail = (
            f"column {name!r} of table {sink.record.table!r} in {where} is NOT NULL without a default, and "
            f"the payload {sink.record.payload_type} has no field {name!r}: every insert would fail"
        )
        problems.append(sink.problem(EXTRA_NOT_NULL, detail, sql_drop_not_null(table, name, found, dialect)))
    return problems


def _sql_column_problems(
    sink: SinkToCheck,
    table: sa.Table,
    column: sa.Column[Any],
    found: Mapping[str, Any],
    dialect: Any,
    where: str,
) -> list[TableProblem]:
    expected_type = sql_type_text(column.type, dialect)
    actual_type = sql_type_text(found["type"], dialect)
    name = str(found["name"])
    problems = []
    if not compatible(sa_category(column.type), sa_category(found["type"])):
        detail = (
            f"column {name!r} of table {sink.record.table!r} in {where} is {actual_type}, but the payload "
            f"field {column.name!r} of {sink.record.payload_type} is written as {expected_type}"
        )
        problems.append(
            sink.problem(TYPE_MISMATCH, detail, sql_change_type(table, name, expected_type, dialect))
        )
    if column.nullable and not found.get("nullable", True):
        detail = (
            f"column {name!r} of table {sink.record.table!r} in {where} is NOT NULL, but the payload field "
            f"{column.name!r} of {sink.record.payload_type} admits None: a row with None would fail"
        )
        problems.append(sink.problem(TYPE_MISMATCH, detail, sql_drop_not_null(table, name, found, dialect)))
    return problems


def sa_category(sa_type: Any) -> str | None:
    import sqlalchemy as sa

    for types, category in (
        ((sa.Boolean,), "boolean"),
        ((sa.Integer,), "integer"),
        ((sa.Numeric,), "floating"),
        ((sa.DateTime,), "timestamp"),
        ((sa.Date,), "date"),
        ((sa.Time,), "time"),
        ((sa.Uuid,), "uuid"),
        ((sa.JSON,), "json"),
        ((sa.ARRAY,), "list"),
        ((sa.LargeBinary, sa.BINARY, sa.VARBINARY), "binary"),
        ((sa.String,), "string"),
    ):
        if isinstance(sa_type, types):
            return category
    return None
