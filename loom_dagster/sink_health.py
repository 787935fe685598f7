"""Sink health: read what loom's table sinks (Delta, ClickHouse, SQL) last received, from metadata only.

No Dagster here. ``sink_targets`` turns a ``LoomAssetGraph`` into ``SinkTarget``s (connection secrets
are kept in fields left out of ``repr``); ``read_sink`` / ``read_sinks`` return frozen ``SinkReading``s;
``evaluate_freshness`` turns a reading into a ``FreshnessVerdict``. A missing table or an unreachable
database is a reading with a status and an error message, never an exception.

* Delta: only the transaction log (``_delta_log``), never data files. A local table is read directly:
  ``_last_checkpoint`` gives a recent version, the commits after it are probed by name, and only the
  newest commit files are parsed (cost independent of the table's history). Remote URIs (s3://, ...)
  go through ``deltalake.DeltaTable(...).history(limit)``.
* ClickHouse: ``system.tables`` + ``system.parts`` (active parts) through clickhouse-connect.
* SQL: ``count(*)``, or ``max(<timestamp column>)`` when one is configured, through a sync engine.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from loom_dagster.describe import clickhouse_table
from loom_dagster.records import LoomStorageSink, SinkBackend
from loom_dagster.redact import REDACTED, is_secret_key, redact_text
from loom_dagster.sensors.settings import SinkFreshness, SinkHealthSettings

if TYPE_CHECKING:
    from loom.streaming.compiler import CompiledStorageSink

    from loom_dagster.graph import LoomAssetGraph

DEFAULT_TIMEOUT_S = 10.0
MAX_COMMITS_PER_READ = 1000
"""At most this many Delta commits are parsed per read (rows_added is flagged partial beyond it)."""

_DELTA_MAINTENANCE_OPS = frozenset(
    {
        "OPTIMIZE", "VACUUM START", "VACUUM END", "SET TBLPROPERTIES", "UNSET TBLPROPERTIES",
        "ADD CONSTRAINT", "DROP CONSTRAINT", "FSCK", "ADD COLUMNS", "CHANGE COLUMN", "RENAME COLUMN",
        "UPGRADE PROTOCOL", "ADD FEATURE", "DROP FEATURE", "REORG", "CREATE TABLE", "UPDATE FIELD METADATA",
    }
)  # fmt: skip
_DELTA_ROW_METRICS = ("numOutputRows", "num_output_rows", "num_added_rows", "numAddedRows")
_LOG_ENTRY_RE = re.compile(r"^(\d{20})\.(?:json|checkpoint(?:\.[^/]*)?\.parquet)$")
_ASYNC_DRIVERS = {
    "aiosqlite": None,
    "asyncpg": None,
    "psycopg_async": "psycopg",
    "aiomysql": "pymysql",
    "asyncmy": "pymysql",
    "aioodbc": "pyodbc",
    "oracledb_async": "oracledb",
}

JsonScalar = str | int | float | bool | None


class ReadStatus(StrEnum):
    """Outcome of reading one sink's metadata."""

    OK = "ok"
    MISSING = "missing"
    UNREACHABLE = "unreachable"
    ERROR = "error"


class FreshnessStatus(StrEnum):
    """Freshness of one sink (see ``evaluate_freshness``)."""

    FRESH = "fresh"
    LATE = "late"
    STALE = "stale"
    SILENT_WHILE_LAGGING = "silent_while_lagging"
    NO_DATA = "no_data"
    UNKNOWN = "unknown"
    MISSING = "missing"
    UNREACHABLE = "unreachable"
    READ_ERROR = "read_error"


class Severity(StrEnum):
    """Severity of a failed freshness verdict (maps to Dagster's ``AssetCheckSeverity``)."""

    WARN = "WARN"
    ERROR = "ERROR"


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


