"""The chdb-backed ClickHouse HTTP front, driven by clickhouse-connect (loom's client)."""

from __future__ import annotations

import datetime as dt
import gzip
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

clickhouse_connect = pytest.importorskip("clickhouse_connect")
pytest.importorskip("chdb")

from clickhouse_connect.driver.exceptions import DatabaseError  # noqa: E402

from loom_dagster.dev.clickhouse import ChdbHttpServer, decode_body, split_insert  # noqa: E402

ORDERS_DDL = (
    "CREATE TABLE analytics.orders (order_id String, amount Float64, ts DateTime64(3)) "
    "ENGINE = MergeTree ORDER BY order_id"
)
COLUMNS = ["order_id", "amount", "ts"]
T0 = dt.datetime(2024, 1, 1, 12, 0, 0)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ChdbHttpServer]:
    """A fresh engine per test (chdb holds one engine per process, so never two at once)."""
    with ChdbHttpServer(tmp_path / "ch") as srv:
        yield srv


def _client(srv: ChdbHttpServer, **kwargs: Any) -> Any:
    return clickhouse_connect.get_client(
        host="127.0.0.1", port=srv.port, username="default", password="", **kwargs
    )


def _orders(n: int) -> list[list[Any]]:
    return [[f"o-{i:06d}", i * 0.5, T0 + dt.timedelta(milliseconds=i)] for i in range(n)]


def _create_orders(client: Any) -> None:
    client.command("CREATE DATABASE analytics")
    client.command(ORDERS_DDL)


def test_ping_and_root(server: ChdbHttpServer) -> None:
    for path in ("/ping", "/"):
        with urllib.request.urlopen(server.url + path, timeout=10) as resp:
            assert resp.status == 200
            assert resp.read() == b"Ok.\n"
    assert server.url == f"http://127.0.0.1:{server.port}"


def test_server_version(server: ChdbHttpServer) -> None:
    client = _client(server)
    assert client.server_version == server.version
    assert client.server_version.split(".")[0].isdigit()
    assert client.ping()


@pytest.mark.parametrize("compress", [True, False, "zstd", "gzip"])
def test_insert_and_query_orders(server: ChdbHttpServer, compress: bool | str) -> None:
    client = _client(server, compress=compress)
    _create_orders(client)
    summary = client.insert("analytics.orders", _orders(1000), column_names=COLUMNS)
    assert summary.written_rows == 1000
    result = client.query("SELECT count(), sum(amount), max(ts) FROM analytics.orders")
    count, total, latest = result.result_rows[0]
    assert count == 1000
    assert total == pytest.approx(sum(i * 0.5 for i in range(1000)))
    assert latest == T0 + dt.timedelta(milliseconds=999)


def test_system_parts(server: ChdbHttpServer) -> None:
    client = _client(server)
    _create_orders(client)
    client.insert("analytics.orders", _orders(1000), column_names=COLUMNS)
    rows, modified = client.query(
        "SELECT sum(rows), max(modification_time) FROM system.parts "
        "WHERE database='analytics' AND table='orders' AND active"
    ).result_rows[0]
    assert rows == 1000
    assert isinstance(modified, dt.datetime)
    assert modified.year >= 2024


def test_errors_carry_the_clickhouse_message(server: ChdbHttpServer) -> None:
    client = _client(server)
    with pytest.raises(DatabaseError, match=r"Code: 60\. DB::Exception: .*UNKNOWN_TABLE"):
        client.query("SELECT * FROM nope")
    with pytest.raises(DatabaseError, match=r"Code: 62\. DB::Exception: Syntax error"):
        client.command("SELEC 1")
    with pytest.raises(DatabaseError, match=r"code: 81"):  # X-ClickHouse-Exception-Code header
        _client(server, database="missing_db").command("SELECT 1")
    assert client.command("SELECT 1") == 1  # the engine is still usable


