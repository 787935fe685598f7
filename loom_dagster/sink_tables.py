"""Sink tables checked physically before launch: each ``IntoTable`` sink's real table against its payload.

No Dagster here. ``check_sink_tables`` reads every storage sink of a compiled flow from the real system
and returns a ``SinkTablesReport`` listing each difference (``TableProblem``) with its asset key and
the DDL (or remedy) that fixes it:

* SQL (SQLAlchemy inspector, through a sync driver, or the async driver's ``run_sync`` when the sync
  one is not installed): the table exists; every payload field has a column of a compatible type that
  accepts NULL when the field admits None; no NOT NULL column without a default is left unfilled.
* ClickHouse (``system.columns`` through clickhouse-connect): the same, minus unfilled columns
  (ClickHouse fills omitted columns with their defaults).
* Delta (the table's schema): a table that does not exist yet is fine, loom creates it on the first
  write (reported as *pending*); an existing one must have exactly the payload's columns (delta-rs
  refuses an append whose columns differ in number) with compatible types.

``create_missing=True`` creates missing SQL / ClickHouse tables from the payload struct (SQL through
loom's own mapping, ``loom.core.backend.sqlalchemy.sa_table_for``, the one its sink inserts with).
Every connection is bounded by ``timeout_s``; an unreachable database is a problem, never a hang or
an exception. Texts never carry a password (``loom_dagster.redact`` + the sink's known secrets).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

import msgspec

from loom_dagster.describe import storage_sink
from loom_dagster.records import LoomStorageSink, SinkBackend
from loom_dagster.redact import redact_url
from loom_dagster.schema import column_type
from loom_dagster.sink_health import (
    SinkTarget,
    clickhouse_server_url,
    local_delta_log,
    scrub,
    sync_sqlalchemy_url,
    target_for,
)

if TYPE_CHECKING:
    import sqlalchemy as sa

    from loom_dagster.catalog import CompiledFlow

T = TypeVar("T")

MISSING_TABLE = "missing_table"
MISSING_COLUMN = "missing_column"
EXTRA_NOT_NULL = "extra_not_null"
EXTRA_COLUMN = "extra_column"
"""Delta only: delta-rs refuses an append whose columns differ from the table's, nullable or not."""
TYPE_MISMATCH = "type_mismatch"
UNREACHABLE = "unreachable"
ERROR = "error"
"""The table could not be read or the payload cannot be mapped (the message says why)."""

_ACCEPTS: dict[str, frozenset[str]] = {
    "string": frozenset({"string"}),
    "integer": frozenset({"integer", "floating"}),
    "floating": frozenset({"floating"}),
    "decimal": frozenset({"floating"}),
    "boolean": frozenset({"boolean", "integer"}),
    "binary": frozenset({"binary", "string"}),
    "timestamp": frozenset({"timestamp"}),
    "date": frozenset({"date"}),
    "time": frozenset({"time", "string"}),
    "uuid": frozenset({"uuid", "string"}),
    "json": frozenset({"json", "string"}),
    "list": frozenset({"list"}),
    "map": frozenset({"map", "struct", "json"}),
    "struct": frozenset({"struct", "map", "json", "string"}),
}
"""Column categories a payload category can be written into without failing or losing data."""

_PAYLOAD_CATEGORY = {
    "string": "string", "int64": "integer", "float64": "floating", "bool": "boolean",
    "binary": "binary", "timestamp": "timestamp", "date": "date", "time": "time", "uuid": "uuid",
    "decimal": "decimal",
}  # fmt: skip
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONNECT_ERRORS = ("unable to open", "could not connect", "connection refused", "timeout", "timed out")


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableProblem:
    """One difference between a sink's real table and its payload, and the DDL (or remedy) fixing it.

    ``kind``: missing_table | missing_column | extra_not_null | extra_column (Delta) | type_mismatch |
    unreachable | error. Texts are secret-free.
    """

    sink: str
    asset_key: str | None
    backend: str
    table: str
    kind: str
    detail: str
    fix: str | None

    def describe(self) -> str:
        """One bullet: where, what, and the fix (indented, may span lines)."""
        where = f"{self.asset_key} (" if self.asset_key else "("
        text = f"- {where}{self.backend} table {self.table}, sink {self.sink!r}) {self.kind}: {self.detail}"
        if self.fix:
            text += "\n    fix:\n" + "\n".join(f"      {line}" for line in self.fix.splitlines())
        return text