@dataclass(frozen=True)
class SinkReading:
    """What a sink's metadata says right now.

    ``marker`` changes exactly when new data landed (Delta: version of the latest data commit;
    ClickHouse: rows and block numbers of active parts; SQL: row count or max timestamp); it is
    ``None`` while the table holds no data. ``last_modified`` is when data last landed according to the
    table itself (epoch s), when it knows. ``rows``: total rows (ClickHouse, SQL count) or rows written
    by the latest data commit (Delta). ``rows_added``: since the ``previous`` reading given to the reader.
    """

    asset_key: str
    backend: SinkBackend
    status: ReadStatus
    read_at: float
    marker: str | None = None
    version: int | None = None
    last_modified: float | None = None
    rows: int | None = None
    rows_added: int | None = None
    read_ms: float = 0.0
    error: str | None = None
    extra: Mapping[str, JsonScalar] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the read succeeded."""
        return self.status is ReadStatus.OK

    @property
    def has_data(self) -> bool:
        """Whether the table exists and holds data."""
        return self.ok and self.marker is not None

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (for sensor cursors); secrets are never part of a reading."""
        return {
            "asset_key": self.asset_key,
            "backend": self.backend.value,
            "status": self.status.value,
            "read_at": self.read_at,
            "marker": self.marker,
            "version": self.version,
            "last_modified": self.last_modified,
            "rows": self.rows,
            "rows_added": self.rows_added,
            "read_ms": self.read_ms,
            "error": self.error,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SinkReading:
        """Inverse of ``to_json``."""
        return cls(
            asset_key=str(data["asset_key"]),
            backend=SinkBackend(data["backend"]),
            status=ReadStatus(data["status"]),
            read_at=float(data["read_at"]),
            marker=data.get("marker"),
            version=data.get("version"),
            last_modified=data.get("last_modified"),
            rows=data.get("rows"),
            rows_added=data.get("rows_added"),
            read_ms=float(data.get("read_ms") or 0.0),
            error=data.get("error"),
            extra=dict(data.get("extra") or {}),
        )


@dataclass(frozen=True)
class SourceLag:
    """The latest Kafka lag known for a flow writing a sink."""

    flow_key: str
    total_lag: int
    evaluated_at: float


@dataclass(frozen=True)
class FreshnessVerdict:
    """Freshness of one sink at ``now``: status, pass/fail, severity and a human message."""

    asset_key: str
    status: FreshnessStatus
    passed: bool
    severity: Severity | None
    message: str
    age_s: float | None
    last_data_at: float | None
    freshness: SinkFreshness
    source_lag: SourceLag | None = None


# --------------------------------------------------------------------------------------------------
# Targets from the asset graph
# --------------------------------------------------------------------------------------------------


def sink_targets(graph: LoomAssetGraph, settings: SinkHealthSettings | None = None) -> list[SinkTarget]:
    """One target per sink asset of *graph* (a table written by several flows is one target)."""
    columns = (settings or SinkHealthSettings()).sql_timestamp_columns
    found: dict[str, SinkTarget] = {}
    for node in graph.flows:
        records = {s.node_path: s for s in node.compiled.flow.storage_sinks}
        flow_key = node.spec.key.to_user_string()
        for path, compiled in sorted(node.compiled.plan.terminal_storage_sinks.items()):
            record = records.get(tuple(path))
            key = node.sink_keys.get(record.slot) if record is not None else None
            if record is None or key is None:
                continue
            prior = found.get(key)
            found[key] = (
                prior.with_writer(record.flow_name, flow_key)
                if prior is not None
                else target_for(key, record, compiled, flow_key, columns.get(key))
            )
    return sorted(found.values(), key=lambda t: t.asset_key)


def target_for(
    asset_key: str,
    record: LoomStorageSink,
    compiled: CompiledStorageSink,
    flow_key: str,
    timestamp_column: str | None = None,
) -> SinkTarget:
    """The target of one compiled ``IntoTable`` sink (its secrets kept out of ``repr``)."""
    config: Any = compiled.config
    common = SinkTarget(
        asset_key=asset_key,
        backend=record.backend,
        table=record.table,
        database=record.database,
        location=record.uri or "",
        flow_names=(record.flow_name,),
        flow_keys=(flow_key,),
    )
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


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_sink(
    target: SinkTarget, previous: SinkReading | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> SinkReading:
    """Read one sink's metadata; never raises (failures are readings with a status and message)."""
    started = time.perf_counter()
    now = time.time()
    prior = previous if previous is not None and previous.ok else None
    try:
        if target.backend is SinkBackend.DELTA:
            reading = read_delta(target, prior, now=now)
        elif target.backend is SinkBackend.CLICKHOUSE:
            reading = read_clickhouse(target, prior, now=now, timeout_s=timeout_s)
        else:
            reading = read_sql(target, prior, now=now, timeout_s=timeout_s)
    except Exception as exc:  # a reader bug must not take the whole tick down
        reading = failed(target, ReadStatus.ERROR, f"{type(exc).__name__}: {exc}", now)
    elapsed = round((time.perf_counter() - started) * 1000, 2)
    error = scrub(reading.error, target.secrets) if reading.error else None
    return replace(reading, read_ms=elapsed, error=error)


def read_sinks(
    targets: Sequence[SinkTarget],
    previous: Mapping[str, SinkReading] | None = None,
    *,
    max_workers: int = 16,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[SinkReading]:
    """Read every target (in threads), in order; ``previous`` is keyed by asset key."""
    prior = previous or {}

    def one(target: SinkTarget) -> SinkReading:
        return read_sink(target, prior.get(target.asset_key), timeout_s=timeout_s)

    if len(targets) <= 1 or max_workers <= 1:
        return [one(t) for t in targets]
    with ThreadPoolExecutor(
        max_workers=min(max_workers, len(targets)), thread_name_prefix="sink-health"
    ) as pool:
        return list(pool.map(one, targets))


def failed(target: SinkTarget, status: ReadStatus, message: str, now: float) -> SinkReading:
    """A reading that says why the sink could not be read."""
    return SinkReading(target.asset_key, target.backend, status, now, error=scrub(message, target.secrets))


def scrub(text: str, secrets: Sequence[str] = ()) -> str:
    """Remove URL passwords and every known secret string from *text*."""
    cleaned = redact_text(text)
    for secret in secrets:
        cleaned = cleaned.replace(secret, REDACTED)
    return cleaned


# -- Delta ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaCommit:
    """What one Delta commit says about new data."""

    version: int
    timestamp: float | None
    operation: str
    rows: int | None
    data_change: bool


def read_delta(target: SinkTarget, previous: SinkReading | None, *, now: float) -> SinkReading:
    """Delta table version, last data commit time and rows, from the transaction log only."""
    log_dir = local_delta_log(target.connect_url)
    if log_dir is None:
        return read_delta_with_deltalake(target, previous, now=now)
    if not log_dir.is_dir():
        return failed(target, ReadStatus.MISSING, f"no Delta table at {target.location} (no _delta_log)", now)
    latest = latest_delta_version(log_dir)
    if latest is None:
        return failed(
            target, ReadStatus.MISSING, f"no Delta table at {target.location} (empty _delta_log)", now
        )
    return delta_reading(target, previous, latest, _local_commits(log_dir), now)


def local_delta_log(uri: str) -> Path | None:
    """``<table>/_delta_log`` for a local path or ``file://`` URI; ``None`` for remote object stores."""
    parts = urlsplit(uri)
    if len(parts.scheme) > 1 and parts.scheme != "file":
        return None
    path = unquote(parts.path) if parts.scheme == "file" else uri
    return Path(path) / "_delta_log"


def latest_delta_version(log_dir: Path) -> int | None:
    """Newest version: from ``_last_checkpoint``, probing the next commit files by name.

    Costs one small read plus at most a checkpoint interval of ``stat`` calls, whatever the history
    length; falls back to listing the log when there is no usable checkpoint hint.
    """
    start = _last_checkpoint_version(log_dir)
    if start is None or not (
        _commit_file(log_dir, start).exists() or _commit_file(log_dir, start + 1).exists()
    ):
        return _listed_latest_version(log_dir)
    version = start
    while _commit_file(log_dir, version + 1).exists():
        version += 1
    return version


def _commit_file(log_dir: Path, version: int) -> Path:
    return log_dir / f"{version:020d}.json"


def _last_checkpoint_version(log_dir: Path) -> int | None:
    try:
        version = json.loads((log_dir / "_last_checkpoint").read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, int) and version >= 0 else None


def _listed_latest_version(log_dir: Path) -> int | None:
    versions = [int(m[1]) for name in os.listdir(log_dir) if (m := _LOG_ENTRY_RE.match(name))]
    return max(versions) if versions else None


def _local_commits(log_dir: Path) -> Callable[[int, int], Iterator[DeltaCommit]]:
    """Commits from *newest* down to *oldest* (inclusive), newest first; stops at a missing file."""

    def commits(newest: int, oldest: int) -> Iterator[DeltaCommit]:
        for version in range(newest, oldest - 1, -1):
            path = _commit_file(log_dir, version)
            try:
                text = path.read_text()
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                return
            yield parse_delta_commit(version, text.splitlines(), mtime)

    return commits


def parse_delta_commit(version: int, lines: Sequence[str], fallback_ts: float | None = None) -> DeltaCommit:
    """One commit file: ``commitInfo`` time, operation and row metrics; new data = an ``add`` with dataChange."""
    info: Mapping[str, Any] = {}
    added, counted, data_change = 0, False, False
    for line in lines:
        if not line.strip():
            continue
        action = json.loads(line)
        if "commitInfo" in action:
            info = action["commitInfo"] or {}
        elif "add" in action and (action["add"] or {}).get("dataChange", True):
            data_change = True
            records = _stats_rows(action["add"].get("stats"))
            if records is not None:
                added, counted = added + records, True
    rows = metric_rows(info.get("operationMetrics"))
    return DeltaCommit(
        version=version,
        timestamp=_commit_time(info) or fallback_ts,
        operation=str(info.get("operation") or ""),
        rows=rows if rows is not None else (added if counted else None),
        data_change=data_change,
    )


def commit_from_history(entry: Mapping[str, Any]) -> DeltaCommit:
    """A ``DeltaTable.history()`` entry (commit info only): data change judged by the operation."""
    operation = str(entry.get("operation") or "")
    return DeltaCommit(
        version=int(entry["version"]),
        timestamp=_commit_time(entry),
        operation=operation,
        rows=metric_rows(entry.get("operationMetrics")),
        data_change=operation.upper() not in _DELTA_MAINTENANCE_OPS,
    )


def metric_rows(metrics: Any) -> int | None:
    """Rows written, from ``operationMetrics`` (Spark ``numOutputRows``, delta-rs ``num_added_rows``)."""
    if not isinstance(metrics, Mapping):
        return None
    for key in _DELTA_ROW_METRICS:
        value = as_int(metrics.get(key))
        if value is not None:
            return value
    return None


def _stats_rows(stats: Any) -> int | None:
    if not isinstance(stats, str) or "numRecords" not in stats:
        return None
    try:
        return as_int(json.loads(stats).get("numRecords"))
    except ValueError:
        return None


def _commit_time(info: Mapping[str, Any]) -> float | None:
    millis = as_int(info.get("inCommitTimestamp")) or as_int(info.get("timestamp"))
    return millis / 1000.0 if millis else None


def delta_reading(
    target: SinkTarget,
    previous: SinkReading | None,
    latest: int,
    commits: Callable[[int, int], Iterator[DeltaCommit]],
    now: float,
) -> SinkReading:
    """Summarise the commits newer than *previous* (or the newest data commit when there is none)."""
    since = previous.version if previous is not None and previous.version is not None else None
    if since is not None and since > latest:
        since = None  # the table was re-created
    if since == latest and previous is not None:
        return replace(previous, read_at=now, rows_added=0, error=None)
    oldest = max(0, latest - MAX_COMMITS_PER_READ + 1, since + 1 if since is not None else 0)
    newest_data: DeltaCommit | None = None
    newest_any: DeltaCommit | None = None
    rows_added: int | None = 0 if since is not None else None
    for commit in commits(latest, oldest):
        newest_any = newest_any or commit
        if not commit.data_change:
            continue
        newest_data = newest_data or commit
        if rows_added is None:
            break
        rows_added += commit.rows or 0
    extra: dict[str, JsonScalar] = {"latest_version": latest}
    if since is not None and oldest > since + 1:
        extra["rows_added_partial"] = True
    if newest_any is not None:
        extra["latest_operation"] = newest_any.operation
    if newest_data is None:
        return _delta_without_new_data(target, previous, since, latest, now, extra)
    extra["operation"] = newest_data.operation
    return SinkReading(
        asset_key=target.asset_key,
        backend=target.backend,
        status=ReadStatus.OK,
        read_at=now,
        marker=str(newest_data.version),
        version=latest,
        last_modified=newest_data.timestamp,
        rows=newest_data.rows,
        rows_added=rows_added,
        extra=extra,
    )


def _delta_without_new_data(
    target: SinkTarget,
    previous: SinkReading | None,
    since: int | None,
    latest: int,
    now: float,
    extra: dict[str, JsonScalar],
) -> SinkReading:
    if previous is not None and since is not None:
        return replace(previous, read_at=now, version=latest, rows_added=0, error=None, extra=extra)
    return SinkReading(target.asset_key, target.backend, ReadStatus.OK, now, version=latest, extra=extra)


def read_delta_with_deltalake(target: SinkTarget, previous: SinkReading | None, *, now: float) -> SinkReading:
    """Any Delta URI through deltalake (used for remote stores): loads the table state (its cost grows with
    the number of live files), then reads ``history(limit)``; data commits are judged by operation name."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        table = DeltaTable(target.connect_url, storage_options=dict(target.storage_options) or None)
    except TableNotFoundError as exc:
        return failed(target, ReadStatus.MISSING, f"no Delta table at {target.location}: {exc}", now)
    except OSError as exc:
        return failed(target, ReadStatus.UNREACHABLE, f"cannot reach {target.location}: {exc}", now)
    latest = int(table.version())

    def commits(newest: int, oldest: int) -> Iterator[DeltaCommit]:
        entries = table.history(limit=newest - oldest + 1)
        yield from sorted((commit_from_history(e) for e in entries), key=lambda c: -c.version)

    return delta_reading(target, previous, latest, commits, now)


# -- ClickHouse -------------------------------------------------------------------------------------

_CH_TABLE_SQL = (
    "SELECT engine, total_rows FROM system.tables WHERE database = {db:String} AND name = {t:String}"
)
_CH_PARTS_SQL = (
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
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    where = f"ClickHouse {target.location}"
    try:
        client = clickhouse_connect.get_client(
            dsn=clickhouse_server_url(target.connect_url),
            connect_timeout=max(1, int(timeout_s)),
            send_receive_timeout=max(1, int(timeout_s)),
            autogenerate_session_id=False,
        )
    except (OperationalError, DatabaseError, OSError) as exc:
        return failed(target, ReadStatus.UNREACHABLE, f"cannot connect to {where}: {exc}", now)
    try:
        params = {"db": target.database or "default", "t": target.table}
        tables = client.query(_CH_TABLE_SQL, parameters=params).result_rows
        if not tables:
            return failed(
                target,
                ReadStatus.MISSING,
                f"table {params['db']}.{params['t']} does not exist ({where})",
                now,
            )
        parts = client.query(_CH_PARTS_SQL, parameters=params).result_rows[0]
    except (OperationalError, DatabaseError, OSError) as exc:
        return failed(target, ReadStatus.ERROR, f"cannot read {where}: {exc}", now)
    finally:
        client.close()
    return _clickhouse_reading(target, previous, now, str(tables[0][0]), tables[0][1], parts)


def _clickhouse_reading(
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
        rows_added=_difference(rows, previous),
        extra={"engine": engine, "active_parts": part_count, "max_block": blocks},
    )


def clickhouse_server_url(url: str) -> str:
    """The sink URL without its database path (the database may not exist; we query ``system``)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", parts.query, ""))


# -- SQL --------------------------------------------------------------------------------------------


def read_sql(
    target: SinkTarget, previous: SinkReading | None, *, now: float, timeout_s: float = DEFAULT_TIMEOUT_S
) -> SinkReading:
    """Row count, or ``max(<timestamp column>)`` when configured, through a sync SQLAlchemy engine."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    schema, _, name = target.table.rpartition(".")
    where = f"SQL database {target.database!r} ({target.location})"
    try:
        url = sync_sqlalchemy_url(target.connect_url)
        engine = sa.create_engine(url, poolclass=NullPool, connect_args=_connect_args(url, timeout_s))
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
                return _sql_time_reading(target, now, latest)
            count = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
    except sa.exc.OperationalError as exc:
        status = ReadStatus.UNREACHABLE if _is_connect_error(exc) else ReadStatus.ERROR
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
        rows_added=_difference(rows, previous),
    )


def _sql_time_reading(target: SinkTarget, now: float, value: Any) -> SinkReading:
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


def sync_sqlalchemy_url(url: str) -> str:
    """The URL with a sync driver (``sqlite+aiosqlite`` -> ``sqlite``, ``postgresql+asyncpg`` ->
    ``postgresql``...); SQLite files open read-only, so a missing file is not created."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    backend, _, driver = parsed.drivername.partition("+")
    if driver in _ASYNC_DRIVERS:
        sync = _ASYNC_DRIVERS[driver]
        parsed = parsed.set(drivername=f"{backend}+{sync}" if sync else backend)
    if (
        backend == "sqlite"
        and parsed.database
        and parsed.database != ":memory:"
        and "uri" not in parsed.query
    ):
        path = parsed.database if parsed.database.startswith("file:") else f"file:{parsed.database}"
        parsed = parsed.set(database=path).update_query_dict({"mode": "ro", "uri": "true"})
    return parsed.render_as_string(hide_password=False)


def _connect_args(url: str, timeout_s: float) -> dict[str, Any]:
    backend = url.split(":", 1)[0].split("+", 1)[0]
    if backend == "sqlite":
        return {"timeout": timeout_s}
    if backend in ("postgresql", "mysql", "mariadb"):
        return {"connect_timeout": max(1, int(timeout_s))}
    return {}


def _is_connect_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(
        s in text
        for s in ("unable to open", "could not connect", "connection refused", "timeout", "timed out")
    )


# -- helpers ----------------------------------------------------------------------------------------


def _difference(rows: int, previous: SinkReading | None) -> int | None:
    return rows - previous.rows if previous is not None and previous.rows is not None else None


def as_int(value: Any) -> int | None:
    """An int from a metadata/JSON value; ``None`` for bools, missing or non-numeric values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def to_epoch(value: Any) -> float | None:
    """Epoch seconds of a timestamp column value: datetime (naive = UTC), date, number or ISO string."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC).timestamp()
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number / 1000.0 if number > 1e11 else number


# --------------------------------------------------------------------------------------------------
# Freshness
# --------------------------------------------------------------------------------------------------


def evaluate_freshness(
    reading: SinkReading,
    *,
    last_data_at: float | None,
    now: float,
    freshness: SinkFreshness,
    lags: Sequence[SourceLag] = (),
) -> FreshnessVerdict:
    """Freshness of a sink at *now*, given when data last landed and the lag of its writing flows.

    fresh: new data within ``warn_after_s`` (passed). late: none for longer (WARN). stale: none for
    longer than ``fail_after_s`` (ERROR). silent_while_lagging: none for longer than ``warn_after_s``
    while a writing flow's source has lag > 0 (ERROR). no_data: the table exists but holds no data (WARN).
    unknown: it holds data but nothing says when it landed (WARN).
    missing: the table does not exist (WARN). unreachable / read_error: cannot read it (ERROR).
    """

    def verdict(status: FreshnessStatus, severity: Severity | None, message: str) -> FreshnessVerdict:
        age = max(0.0, now - last_data_at) if last_data_at is not None else None
        return FreshnessVerdict(
            reading.asset_key, status, severity is None, severity, message, age, last_data_at, freshness, lag
        )

    lag = max(lags, key=lambda x: x.total_lag, default=None)
    lag = lag if lag is not None and lag.total_lag > 0 else None
    if reading.status is not ReadStatus.OK:
        return _unreadable(reading, verdict)
    if not reading.has_data:
        return verdict(FreshnessStatus.NO_DATA, Severity.WARN, f"{reading.asset_key} holds no data yet")
    if last_data_at is None:
        return verdict(
            FreshnessStatus.UNKNOWN,
            Severity.WARN,
            f"{reading.asset_key} holds data but its metadata does not say when it last landed: configure "
            "SinkHealthSettings.sql_timestamp_columns for it, or let the sink health sensor watch it",
        )
    age = max(0.0, now - last_data_at)
    since = f"no new data for {_duration(age)}"
    if age <= freshness.warn_after_s:
        return verdict(FreshnessStatus.FRESH, None, f"new data {_duration(age)} ago")
    if lag is not None:
        return verdict(
            FreshnessStatus.SILENT_WHILE_LAGGING,
            Severity.ERROR,
            f"sink silent while its source lags: {since} while flow {lag.flow_key} is {lag.total_lag} "
            f"message(s) behind (lag measured {_duration(max(0.0, now - lag.evaluated_at))} ago)",
        )
    if age > freshness.fail_after_s:
        return verdict(
            FreshnessStatus.STALE, Severity.ERROR, f"{since} (fail after {_duration(freshness.fail_after_s)})"
        )
    return verdict(
        FreshnessStatus.LATE, Severity.WARN, f"{since} (warn after {_duration(freshness.warn_after_s)})"
    )


def _unreadable(
    reading: SinkReading, verdict: Callable[[FreshnessStatus, Severity | None, str], FreshnessVerdict]
) -> FreshnessVerdict:
    error = reading.error or reading.status.value
    if reading.status is ReadStatus.MISSING:
        return verdict(FreshnessStatus.MISSING, Severity.WARN, f"table missing: {error}")
    if reading.status is ReadStatus.UNREACHABLE:
        return verdict(FreshnessStatus.UNREACHABLE, Severity.ERROR, f"unreachable: {error}")
    return verdict(FreshnessStatus.READ_ERROR, Severity.ERROR, f"cannot read: {error}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


__all__ = [
    "DeltaCommit",
    "FreshnessStatus",
    "FreshnessVerdict",
    "ReadStatus",
    "Severity",
    "SinkReading",
    "SinkTarget",
    "SourceLag",
    "clickhouse_server_url",
    "evaluate_freshness",
    "latest_delta_version",
    "local_delta_log",
    "read_clickhouse",
    "read_delta",
    "read_delta_with_deltalake",
    "read_sink",
    "read_sinks",
    "read_sql",
    "sink_targets",
    "sync_sqlalchemy_url",
    "to_epoch",
]
