"""Sink tables checked on the real systems before launch: real SQLite, real ClickHouse (chdb behind its
HTTP interface), real Delta tables. Flows are only compiled (no Kafka broker)."""

from __future__ import annotations

import json
import socket
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import clickhouse_connect
import pyarrow as pa
import pytest
import sqlalchemy as sa
from deltalake import DeltaTable, write_deltalake
from loom.core.backend.sqlalchemy import sa_table_for

from loom_dagster import LoomFlowSpec
from loom_dagster.core.checks.tables import check_sink_tables
from loom_dagster.core.flows.catalog import CompiledFlow, compile_spec
from loom_dagster.core.sinks.check_sql import reflect_columns
from loom_dagster.core.sinks.connections import run_sql
from loom_dagster.core.sinks.table_report import SinkTablesReport
from tests.conftest import shapes_config
from tests.flows.shapes import Row

SHAPES = "tests.flows.shapes:make_flow"
PASSWORD = "pw-Zq81xX"
SQL_KEY = "sql/warehouse/events"
KEYS = {"events_sql": SQL_KEY, "events_ch": "clickhouse/x/events", "events_delta": "delta/events"}


def _compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sinks: str, **cfg: Any) -> CompiledFlow:
    monkeypatch.setenv("LOOM_TEST_SINKS", sinks)
    spec = LoomFlowSpec(SHAPES, config=shapes_config(tmp_path / "cfg", **cfg), environment="test")
    return compile_spec(spec)


def _texts(report: SinkTablesReport) -> str:
    return report.describe("events") + json.dumps(report.metadata())


def _kinds(report: SinkTablesReport) -> dict[tuple[str, str], Any]:
    """``(kind, first quoted name in the detail)`` -> problem."""
    return {(p.kind, p.detail.split("'")[1]): p for p in report.problems}


# -- SQL ---------------------------------------------------------------------------------------------


def test_sqlite_missing_table_reported_with_key_and_ddl_that_fixes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = _compile(tmp_path, monkeypatch, "sql")
    db = tmp_path / "cfg" / "warehouse.db"
    sqlite3.connect(db).close()  # the database exists, the table does not

    report = check_sink_tables(compiled, sink_keys=KEYS)

    assert not report.ok and report.checked == () and report.created == ()
    (problem,) = report.problems
    assert (problem.kind, problem.asset_key, problem.sink, problem.backend) == (
        "missing_table",
        SQL_KEY,
        "events_sql",
        "sql",
    )
    assert "'events' does not exist" in problem.detail and str(db) in problem.detail
    assert problem.fix is not None and problem.fix.startswith("CREATE TABLE events (")
    text = report.describe("events")
    assert SQL_KEY in text and "CREATE TABLE events" in text and "create_missing_tables" in text

    with sqlite3.connect(db) as conn:
        conn.executescript(problem.fix)
    fixed = check_sink_tables(compiled, sink_keys=KEYS)
    assert fixed.ok and fixed.checked == (SQL_KEY,), fixed.describe("events")
    # The DDL makes a table loom's own insert (its table mapping, its values) writes into.
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.execute(sa.insert(sa_table_for(Row, "events")), [{"event_id": "a", "value": 1, "doubled": 2}])
        assert conn.execute(sa.text("select event_id, doubled, note from events")).all() == [("a", 2, None)]
    engine.dispose()


def test_sqlite_missing_column_extra_not_null_and_incompatible_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = _compile(tmp_path, monkeypatch, "sql")
    db = tmp_path / "cfg" / "warehouse.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE events (id INTEGER PRIMARY KEY, event_id TEXT NOT NULL, value TEXT, "
            "doubled INTEGER NOT NULL, tenant TEXT NOT NULL, created TEXT NOT NULL DEFAULT 'now')"
        )

    report = check_sink_tables(compiled, sink_keys=KEYS)

    kinds = _kinds(report)
    assert set(kinds) == {
        ("missing_column", "note"),
        ("type_mismatch", "value"),
        ("extra_not_null", "tenant"),
    }, report.describe("events")  # id (rowid) and created (DEFAULT) are filled by the database
    assert all(p.asset_key == SQL_KEY for p in report.problems)
    assert kinds[("missing_column", "note")].fix == "ALTER TABLE events ADD COLUMN note VARCHAR;"
    assert "is TEXT" in kinds[("type_mismatch", "value")].detail
    assert "written as INTEGER" in kinds[("type_mismatch", "value")].detail
    assert "NOT NULL without a default" in kinds[("extra_not_null", "tenant")].detail

    with sqlite3.connect(db) as conn:
        conn.execute(kinds[("missing_column", "note")].fix or "")
    assert {k for k, _ in _kinds(check_sink_tables(compiled, sink_keys=KEYS))} == {
        "type_mismatch",
        "extra_not_null",
    }


def test_sqlite_not_null_column_for_a_nullable_field_is_a_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = _compile(tmp_path, monkeypatch, "sql")
    with sqlite3.connect(tmp_path / "cfg" / "warehouse.db") as conn:
        conn.execute(
            "CREATE TABLE events (event_id TEXT NOT NULL, value BIGINT, doubled REAL, note TEXT NOT NULL)"
        )
    report = check_sink_tables(compiled, sink_keys=KEYS)
    (problem,) = report.problems  # BIGINT and REAL accept the int fields
    assert problem.kind == "type_mismatch" and "'note'" in problem.detail and "admits None" in problem.detail