@dataclass(frozen=True)
class SinkTablesReport:
    """Every sink table of one flow: problems, tables created, tables checked, Delta tables pending."""

    problems: tuple[TableProblem, ...] = ()
    created: tuple[str, ...] = ()
    checked: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every table exists (or will be created by loom) and matches its payload."""
        return not self.problems

    def describe(self, flow_name: str) -> str:
        """Multi-line text: a header, one bullet per problem with its DDL, and how to opt in to creation."""
        if self.ok:
            return _describe_ok(flow_name, self)
        lines = [
            f"flow {flow_name!r}: {len(self.problems)} problem(s) with the tables its sinks write, found "
            "before launch (the new version was not launched; a running job was not touched):",
            *(p.describe() for p in self.problems),
        ]
        if self.created:
            lines.append(f"created before the check failed: {', '.join(self.created)}")
        if any(p.kind == MISSING_TABLE and p.backend != SinkBackend.DELTA.value for p in self.problems):
            lines.append(
                "Run the DDL above, or opt in to creating missing SQL/ClickHouse tables from the payload "
                "structs at deploy time: LoomDeployResource(create_missing_tables=True) (component YAML: "
                "create_missing_tables: true). Then materialize the flow again."
            )
        else:
            lines.append("Fix the tables (or the payloads) as shown, then materialize the flow again.")
        return "\n".join(lines)

    def metadata(self) -> dict[str, object]:
        """A JSON-able, secret-free summary."""
        return {
            "ok": self.ok,
            "checked": list(self.checked),
            "created": list(self.created),
            "pending": list(self.pending),
            "problems": [asdict(p) for p in self.problems],
        }


def _describe_ok(flow_name: str, report: SinkTablesReport) -> str:
    parts = [f"checked: {', '.join(report.checked) or 'none'}"]
    if report.created:
        parts.append(f"created: {', '.join(report.created)}")
    if report.pending:
        parts.append(f"will be created by loom on first write: {', '.join(report.pending)}")
    return f"flow {flow_name!r}: sink tables ok ({'; '.join(parts)})"


@dataclass(frozen=True)
class PayloadField:
    """One payload column as loom writes it: name, readable type, category, nullability."""

    name: str
    type: str
    category: str | None
    nullable: bool
    spec: msgspec.inspect.Type = field(repr=False)


@dataclass(frozen=True)
class _Sink:
    """One storage sink to check: its record, its connection target (secrets out of repr), its payload."""

    label: str
    asset_key: str | None
    record: LoomStorageSink
    target: SinkTarget
    payload: Any

    def problem(self, kind: str, detail: str, fix: str | None = None) -> TableProblem:
        """A problem about this sink, with every known secret scrubbed."""
        secrets = self.target.secrets
        return TableProblem(
            sink=self.record.slot,
            asset_key=self.asset_key,
            backend=self.record.backend.value,
            table=self.record.table
            if self.record.backend is not SinkBackend.CLICKHOUSE
            else f"{self.target.database}.{self.target.table}",
            kind=kind,
            detail=scrub(detail, secrets),
            fix=scrub(fix, secrets) if fix else None,
        )


@dataclass(frozen=True)
class _Outcome:
    problems: tuple[TableProblem, ...] = ()
    created: tuple[str, ...] = ()
    checked: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


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

    def one(sink: _Sink) -> _Outcome:
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


def _sinks(compiled: CompiledFlow, sink_keys: Mapping[str, str]) -> list[_Sink]:
    flow = compiled.flow
    records = {tuple(s.node_path): s for s in flow.storage_sinks}
    found = []
    for path, compiled_sink in sorted(compiled.plan.terminal_storage_sinks.items()):
        record = records.get(tuple(path)) or storage_sink(flow.name, tuple(path), compiled_sink)
        key = sink_keys.get(record.slot)
        label = key or f"{flow.name}/{record.slot}"
        target = target_for(label, record, compiled_sink, "")
        payload = getattr(compiled_sink.node, "payload", None)
        found.append(_Sink(label, key, record, target, payload))
    return found


def _check_one(sink: _Sink, *, create_missing: bool, timeout_s: float) -> _Outcome:
    try:
        fields = payload_fields(sink.payload)
        if sink.record.backend is SinkBackend.DELTA:
            return _check_delta(sink, fields, timeout_s)
        if sink.record.backend is SinkBackend.CLICKHOUSE:
            return _check_clickhouse(sink, fields, create_missing, timeout_s)
        return _check_sql(sink, fields, create_missing, timeout_s)
    except Exception as exc:  # a bug or an unexpected driver error must still name the sink
        detail = f"could not check the table: {type(exc).__name__}: {exc}"
        return _Outcome(problems=(sink.problem(ERROR, detail, None),))


def payload_fields(payload: Any) -> tuple[PayloadField, ...]:
    """The columns loom writes for *payload*: loom's column fields, typed from the msgspec struct."""
    from loom.core.model.introspection import get_column_fields

    info = msgspec.inspect.type_info(payload)
    if not isinstance(info, msgspec.inspect.StructType):
        raise TypeError(f"payload {payload!r} is not a msgspec struct")
    names = set(get_column_fields(payload))
    found = []
    for f in info.fields:
        if f.name not in names:
            continue
        type_name, nullable = column_type(f.type)
        found.append(PayloadField(f.name, type_name, _payload_category(type_name), nullable, f.type))
    return tuple(found)