def test_insert_error_leaves_engine_usable(server: ChdbHttpServer) -> None:
    client = _client(server)
    _create_orders(client)
    with pytest.raises(DatabaseError, match=r"Code: \d+\. DB::Exception"):
        client.raw_insert("analytics.orders", COLUMNS, insert_block=b"\x03\x05garbage", fmt="Native")
    client.insert("analytics.orders", _orders(10), column_names=COLUMNS)
    assert client.command("SELECT count() FROM analytics.orders") == 10


def test_database_params_and_settings(server: ChdbHttpServer) -> None:
    client = _client(server)
    _create_orders(client)
    scoped = _client(server, database="analytics")
    scoped.insert("orders", _orders(5), column_names=COLUMNS)
    assert scoped.command("SELECT currentDatabase()") == "analytics"
    assert client.command("SELECT currentDatabase()") == "default"
    bound = client.query("SELECT {who:String}, {n:UInt8} + 1", parameters={"who": "ch", "n": 41})
    assert bound.result_rows == [("ch", 42)]
    limited = client.query("SELECT getSetting('max_threads')", settings={"max_threads": 3})
    assert int(limited.result_rows[0][0]) == 3
    assert int(client.query("SELECT getSetting('max_threads')").result_rows[0][0]) != 3


def test_command_insert_with_data_and_query_param(server: ChdbHttpServer) -> None:
    client = _client(server)
    _create_orders(client)
    csv = "a,1.5,2024-01-01 00:00:00.000\nb,2.5,2024-01-01 00:00:01.000\n"
    client.command("INSERT INTO analytics.orders FORMAT CSV", data=csv)
    client.command("INSERT INTO analytics.orders VALUES ('c', 3, now64(3))")
    assert client.command("SELECT count(), sum(amount) FROM analytics.orders") == ["3", "7"]


def test_dataframe_and_arrow(server: ChdbHttpServer) -> None:
    pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    client = _client(server)
    _create_orders(client)
    client.insert("analytics.orders", _orders(100), column_names=COLUMNS)
    df = client.query_df("SELECT order_id, amount FROM analytics.orders ORDER BY order_id")
    assert len(df) == 100 and df["amount"].sum() == pytest.approx(2475.0)
    table = client.query_arrow("SELECT order_id FROM analytics.orders")
    assert table.num_rows == 100


def test_concurrent_clients(server: ChdbHttpServer) -> None:
    _create_orders(_client(server))
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            client = _client(server)
            for _ in range(5):
                client.insert("analytics.orders", _orders(200), column_names=COLUMNS)
                client.query("SELECT count() FROM analytics.orders")
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert _client(server).command("SELECT count() FROM analytics.orders") == 4 * 5 * 200


def test_insert_throughput_10k(server: ChdbHttpServer) -> None:
    client = _client(server)
    _create_orders(client)
    rows = _orders(10_000)
    client.insert("analytics.orders", rows[:10], column_names=COLUMNS)  # warm-up
    started = time.perf_counter()
    client.insert("analytics.orders", rows, column_names=COLUMNS)
    elapsed = time.perf_counter() - started
    print(f"\n10k-row insert through the front: {elapsed * 1000:.1f} ms, {10_000 / elapsed:,.0f} rows/s")
    assert client.command("SELECT count() FROM analytics.orders") == 10_010
    assert elapsed < 10


# ── loom's ClickHouse sink ───────────────────────────────────────────────────────────
# loom/streaming/nodes/_table/common.py (_ClickHouseTablePartition) does exactly:
#   client = clickhouse_connect.get_client(dsn=settings.url, **kwargs)
#       (kwargs = {"connect_timeout": t, "send_receive_timeout": t} when insert_timeout is set)
#   client.insert(settings.table, columns, column_names=column_names, column_oriented=True)
#   client.close()


