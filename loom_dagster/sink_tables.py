"""Sink table checks (facade): the public names of ``loom_dagster.sinks``' pre-launch table checks,
kept importable from their former home. New code imports from the ``loom_dagster.sinks`` modules."""

from loom_dagster.sinks.check_clickhouse import clickhouse_category
from loom_dagster.sinks.check_delta import delta_category
from loom_dagster.sinks.check_tables import check_sink_tables
from loom_dagster.sinks.ddl import clickhouse_create_ddl, clickhouse_type, loom_sql_table, sql_create_ddl
from loom_dagster.sinks.payload import PayloadField, compatible, payload_fields
from loom_dagster.sinks.table_report import (
    ERROR,
    EXTRA_COLUMN,
    EXTRA_NOT_NULL,
    MISSING_COLUMN,
    MISSING_TABLE,
    TYPE_MISMATCH,
    UNREACHABLE,
    SinkTablesReport,
    TableProblem,
)

__all__ = [
    "ERROR",
    "EXTRA_COLUMN",
    "EXTRA_NOT_NULL",
    "MISSING_COLUMN",
    "MISSING_TABLE",
    "TYPE_MISMATCH",
    "UNREACHABLE",
    "PayloadField",
    "SinkTablesReport",
    "TableProblem",
    "check_sink_tables",
    "clickhouse_category",
    "clickhouse_create_ddl",
    "clickhouse_type",
    "compatible",
    "delta_category",
    "loom_sql_table",
    "payload_fields",
    "sql_create_ddl",
]