def _payload_category(type_name: str) -> str | None:
    for prefix, category in (("list<", "list"), ("map<", "map"), ("struct<", "struct")):
        if type_name.startswith(prefix):
            return category
    return _PAYLOAD_CATEGORY.get(type_name)


def compatible(expected: str | None, actual: str | None) -> bool:
    """Whether a value of payload category *expected* can be written into a column of category *actual*
    (unknown categories are not judged)."""
    if expected is None or actual is None:
        return True
    return actual in _ACCEPTS.get(expected, frozenset({expected}))


def _is_connect_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError | TimeoutError):
        return True
    text = str(exc).lower()
    return any(s in text for s in _CONNECT_ERRORS)


# --------------------------------------------------------------------------------------------------
# SQL
# --------------------------------------------------------------------------------------------------


def _check_sql(
    sink: _Sink, fields: Sequence[PayloadField], create_missing: bool, timeout_s: float
) -> _Outcome:
    import sqlalchemy as sa

    url = sink.target.connect_url
    schema, _, name = sink.record.table.rpartition(".")
    where = f"SQL database {sink.record.database!r} ({redact_url(url)})"
    table = loom_sql_table(sink.payload, name, schema or None)
    dialect = _dialect(url)
    sqlite_file = _sqlite_file(url)
    try:
        if sqlite_file is not None and not sqlite_file.exists():
            columns = None  # loom's driver would create the file; the table is missing either way
        else:
            columns = _run_sql(url, lambda c: _reflect(c, name, schema or None), timeout_s=timeout_s)
        created: tuple[str, ...] = ()
        if columns is None and create_missing:
            if sqlite_file is not None:
                sqlite_file.parent.mkdir(parents=True, exist_ok=True)
            _run_sql(url, lambda c: table.create(c, checkfirst=True), timeout_s=timeout_s, writable=True)
            created = (sink.label,)
            columns = _run_sql(url, lambda c: _reflect(c, name, schema or None), timeout_s=timeout_s)
    except sa.exc.SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        return _sql_failure(sink, where, cause)
    except (OSError, TimeoutError, ImportError) as exc:
        return _sql_failure(sink, where, exc)
    if columns is None:
        ddl = sql_create_ddl(table, dialect)
        detail = f"table {sink.record.table!r} does not exist in {where}"
        return _Outcome(problems=(sink.problem(MISSING_TABLE, detail, ddl),))
    problems = _compare_sql(sink, table, fields, columns, dialect, where)
    return _Outcome(problems=tuple(problems), created=created, checked=(sink.label,))