@pytest.mark.parametrize("timeout_kwargs", [{}, {"connect_timeout": 5, "send_receive_timeout": 5}])
def test_loom_sink_calls(server: ChdbHttpServer, timeout_kwargs: dict[str, int]) -> None:
    _create_orders(_client(server))
    client = clickhouse_connect.get_client(dsn=server.dsn("analytics"), **timeout_kwargs)
    rows = _orders(1000)
    columns = [list(col) for col in zip(*rows, strict=True)]
    client.insert("orders", columns, column_names=COLUMNS, column_oriented=True)
    client.close()
    check = _client(server)
    assert check.command("SELECT count(), sum(amount) FROM analytics.orders") == ["1000", "249750"]


def test_loom_sink_partition(server: ChdbHttpServer) -> None:
    """Drive loom's own ClickHouse partition (private API: skipped if it moves)."""
    table_mod = pytest.importorskip("loom.streaming.nodes._table.common")
    model = pytest.importorskip("loom.core.model")
    partition_cls = getattr(table_mod, "_ClickHouseTablePartition", None)
    if partition_cls is None:
        pytest.skip("loom's ClickHouse partition moved")
    _create_orders(_client(server))

    class Order(model.LoomStruct):  # type: ignore[misc, name-defined]
        order_id: str
        amount: float
        ts: dt.datetime

    config = table_mod.ClickHouseSinkConfig.from_config(
        {"url": server.dsn("analytics"), "table": "orders", "buffer_max_records": 400},
        default_table="orders",
    )
    partition = partition_cls(config, Order)
    written = partition.write_batch([Order(f"o{i}", 1.0, T0) for i in range(1000)])
    written += partition.close()
    assert written == 1000
    assert _client(server).command("SELECT count(), sum(amount) FROM analytics.orders") == ["1000", "1000"]


# ── auth, CLI, body decoding ─────────────────────────────────────────────────────────


def test_optional_password(tmp_path: Path) -> None:
    with ChdbHttpServer(tmp_path / "ch", password="s3cret") as srv:
        with pytest.raises(DatabaseError, match="AUTHENTICATION_FAILED"):
            _client(srv)
        client = clickhouse_connect.get_client(
            host="127.0.0.1", port=srv.port, username="default", password="s3cret"
        )
        assert client.command("SELECT 1") == 1
        assert clickhouse_connect.get_client(dsn=srv.dsn()).command("SELECT 2") == 2


def test_cli_serve_foreground(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loom_dagster.dev.clickhouse",
            "serve",
            "--data-dir",
            str(tmp_path / "d"),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "/ping", timeout=10) as resp:
            assert resp.read() == b"Ok.\n"
        port = int(url.rsplit(":", 1)[1])
        client = clickhouse_connect.get_client(host="127.0.0.1", port=port)
        client.command("CREATE TABLE t (x UInt8) ENGINE = MergeTree ORDER BY x")
        client.insert("t", [[1], [2]], column_names=["x"])
        assert client.command("SELECT sum(x) FROM t") == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_decode_body_concatenated_frames() -> None:
    import lz4.frame
    import zstandard

    parts = [b"INSERT INTO t FORMAT Native\n", b"\x0a" * 10, b"tail"]
    whole = b"".join(parts)
    assert decode_body(b"".join(lz4.frame.compress(p) for p in parts), "lz4") == whole
    assert decode_body(b"".join(zstandard.compress(p) for p in parts), "zstd") == whole
    assert decode_body(b"".join(gzip.compress(p) for p in parts), "gzip") == whole
    assert decode_body(whole, None) == whole


def test_split_insert_keeps_leading_newline_of_data() -> None:
    # A Native block with 10 columns starts with byte 0x0a ("\n"): only ONE newline is the separator.
    parsed = split_insert(b"INSERT INTO db.t (`a`, `b`) FORMAT Native\n\x0a\x01rest")
    assert parsed == ("INSERT INTO db.t (`a`, `b`)", "Native", b"\x0a\x01rest")
    assert split_insert(b"INSERT INTO t VALUES (1)") is None
    assert split_insert(b"SELECT 1 FORMAT Native") is None