def test_create_missing_creates_the_sqlite_table_then_the_check_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "new" / "dir" / "warehouse.db"  # neither the file nor its directory exists
    compiled = _compile(tmp_path, monkeypatch, "sql", sql_url=f"sqlite+aiosqlite:///{db}")
    assert check_sink_tables(compiled, sink_keys=KEYS).problems[0].kind == "missing_table"
    assert not db.exists()  # checking never creates anything

    report = check_sink_tables(compiled, sink_keys=KEYS, create_missing=True)

    assert report.ok and report.created == (SQL_KEY,) and report.checked == (SQL_KEY,)
    with sqlite3.connect(db) as conn:
        columns = {r[1]: (r[2], bool(r[3])) for r in conn.execute("PRAGMA table_info(events)")}
    assert columns == {
        "event_id": ("VARCHAR", True),
        "value": ("INTEGER", True),
        "doubled": ("INTEGER", True),
        "note": ("VARCHAR", False),
    }
    again = check_sink_tables(compiled, sink_keys=KEYS, create_missing=True)
    assert again.ok and again.created == ()  # idempotent


def test_async_driver_path_reads_through_run_sync(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (a TEXT NOT NULL)")
    url = f"sqlite+aiosqlite:///{db}"
    columns = run_sql(url, lambda c: reflect_columns(c, "t", None), timeout_s=5, force_async=True)
    assert columns is not None and [(c["name"], c["nullable"]) for c in columns] == [("a", False)]
    assert run_sql(url, lambda c: reflect_columns(c, "missing", None), timeout_s=5, force_async=True) is None


def test_missing_sql_driver_is_a_problem_without_the_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"postgresql+asyncpg://app:{PASSWORD}@127.0.0.1:1/shop"
    compiled = _compile(tmp_path, monkeypatch, "sql", sql_url=url)
    report = check_sink_tables(compiled, sink_keys=KEYS, timeout_s=2)
    (problem,) = report.problems
    assert problem.kind == "error" and "driver is not installed" in problem.detail
    assert "app:***@127.0.0.1:1/shop" in problem.detail
    assert PASSWORD not in _texts(report)


# -- ClickHouse --------------------------------------------------------------------------------------


@pytest.fixture()
def ch(clickhouse: Any, topic_prefix: str) -> Iterator[tuple[Any, str, str]]:
    """A client, a fresh database name and the sink URL (with a password) of the session's ClickHouse."""
    client = clickhouse_connect.get_client(host="127.0.0.1", port=clickhouse.port, username="default")
    url = f"http://default:{PASSWORD}@127.0.0.1:{clickhouse.port}"
    yield client, topic_prefix, url
    client.command(f"DROP DATABASE IF EXISTS {topic_prefix}")
    client.close()


def test_clickhouse_missing_table_reported_with_ddl_that_fixes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ch: tuple[Any, str, str]
) -> None:
    client, database, url = ch
    compiled = _compile(tmp_path, monkeypatch, "ch", ch_url=url, ch_table=f"{database}.events")
    keys = {"events_ch": f"clickhouse/{database}/events"}

    report = check_sink_tables(compiled, sink_keys=keys)

    (problem,) = report.problems
    assert (problem.kind, problem.asset_key, problem.table) == (
        "missing_table",
        f"clickhouse/{database}/events",
        f"{database}.events",
    )
    assert problem.fix == (
        f"CREATE DATABASE IF NOT EXISTS {database};\n"
        f"CREATE TABLE IF NOT EXISTS {database}.events (event_id String, value Int64, doubled Int64, "
        "note Nullable(String)) ENGINE = MergeTree ORDER BY event_id;"
    )
    assert PASSWORD not in _texts(report)
    for statement in problem.fix.split(";\n"):
        client.command(statement.rstrip(";"))
    fixed = check_sink_tables(compiled, sink_keys=keys)
    assert fixed.ok and fixed.checked == (f"clickhouse/{database}/events",), fixed.describe("events")


def test_clickhouse_missing_column_and_incompatible_types(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ch: tuple[Any, str, str]
) -> None:
    client, database, url = ch
    client.command(f"CREATE DATABASE {database}")
    client.command(
        f"CREATE TABLE {database}.events (event_id String, value String, doubled Float64, "
        "tenant String) ENGINE = MergeTree ORDER BY event_id"
    )
    compiled = _compile(tmp_path, monkeypatch, "ch", ch_url=url, ch_table=f"{database}.events")

    report = check_sink_tables(compiled, sink_keys={"events_ch": "ch/events"})

    kinds = _kinds(report)  # Float64 accepts ints; an extra column gets its default in ClickHouse
    assert set(kinds) == {("missing_column", "note"), ("type_mismatch", "value")}, report.describe("x")
    assert kinds[("missing_column", "note")].fix == (
        f"ALTER TABLE {database}.events ADD COLUMN note Nullable(String);"
    )
    assert (
        kinds[("type_mismatch", "value")].fix == f"ALTER TABLE {database}.events MODIFY COLUMN value Int64;"
    )
    assert all(p.asset_key == "ch/events" for p in report.problems)
    for problem in report.problems:
        client.command((problem.fix or "").rstrip(";"))
    assert check_sink_tables(compiled).ok

    client.command(f"ALTER TABLE {database}.events MODIFY COLUMN note String DEFAULT ''")
    (nullable,) = check_sink_tables(compiled).problems
    assert nullable.kind == "type_mismatch" and "not Nullable" in nullable.detail