def _sql_failure(sink: _Sink, where: str, exc: BaseException) -> _Outcome:
    if isinstance(exc, ImportError):
        detail = f"cannot open {where}: its driver is not installed ({exc}), nor its sync counterpart"
        fix = f"install the {exc.name or 'driver'} package in the environment that deploys the flow"
        return _Outcome(problems=(sink.problem(ERROR, detail, fix),))
    if _is_connect_error(exc):
        detail = f"cannot connect to {where} within the timeout: {type(exc).__name__}: {exc}"
        fix = (
            f"start the database or make it reachable from this host, and check database.{sink.record.database}.url "
            "in the flow's config"
        )
        return _Outcome(problems=(sink.problem(UNREACHABLE, detail, fix),))
    return _Outcome(problems=(sink.problem(ERROR, f"cannot read {where}: {type(exc).__name__}: {exc}"),))


def loom_sql_table(payload: Any, name: str, schema: str | None = None) -> sa.Table:
    """The table loom's SQLAlchemy sink inserts into (``sa_table_for``: same columns and types), with
    NOT NULL on the fields that do not admit None (loom leaves every column nullable: it issues no DDL)."""
    import sqlalchemy as sa
    from loom.core.backend.sqlalchemy import sa_table_for

    source = sa_table_for(payload, name)
    nullable = {f.name: f.nullable for f in payload_fields(payload)}
    columns = [sa.Column(c.name, c.type, nullable=nullable.get(c.name, True)) for c in source.columns]
    return sa.Table(name, sa.MetaData(), *columns, schema=schema)


def _reflect(conn: Any, name: str, schema: str | None) -> list[dict[str, Any]] | None:
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
    sink: _Sink,
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
    qualified = _sql_table_name(table, dialect)
    for column in table.columns:
        found = actual.get(column.name) or lowered.get(column.name.lower())
        expected_type = _sql_type_text(column.type, dialect)
        if found is None:
            detail = (
                f"column {column.name!r} ({expected_type}, payload field of {sink.record.payload_type}) is "
                f"missing from table {sink.record.table!r} in {where}"
            )
            fix = f"ALTER TABLE {qualified} ADD COLUMN {_sql_quote(column.name, dialect)} {expected_type};"
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
        problems.append(sink.problem(EXTRA_NOT_NULL, detail, _sql_drop_not_null(table, name, found, dialect)))
    return problems


def _sql_column_problems(
    sink: _Sink,
    table: sa.Table,
    column: sa.Column[Any],
    found: Mapping[str, Any],
    dialect: Any,
    where: str,
) -> list[TableProblem]:
    expected_type = _sql_type_text(column.type, dialect)
    actual_type = _sql_type_text(found["type"], dialect)
    name = str(found["name"])
    problems = []
    if not compatible(_sa_category(column.type), _sa_category(found["type"])):
        detail = (
            f"column {name!r} of table {sink.record.table!r} in {where} is {actual_type}, but the payload "
            f"field {column.name!r} of {sink.record.payload_type} is written as {expected_type}"
        )
        problems.append(
            sink.problem(TYPE_MISMATCH, detail, _sql_change_type(table, name, expected_type, dialect))
        )
    if column.nullable and not found.get("nullable", True):
        detail = (
            f"column {name!r} of table {sink.record.table!r} in {where} is NOT NULL, but the payload field "
            f"{column.name!r} of {sink.record.payload_type} admits None: a row with None would fail"
        )
        problems.append(sink.problem(TYPE_MISMATCH, detail, _sql_drop_not_null(table, name, found, dialect)))
    return problems


def _sa_category(sa_type: Any) -> str | None:
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


