"""DDL (and remedies) that make a sink's table fit its payload: SQL through SQLAlchemy's compiler and
loom's own mapping (``sa_table_for``), ClickHouse ``CREATE``/``ALTER`` text, Delta ``alter`` calls."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from loom_dagster.core.sinks.payload import PayloadField, payload_fields

if TYPE_CHECKING:
    import sqlalchemy as sa
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def loom_sql_table(payload: Any, name: str, schema: str | None = None) -> sa.Table:
    """The table loom's SQLAlchemy sink inserts into (``sa_table_for``: same columns and types), with
    NOT NULL on the fields that do not admit None (loom leaves every column nullable: it issues no DDL)."""
    import sqlalchemy as sa
    from loom.core.backend.sqlalchemy import sa_table_for

    source = sa_table_for(payload, name)
    nullable = {f.name: f.nullable for f in payload_fields(payload)}
    columns = [sa.Column(c.name, c.type, nullable=nullable.get(c.name, True)) for c in source.columns]
    return sa.Table(name, sa.MetaData(), *columns, schema=schema)


def sql_create_ddl(table: sa.Table, dialect: Any) -> str:
    """``CREATE TABLE`` for *table* in *dialect*."""
    from sqlalchemy.schema import CreateTable

    text = str(CreateTable(table).compile(dialect=dialect)).replace("\t", "  ")
    return "\n".join(line.rstrip() for line in text.strip().splitlines()) + ";"


def sql_drop_not_null(table: sa.Table, name: str, found: Mapping[str, Any], dialect: Any) -> str:
    qualified, column = sql_table_name(table, dialect), sql_quote(name, dialect)
    if dialect.name == "postgresql":
        return f"ALTER TABLE {qualified} ALTER COLUMN {column} DROP NOT NULL;"
    if dialect.name in ("mysql", "mariadb"):
        return f"ALTER TABLE {qualified} MODIFY {column} {sql_type_text(found['type'], dialect)} NULL;"
    return (
        f"{dialect.name} cannot drop NOT NULL in place: recreate table {qualified} with column {column} "
        f"nullable or with a DEFAULT (copying its rows), or add a field {name!r} to the payload"
    )


def sql_change_type(table: sa.Table, name: str, expected_type: str, dialect: Any) -> str:
    qualified, column = sql_table_name(table, dialect), sql_quote(name, dialect)
    if dialect.name == "postgresql":
        return f"ALTER TABLE {qualified} ALTER COLUMN {column} TYPE {expected_type} USING {column}::{expected_type};"
    if dialect.name in ("mysql", "mariadb"):
        return f"ALTER TABLE {qualified} MODIFY {column} {expected_type};"
    return (
        f"{dialect.name} cannot change a column's type in place: recreate table {qualified} with column "
        f"{column} {expected_type} (copying its rows), or change the payload field's type. The table "
        f"loom expects:\n{sql_create_ddl(table, dialect)}"
    )


def sql_type_text(sa_type: Any, dialect: Any) -> str:
    try:
        return str(sa_type.compile(dialect=dialect))
    except Exception:  # a reflected type the dialect cannot render (NullType...)
        return str(sa_type.__class__.__name__)


def sql_quote(name: str, dialect: Any) -> str:
    return str(dialect.identifier_preparer.quote(name))


def sql_table_name(table: sa.Table, dialect: Any) -> str:
    return str(dialect.identifier_preparer.format_table(table))


def clickhouse_create_ddl(
    database: str, name: str, fields: Sequence[PayloadField], *, with_database: bool = False
) -> list[str]:
    """``CREATE TABLE`` (MergeTree, ORDER BY the first non-nullable column, else ``tuple()``) for the
    payload's columns; preceded by ``CREATE DATABASE IF NOT EXISTS`` when *with_database*."""
    columns = [(ch_quote(f.name), clickhouse_type(f.spec)) for f in fields]
    order = next((n for n, t in columns if not ch_accepts_null(t) and _ch_sortable(t)), "tuple()")
    body = ", ".join(f"{n} {t}" for n, t in columns)
    statements = [f"CREATE DATABASE IF NOT EXISTS {ch_quote(database)}"] if with_database else []
    statements.append(
        f"CREATE TABLE IF NOT EXISTS {ch_quote(database)}.{ch_quote(name)} ({body}) "
        f"ENGINE = MergeTree ORDER BY {order}"
    )
    return statements


def clickhouse_type(spec: msgspec.inspect.Type) -> str:
    """The ClickHouse column type a msgspec field type is written as (``Nullable`` when it admits None)."""
    inner, nullable = _strip_none(spec)
    base = _ch_base_type(inner)
    return f"Nullable({base})" if nullable and _ch_nullable_ok(base) else base


def _strip_none(spec: msgspec.inspect.Type) -> tuple[msgspec.inspect.Type | None, bool]:
    if not isinstance(spec, msgspec.inspect.UnionType):
        return spec, False
    members = [m for m in spec.types if not isinstance(m, msgspec.inspect.NoneType)]
    return (members[0] if len(members) == 1 else None), len(members) != len(spec.types)


def _ch_base_type(spec: msgspec.inspect.Type | None) -> str:
    i = msgspec.inspect
    simple: list[tuple[Any, str]] = [
        ((i.StrType, i.EnumType, i.LiteralType, i.BytesType, i.ByteArrayType, i.TimeType), "String"),
        ((i.BoolType,), "Bool"),
        ((i.IntType,), "Int64"),
        ((i.FloatType,), "Float64"),
        ((i.DateType,), "Date32"),
        ((i.UUIDType,), "UUID"),
        ((i.DecimalType,), "Decimal(38, 10)"),
        ((i.TimeDeltaType,), "Int64"),
    ]
    if isinstance(spec, i.DateTimeType):
        return "DateTime64(6, 'UTC')" if spec.tz else "DateTime64(6)"
    for types, name in simple:
        if isinstance(spec, types):
            return name
    if isinstance(spec, i.ListType | i.SetType | i.FrozenSetType | i.VarTupleType):
        return f"Array({clickhouse_type(spec.item_type)})"
    if isinstance(spec, i.DictType):
        return f"Map({_ch_base_type(_strip_none(spec.key_type)[0])}, {clickhouse_type(spec.value_type)})"
    if isinstance(spec, i.StructType | i.TypedDictType | i.DataclassType):
        return "JSON"
    return "String"  # unions of several types, Any: loom's insert leaves them as they are


def ch_accepts_null(type_text: str) -> bool:
    text = type_text.strip()
    if text.startswith("LowCardinality(") and text.endswith(")"):
        text = text[len("LowCardinality(") : -1].strip()
    return text.startswith("Nullable(") or text.startswith(("JSON", "Dynamic", "Variant", "Object"))


def _ch_nullable_ok(base: str) -> bool:
    return not base.startswith(("Array(", "Map(", "Tuple(", "JSON", "Nested("))


def _ch_sortable(type_text: str) -> bool:
    return not type_text.startswith(("Array(", "Map(", "JSON", "Tuple("))


def ch_quote(name: str) -> str:
    return name if _IDENTIFIER.match(name) else "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


DELTA_TYPE = {
    "string": "string", "integer": "long", "floating": "double", "boolean": "boolean", "binary": "binary",
    "timestamp": "timestamp", "date": "date", "decimal": "decimal(38,10)",
}  # fmt: skip
"""Delta column type of a payload category (for ``alter.add_columns`` remedies)."""