def test_clickhouse_create_missing_then_the_check_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ch: tuple[Any, str, str]
) -> None:
    client, database, url = ch
    compiled = _compile(tmp_path, monkeypatch, "ch", ch_url=url, ch_table=f"{database}.events")

    report = check_sink_tables(compiled, sink_keys={"events_ch": "ch/events"}, create_missing=True)

    assert report.ok and report.created == ("ch/events",), report.describe("events")
    engine, key = client.query(
        "SELECT engine, sorting_key FROM system.tables WHERE database = {d:String} AND name = 'events'",
        parameters={"d": database},
    ).result_rows[0]
    assert (engine, key) == ("MergeTree", "event_id")
    again = check_sink_tables(compiled, create_missing=True)
    assert again.ok and again.created == ()


def test_unreachable_clickhouse_is_reported_within_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    silent = socket.socket()  # accepts connections (kernel backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        url = f"http://default:{PASSWORD}@127.0.0.1:{port}"
        compiled = _compile(tmp_path, monkeypatch, "ch", ch_url=url)
        started = time.monotonic()
        report = check_sink_tables(compiled, sink_keys={"events_ch": "ch/events"}, timeout_s=1)
        elapsed = time.monotonic() - started
    finally:
        silent.close()
    (problem,) = report.problems
    assert problem.kind == "unreachable" and problem.asset_key == "ch/events"
    assert f"127.0.0.1:{port}" in problem.detail
    assert elapsed < 5, elapsed
    assert PASSWORD not in _texts(report)


# -- Delta -------------------------------------------------------------------------------------------


def test_delta_not_yet_existing_is_pending_and_a_mismatching_one_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = tmp_path / "delta" / "events"
    compiled = _compile(tmp_path, monkeypatch, "delta", delta_uri=str(uri))

    pending = check_sink_tables(compiled, sink_keys=KEYS)
    assert pending.ok and pending.checked == ()
    assert len(pending.pending) == 1 and "will be created" in pending.pending[0]
    assert "delta/events" in pending.describe("events")

    schema = pa.schema([("event_id", pa.string()), ("value", pa.string()), ("extra", pa.int64())])
    write_deltalake(str(uri), pa.Table.from_pylist([], schema=schema))
    report = check_sink_tables(compiled, sink_keys=KEYS)
    assert set(_kinds(report)) == {
        ("type_mismatch", "value"),
        ("missing_column", "doubled"),
        ("missing_column", "note"),
        ("extra_column", "extra"),
    }, report.describe("events")
    assert report.pending == () and report.checked == ("delta/events",)
    assert all(p.asset_key == "delta/events" for p in report.problems)


def test_delta_table_written_as_loom_writes_it_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = str(tmp_path / "delta" / "events")
    compiled = _compile(tmp_path, monkeypatch, "delta", delta_uri=uri)
    rows = [{"event_id": "a", "value": 1, "doubled": 2, "note": "n"}]
    write_deltalake(uri, pa.RecordBatch.from_pylist(rows))  # what loom's Delta partition stages
    report = check_sink_tables(compiled, sink_keys=KEYS)
    assert report.ok and report.checked == ("delta/events",), report.describe("events")
    assert DeltaTable(uri).version() == 0


def test_example_setup_creates_every_table_the_example_flows_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clickhouse: Any
) -> None:
    from definitions.setup_dev import create_example_tables

    # the example location is imported under this test's data dir: forget it afterwards, or a later
    # test importing it would get a location built with this test's environment
    for module in ("definitions.definitions", "definitions.flows.orders", "definitions.flows.ledger"):
        if module not in sys.modules:
            monkeypatch.setitem(sys.modules, module, None)
            monkeypatch.delitem(sys.modules, module)
    monkeypatch.setenv("LOOM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LOOM_CLICKHOUSE_URL", clickhouse.url)
    first = dict(create_example_tables(environment="development"))
    assert set(first) == {"orders_enrichment", "order_ledger"}
    assert first["order_ledger"].created == ("order_ledger/ledger_sql",)
    assert first["orders_enrichment"].pending and first["orders_enrichment"].checked
    with sqlite3.connect(tmp_path / "data" / "warehouse.db") as conn:
        assert [r[1] for r in conn.execute("PRAGMA table_info(order_ledger)")] == [
            "order_id",
            "customer_id",
            "amount_cents",
            "band",
        ]
    second = dict(create_example_tables(environment="development"))
    assert all(r.ok and not r.created for r in second.values())  # idempotent