def sql_create_ddl(table: sa.Table, dialect: Any) -> str:
    """``CREATE TABLE`` for *table* in *dialect*."""
    from sqlalchemy.schema import CreateTable

    text = str(CreateTable(table).compile(dialect=dialect)).replace("\t", "  ")
    return "\n".join(line.rstrip() for line in text.strip().splitlines()) + ";"


def _sql_drop_not_null(table: sa.Table, name: str, found: Mapping[str, Any], dialect: Any) -> str:
    qualified, column = _sql_table_name(table, dialect), _sql_quote(name, dialect)
    if dialect.name == "postgresql":
        return f"ALTER TABLE {qualified} ALTER COLUMN {column} DROP NOT NULL;"
    if dialect.name in ("mysql", "mariadb"):
        return f"ALTER TABLE {qualified} MODIFY {column} {_sql_type_text(found['type'], dialect)} NULL;"
    return (
        f"{dialect.name} cannot drop NOT NULL in place: recreate table {qualified} with column {column} "
        f"nullable or with a DEFAULT (copying its rows), or add a field {name!r} to the payload"
    )


def _sql_change_type(table: sa.Table, name: str, expected_type: str, dialect: Any) -> str:
    qualified, column = _sql_table_name(table, dialect), _sql_quote(name, dialect)
    if dialect.name == "postgresql":
        return f"ALTER TABLE {qualified} ALTER COLUMN {column} TYPE {expected_type} USING {column}::{expected_type};"
    if dialect.name in ("mysql", "mariadb"):
        return f"ALTER TABLE {qualified} MODIFY {column} {expected_type};"
    return (
        f"{dialect.name} cannot change a column's type in place: recreate table {qualified} with column "
        f"{column} {expected_type} (copying its rows), or change the payload field's type. The table "
        f"loom expects:\n{sql_create_ddl(table, dialect)}"
    )


def _sql_type_text(sa_type: Any, dialect: Any) -> str:
    try:
        return str(sa_type.compile(dialect=dialect))
    except Exception:  # a reflected type the dialect cannot render (NullType...)
        return str(sa_type.__class__.__name__)


def _sql_quote(name: str, dialect: Any) -> str:
    return str(dialect.identifier_preparer.quote(name))


def _sql_table_name(table: sa.Table, dialect: Any) -> str:
    return str(dialect.identifier_preparer.format_table(table))


def _dialect(url: str) -> Any:
    """The SQLAlchemy dialect of *url* (for DDL text); no connection, no driver import."""
    from sqlalchemy.engine import make_url

    dialect_cls: Any = make_url(url).get_dialect()
    return dialect_cls(paramstyle="named")


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (``None`` for other databases and in-memory SQLite)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:") or "mode=memory" in database:
        return None
    if database.startswith("file:"):
        database = unquote(database[len("file:") :].split("?", 1)[0])
    return Path(database)


def _run_sql(
    url: str,
    work: Callable[[Any], T],
    *,
    timeout_s: float,
    writable: bool = False,
    force_async: bool = False,
) -> T:
    """Run *work(connection)* in a transaction through a sync engine; when the URL's driver is async
    and its sync counterpart is not installed, through the async engine's ``run_sync``."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    sync_url = _writable_url(sync_sqlalchemy_url(url)) if writable else sync_sqlalchemy_url(url)
    try:
        if force_async:
            raise ModuleNotFoundError("sync driver bypassed", name="")
        engine = sa.create_engine(
            sync_url, poolclass=NullPool, connect_args=_connect_args(sync_url, timeout_s)
        )
    except ModuleNotFoundError:
        if "+" not in sa.engine.make_url(url).drivername:
            raise
        return _run_async(url, work, timeout_s)
    try:
        with engine.begin() as conn:
            return work(conn)
    finally:
        engine.dispose()


def _run_async(url: str, work: Callable[[Any], T], timeout_s: float) -> T:
    """*work* through the async driver (``run_sync``), on a fresh event loop in a worker thread, bounded
    by twice the timeout overall."""
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    async def go() -> T:
        engine = create_async_engine(
            url, poolclass=NullPool, connect_args=_async_connect_args(url, timeout_s)
        )
        try:
            async with engine.begin() as conn:
                return await conn.run_sync(work)
        finally:
            await engine.dispose()

    async def bounded() -> T:
        return await asyncio.wait_for(go(), timeout=2 * timeout_s)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sink-tables-async") as pool:
        return pool.submit(asyncio.run, bounded()).result()


def _writable_url(url: str) -> str:
    """A read-only SQLite URL (``sync_sqlalchemy_url``) made read-write-create; others unchanged."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.query.get("mode") == "ro":
        parsed = parsed.update_query_dict({"mode": "rwc"})
    return parsed.render_as_string(hide_password=False)


