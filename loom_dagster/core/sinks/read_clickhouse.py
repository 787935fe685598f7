"""The ClickHouse sink reader: rows and last modification from ``system.tables`` + ``system.parts``
(active parts), never the table's data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loom_dagster.core.sinks.connections import DEFAULT_TIMEOUT_S, clickhouse_client
from loom_dagster.core.sinks.reading import ReadStatus, SinkReading, as_int, failed, rows_difference
from loom_dagster.core.sinks.targets import SinkTarget

_TABLE_SQL = "SELECT engine, total_rows FROM system.tables WHERE database = {db:String} AND name = {t:String}"
_PARTS_SQL = (
    "SELECT sum(p_rows), sum(p_block), toUnixTimestamp(max(p_mtime)), sum(p_parts) FROM ("
    " SELECT partition_id, sum(rows) AS p_rows, max(max_block_number) AS p_block,"
    " max(modification_time) AS p_mtime, count() AS p_parts"
    " FROM system.parts WHERE database = {db:String} AND table = {t:String} AND active"
    " GROUP BY partition_id)"
)


def read_clickhouse(
    target: SinkTarget, previous: SinkReading | None, *, now: float, timeout_s: float = DEFAULT_TIMEOUT_S
) -> SinkReading:
    """Rows and last modification of a ClickHouse table, from ``system.parts`` (active parts)."""
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    where = f"ClickHouse {target.location}"
    try:
        client = clickhouse_client(target.connect_url, timeout_s)
    except (OperationalError, DatabaseError, OSError) as exc:
        return failed(target, ReadStatus.UNREACHABLE, f"cannot connect to {where}: {exc}", now)
    try:
        params = {"db": target.database or "default", "t": target.table}
        tables = client.query(_TABLE_SQL, parameters=params).result_rows
        if not tables:
            return failed(
                target,
                ReadStatus.MISSING,
                f"table {params['db']}.{params['t']} does not exist ({where})",
                now,
            )
        parts = client.query(_PARTS_SQL, parameters=params).result_rows[0]
    except (OperationalError, DatabaseError, OSError) as exc:
        return failed(target, ReadStatus.ERROR, f"cannot read {where}: {exc}", now)
    finally:
        client.close()
    return _reading(target, previous, now, str(tables[0][0]), tables[0][1], parts)


def _reading(
    target: SinkTarget,
    previous: SinkReading | None,
    now: float,
    engine: str,
    total_rows: Any,
    parts: Sequence[Any],
) -> SinkReading:
    rows, blocks, mtime, part_count = (as_int(v) or 0 for v in parts)
    if "MergeTree" not in engine:  # no parts: fall back to system.tables.total_rows
        rows, blocks = as_int(total_rows) or 0, 0
    return SinkReading(
        asset_key=target.asset_key,
        backend=target.backend,
        status=ReadStatus.OK,
        read_at=now,
        marker=f"{rows}:{blocks}" if rows or blocks else None,
        last_modified=float(mtime) if mtime else None,
        rows=rows,
        rows_added=rows_difference(rows, previous),
        extra={"engine": engine, "active_parts": part_count, "max_block": blocks},
    )
