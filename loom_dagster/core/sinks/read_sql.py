"""The SQL sink reader: ``count(*)``, or ``max(<timestamp column>)`` when one is configured, through a
sync SQLAlchemy engine (SQLite read-only)."""

from __future__ import annotations

from typing import Any

from loom_dagster.core.sinks.connections import (
    DEFAULT_TIMEOUT_S,
    is_connect_error,
    sql_engine,
    sync_sqlalchemy_url,
)
from loom_dagster.core.sinks.reading import ReadStatus, SinkReading, failed, rows_difference, to_epoch
from loom_dagster.core.sinks.targets import SinkTarget


def read_sql(
    target: SinkTarget, previous: SinkReading | None, *, now: float, timeout_s: float = DEFAULT_TIMEOUT_S
) -> SinkReading:
    """Row count, or ``max(<timestamp column>)`` when configured, through a sync SQLAlchemy engine."""
    import sqlalchemy as sa

    schema, _, name = target.table.rpartition(".")
    where = f"SQL database {target.database!r} ({target.location})"
    try:
        engine = sql_engine(sync_sqlalchemy_url(target.connect_url), timeout_s)
    except ModuleNotFoundError as exc:
        message = (
            f"cannot open {where}: its sync driver is not installed ({exc}); install it to read this sink"
        )
        return failed(target, ReadStatus.ERROR, message, now)
    except Exception as exc:
        return failed(target, ReadStatus.ERROR, f"cannot open {where}: {exc}", now)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(name, schema=schema or None):
                return failed(
                    target, ReadStatus.MISSING, f"table {target.table!r} does not exist in {where}", now
                )
            table = sa.table(name, schema=schema or None)
            if target.timestamp_column:
                column: Any = sa.column(target.timestamp_column)
                latest = conn.execute(sa.select(sa.func.max(column)).select_from(table)).scalar()
                return _time_reading(target, now, latest)
            count = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
    except sa.exc.OperationalError as exc:
        status = ReadStatus.UNREACHABLE if is_connect_error(exc) else ReadStatus.ERROR
        return failed(target, status, f"cannot read {where}: {exc.orig or exc}", now)
    except sa.exc.SQLAlchemyError as exc:
        return failed(target, ReadStatus.ERROR, f"cannot read {where}: {exc}", now)
    finally:
        engine.dispose()
    rows = int(count)
    return SinkReading(
        asset_key=target.asset_key,
        backend=target.backend,
        status=ReadStatus.OK,
        read_at=now,
        marker=str(rows) if rows else None,
        rows=rows,
        rows_added=rows_difference(rows, previous),
    )


def _time_reading(target: SinkTarget, now: float, value: Any) -> SinkReading:
    latest = to_epoch(value)
    return SinkReading(
        asset_key=target.asset_key,
        backend=target.backend,
        status=ReadStatus.OK,
        read_at=now,
        marker=repr(latest) if latest is not None else None,
        last_modified=latest,
        extra={"timestamp_column": target.timestamp_column},
    )