def _connect_args(url: str, timeout_s: float) -> dict[str, Any]:
    """Connect (and, for Postgres/MySQL, statement/read) timeouts for a sync driver."""
    backend = url.split(":", 1)[0].split("+", 1)[0]
    seconds = max(1, int(timeout_s))
    if backend == "sqlite":
        return {"timeout": timeout_s}
    if backend == "postgresql":
        return {"connect_timeout": seconds, "options": f"-c statement_timeout={seconds * 1000}"}
    if backend in ("mysql", "mariadb"):
        return {"connect_timeout": seconds, "read_timeout": seconds}
    return {}


def _async_connect_args(url: str, timeout_s: float) -> dict[str, Any]:
    driver = url.split(":", 1)[0].partition("+")[2]
    if driver in ("asyncpg", "aiosqlite"):
        return {"timeout": timeout_s}
    if driver in ("psycopg_async", "psycopg", "aiomysql", "asyncmy"):
        return {"connect_timeout": max(1, int(timeout_s))}
    return {}


# --------------------------------------------------------------------------------------------------
# ClickHouse
# --------------------------------------------------------------------------------------------------

_CH_COLUMNS_SQL = (
    "SELECT name, type, default_kind FROM system.columns "
    "WHERE database = {db:String} AND table = {t:String} ORDER BY position"
)
_CH_DATABASE_SQL = "SELECT count() FROM system.databases WHERE name = {db:String}"


def _check_clickhouse(
    sink: _Sink, fields: Sequence[PayloadField], create_missing: bool, timeout_s: float
) -> _Outcome:
    import clickhouse_connect
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    database, name = sink.target.database or "default", sink.target.table
    server = clickhouse_server_url(sink.target.connect_url)
    where = f"ClickHouse {redact_url(server)}"
    try:
        client = clickhouse_connect.get_client(
            dsn=server,
            connect_timeout=max(1, int(timeout_s)),
            send_receive_timeout=max(1, int(timeout_s)),
            autogenerate_session_id=False,
        )
    except (OperationalError, DatabaseError, OSError) as exc:
        detail = f"cannot connect to {where} within {timeout_s:g}s: {exc}"
        fix = "start ClickHouse or make it reachable from this host, and check the sink's database url in the flow's config"
        return _Outcome(problems=(sink.problem(UNREACHABLE, detail, fix),))
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
                return _Outcome(problems=(sink.problem(MISSING_TABLE, detail, fix),))
            for statement in statements:
                client.command(statement)
            created = (sink.label,)
            columns = client.query(_CH_COLUMNS_SQL, parameters=params).result_rows
    except (OperationalError, DatabaseError, OSError) as exc:
        kind = UNREACHABLE if _is_connect_error(exc) else ERROR
        return _Outcome(
            problems=(sink.problem(kind, f"cannot read table {database}.{name} ({where}): {exc}"),)
        )
    finally:
        client.close()
    actual = {str(n): (str(t), str(k)) for n, t, k in columns}
    problems = _compare_clickhouse(sink, f"{_ch_quote(database)}.{_ch_quote(name)}", fields, actual, where)
    return _Outcome(problems=tuple(problems), created=created, checked=(sink.label,))


def _compare_clickhouse(
    sink: _Sink,
    qualified: str,
    fields: Sequence[PayloadField],
    actual: Mapping[str, tuple[str, str]],
    where: str,
) -> list[TableProblem]:
    problems = []
    for f in fields:
        expected = clickhouse_type(f.spec)
        column = _ch_quote(f.name)
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
        elif f.nullable and _ch_accepts_null(expected) and not _ch_accepts_null(found):
            detail = f"{where_column} is {found}, not Nullable, but the payload field admits None: a row with None would fail"
            problems.append(
                sink.problem(
                    TYPE_MISMATCH, detail, f"ALTER TABLE {qualified} MODIFY COLUMN {column} {expected};"
                )
            )
    return problems


def clickhouse_create_ddl(
    database: str, name: str, fields: Sequence[PayloadField], *, with_database: bool = False
) -> list[str]:
    """``CREATE TABLE`` (MergeTree, ORDER BY the first non-nullable column, else ``tuple()``) for the
    payload's columns; preceded by ``CREATE DATABASE IF NOT EXISTS`` when *with_database*."""
    columns = [(_ch_quote(f.name), clickhouse_type(f.spec)) for f in fields]
    order = next((n for n, t in columns if not _ch_accepts_null(t) and _ch_sortable(t)), "tuple()")
    body = ", ".join(f"{n} {t}" for n, t in columns)
    statements = [f"CREATE DATABASE IF NOT EXISTS {_ch_quote(database)}"] if with_database else []
    statements.append(
        f"CREATE TABLE IF NOT EXISTS {_ch_quote(database)}.{_ch_quote(name)} ({body}) "
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


def _ch_accepts_null(type_text: str) -> bool:
    text = type_text.strip()
    if text.startswith("LowCardinality(") and text.endswith(")"):
        text = text[len("LowCardinality(") : -1].strip()
    return text.startswith("Nullable(") or text.startswith(("JSON", "Dynamic", "Variant", "Object"))


def _ch_nullable_ok(base: str) -> bool:
    return not base.startswith(("Array(", "Map(", "Tuple(", "JSON", "Nested("))


def _ch_sortable(type_text: str) -> bool:
    return not type_text.startswith(("Array(", "Map(", "JSON", "Tuple("))


def _ch_quote(name: str) -> str:
    return name if _IDENTIFIER.match(name) else "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


# --------------------------------------------------------------------------------------------------
# Delta
# --------------------------------------------------------------------------------------------------

_DELTA_TYPE = {
    "string": "string", "integer": "long", "floating": "double", "boolean": "boolean", "binary": "binary",
    "timestamp": "timestamp", "date": "date", "decimal": "decimal(38,10)",
}  # fmt: skip


def _check_delta(sink: _Sink, fields: Sequence[PayloadField], timeout_s: float) -> _Outcome:
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    uri = sink.target.connect_url
    shown = redact_url(uri)
    pending = (f"{sink.label} (Delta table at {shown}: will be created by loom on its first write)",)
    log_dir = local_delta_log(uri)
    if log_dir is not None and not log_dir.is_dir():
        return _Outcome(pending=pending)
    options = dict(sink.target.storage_options)
    if log_dir is None:
        options.setdefault("timeout", f"{max(1, int(timeout_s))}s")
    try:
        table = DeltaTable(uri, storage_options=options or None)
    except TableNotFoundError:
        return _Outcome(pending=pending)
    except OSError as exc:
        detail = f"cannot reach the Delta table at {shown}: {exc}"
        return _Outcome(
            problems=(sink.problem(UNREACHABLE, detail, "check the sink's uri and storage_options"),)
        )
    actual = {f.name: f for f in table.schema().fields}
    problems = _compare_delta(sink, fields, actual, shown)
    return _Outcome(problems=tuple(problems), checked=(sink.label,))


def _compare_delta(
    sink: _Sink, fields: Sequence[PayloadField], actual: Mapping[str, Any], shown: str
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
            delta_type = _DELTA_TYPE.get(f.category or "", f.type)
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


__all__ = [
    "ERROR",
    "EXTRA_COLUMN",
    "EXTRA_NOT_NULL",
    "MISSING_COLUMN",
    "PayloadField",
    "MISSING_TABLE",
    "TYPE_MISMATCH",
    "UNREACHABLE",
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
