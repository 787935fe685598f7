"""Sink health: real Delta tables, a real ClickHouse engine, real SQLite files and a real Dagster instance.

The sensor is evaluated tick by tick with an injected clock; its asset events are replayed into the
instance with ``report_runless_asset_event`` (what the daemon does) and read back from storage.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pytest
import sqlalchemy as sa
from deltalake import write_deltalake

from loom_dagster import LoomFlowSpec, build_loom_asset_graph
from loom_dagster.asset_check_names import KAFKA_LAG, SINK_FRESHNESS
from loom_dagster.asset_graph import LoomAssetGraph, graph_sinks
from loom_dagster.core.sensor_settings import SinkFreshness, SinkHealthSettings
from loom_dagster.core.sinks.connections import sync_sqlalchemy_url
from loom_dagster.core.sinks.freshness import FreshnessStatus
from loom_dagster.core.sinks.read import read_sink
from loom_dagster.core.sinks.reading import ReadStatus, SinkReading
from loom_dagster.core.sinks.targets import sink_targets
from loom_dagster.sensors.sinks import build_sink_freshness_checks, build_sink_health_sensor
from tests.conftest import shapes_config

SHAPES = "tests.flows.shapes:make_flow"
AUDIT = "tests.flows.shapes:make_second_reader"
SENSOR = "loom_sink_health"
FLOW_KEY = dg.AssetKey(["loom", "events"])
DELTA_KEY = dg.AssetKey(["delta", "events"])
SQL_KEY = dg.AssetKey(["sql", "warehouse", "events"])
PASSWORD = "hunter2-Sup3rSecret"
WINDOWS = SinkFreshness(warn_after_s=300, fail_after_s=3600)


# -- helpers --------------------------------------------------------------------------------------


class Clock:
    """An injected sensor clock."""

    def __init__(self, now: float | None = None) -> None:
        self.now = now if now is not None else time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """Definitions with the sink health sensor and checks, an instance, and the sensor's cursor."""

    graph: LoomAssetGraph
    defs: dg.Definitions
    instance: dg.DagsterInstance
    clock: Clock
    checks: list[dg.AssetChecksDefinition]
    cursor: str | None = None
    logs: list[str] = field(default_factory=list)

    def tick(self) -> list[Any]:
        """One sensor tick; its asset events are stored as the daemon would store them."""
        sensor = self.defs.resolve_sensor_def(SENSOR)
        context = dg.build_sensor_context(instance=self.instance, cursor=self.cursor, definitions=self.defs)
        result = sensor.evaluate_tick(context)
        for event in result.asset_events:
            self.instance.report_runless_asset_event(event)
        self.cursor = result.cursor
        self.logs.append(json.dumps([repr(e) for e in result.asset_events]))
        return list(result.asset_events)

    def run_check(self, key: dg.AssetKey) -> dg.AssetCheckEvaluation:
        """Run one declared freshness check in a run, as the UI's "Execute" button does."""
        result = dg.materialize(
            [*self.checks, *(n.spec for n in self.graph.flows), *self.graph.external_specs],
            selection=dg.AssetSelection.checks(dg.AssetCheckKey(key, SINK_FRESHNESS)),
            instance=self.instance,
        )
        assert result.success
        (evaluation,) = result.get_asset_check_evaluations()
        assert evaluation.asset_key == key
        return evaluation

    def materializations(self, events: Sequence[Any]) -> list[dg.AssetMaterialization]:
        return [e for e in events if isinstance(e, dg.AssetMaterialization)]

    def evaluations(self, events: Sequence[Any]) -> list[dg.AssetCheckEvaluation]:
        return [e for e in events if isinstance(e, dg.AssetCheckEvaluation)]

    def stored_metadata(self, key: dg.AssetKey) -> dict[str, Any]:
        event = self.instance.get_latest_materialization_event(key)
        assert event is not None and event.asset_materialization is not None
        return {k: getattr(v, "value", v) for k, v in event.asset_materialization.metadata.items()}

    def stored_check(self, key: dg.AssetKey, name: str = SINK_FRESHNESS) -> dg.AssetCheckEvaluation:
        check_key = dg.AssetCheckKey(asset_key=key, name=name)
        record = self.instance.event_log_storage.get_latest_asset_check_execution_by_key([check_key])[
            check_key
        ]
        assert record.evaluation is not None
        return record.evaluation


@pytest.fixture()
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as inst:
        yield inst


def make_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sinks: str, **config: Any) -> LoomAssetGraph:
    """The ``shapes`` flow with the given sinks (delta, ch, sql) compiled into an asset graph."""
    monkeypatch.setenv("LOOM_TEST_SINKS", sinks)
    cfg = shapes_config(tmp_path / "cfg", **config)
    return build_loom_asset_graph([LoomFlowSpec(SHAPES, config=cfg, environment="test")])


def harness(
    graph: LoomAssetGraph,
    instance: dg.DagsterInstance,
    settings: SinkHealthSettings | None = None,
    clock: Clock | None = None,
) -> Harness:
    settings = settings or SinkHealthSettings(default_freshness=WINDOWS)
    clock = clock or Clock()
    checks = build_sink_freshness_checks(graph, settings, clock=clock)
    defs = dg.Definitions(
        assets=[*(n.spec for n in graph.flows), *graph.external_specs],
        asset_checks=checks,
        sensors=[build_sink_health_sensor(graph, settings, clock=clock)],
    )
    return Harness(graph, defs, instance, clock, checks)


def append_delta(uri: Path, rows: int, start: int = 0) -> None:
    """One small append (one commit) to a Delta table."""
    table = pa.table(
        {
            "event_id": [f"e{start + i}" for i in range(rows)],
            "value": list(range(start, start + rows)),
            "doubled": [2 * v for v in range(start, start + rows)],
        }
    )
    write_deltalake(str(uri), table, mode="append")


def commit_time(uri: Path, version: int) -> float:
    line = next(
        json.loads(x)
        for x in (uri / "_delta_log" / f"{version:020d}.json").read_text().splitlines()
        if "commitInfo" in x
    )
    return float(line["commitInfo"]["timestamp"]) / 1000.0


def assert_no_secret(h: Harness, *extra: str) -> None:
    """The password appears in no stored metadata, event, log line or cursor."""
    blobs = [*h.logs, h.cursor or "", *extra]
    for key in h.instance.get_asset_keys():
        for record in h.instance.fetch_materializations(key, limit=100).records:
            blobs.append(repr(record.event_log_entry))
    for target in sink_targets(graph_sinks(h.graph)):
        blobs.append(repr(target))
    assert not [b for b in blobs if PASSWORD in b]


# -- Delta ----------------------------------------------------------------------------------------


def test_new_delta_version_yields_exactly_one_materialization(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance
) -> None:
    uri = tmp_path / "lake" / "events"
    append_delta(uri, 3)
    h = harness(make_graph(tmp_path, monkeypatch, "delta", delta_uri=str(uri)), instance)

    first = h.tick()
    assert [m.asset_key for m in h.materializations(first)] == [DELTA_KEY]
    assert h.stored_metadata(DELTA_KEY)["loom/version"] == 0

    assert h.materializations(h.tick()) == []  # nothing changed
    append_delta(uri, 5, start=3)
    changed = h.materializations(h.tick())
    assert len(changed) == 1
    stored = h.stored_metadata(DELTA_KEY)
    assert stored["loom/version"] == 1
    assert stored["loom/rows_added"] == 5
    assert stored["loom/rows"] == 5
    assert stored["loom/last_data_at"] == pytest.approx(commit_time(uri, 1))
    assert h.materializations(h.tick()) == []

    for _ in range(3):
        append_delta(uri, 2)
    three = h.materializations(h.tick())
    assert len(three) == 1 and h.stored_metadata(DELTA_KEY)["loom/rows_added"] == 6
    assert instance.fetch_materializations(DELTA_KEY, limit=10).records.__len__() == 3


def test_lost_cursor_does_not_report_the_same_data_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance
) -> None:
    uri = tmp_path / "lake" / "events"
    append_delta(uri, 1)
    h = harness(make_graph(tmp_path, monkeypatch, "delta", delta_uri=str(uri)), instance)
    assert len(h.materializations(h.tick())) == 1
    h.cursor = None
    assert h.materializations(h.tick()) == []
    h.cursor = None
    append_delta(uri, 4)
    again = h.materializations(h.tick())
    assert len(again) == 1 and h.stored_metadata(DELTA_KEY)["loom/rows_added"] == 4


def test_delta_maintenance_commits_are_not_new_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance
) -> None:
    from deltalake import DeltaTable

    uri = tmp_path / "lake" / "events"
    for i in range(3):
        append_delta(uri, 1, start=i)
    h = harness(make_graph(tmp_path, monkeypatch, "delta", delta_uri=str(uri)), instance)
    h.tick()
    DeltaTable(str(uri)).optimize.compact()  # a commit that adds no data
    assert h.materializations(h.tick()) == []
    assert h.stored_metadata(DELTA_KEY)["loom/version"] == 2


def test_object_store_path_agrees_with_local_files_and_reports_unreachable(tmp_path: Path) -> None:
    """One Delta reader, two ways to its log: a ``file://`` URI read through delta-rs' object store (the
    path every s3:// / gs:// / az:// table takes) gives the same readings as plain local files; a store
    that refuses connections is *unreachable*, its secret scrubbed. Runs in a child process: deltalake +
    pyarrow can abort the interpreter at exit, which must not become pytest's exit code."""
    uri = tmp_path / "events"
    for i in range(4):
        append_delta(uri, i + 1, start=10 * i)
    script = textwrap.dedent(
        f"""
        import json
        from pathlib import Path
        from loom_dagster.core.flows.records import SinkBackend
        from loom_dagster.core.sinks.delta_log import LocalDeltaLog, ObjectStoreDeltaLog
        from loom_dagster.core.sinks.read import read_sink
        from loom_dagster.core.sinks.read_delta import read_delta
        from loom_dagster.core.sinks.reading import ReadStatus, SinkReading
        from loom_dagster.core.sinks.targets import SinkTarget
        t = SinkTarget("delta/events", SinkBackend.DELTA, "events", None, "x", ("f",), ("loom/f",),
                       connect_url={str(uri)!r})
        prev = SinkReading("delta/events", SinkBackend.DELTA, ReadStatus.OK, 0.0, marker="1", version=1)
        logs = {{"files": LocalDeltaLog(Path({str(uri)!r}) / "_delta_log"),
                 "store": ObjectStoreDeltaLog({uri.as_uri()!r})}}
        out = {{}}
        for name, log in logs.items():
            for label, p in (("first", None), ("since", prev)):
                r = read_delta(t, p, now=1.0, log=log)
                out[f"{{name}}-{{label}}"] = [r.status.value, r.marker, r.version, r.rows, r.rows_added,
                                                  r.last_modified]
        gone = ObjectStoreDeltaLog({(tmp_path / "nothing").as_uri()!r})
        out["store-missing"] = read_delta(t, None, now=1.0, log=gone).status.value
        remote = SinkTarget("delta/r", SinkBackend.DELTA, "r", None, "s3://bucket/r", ("f",), ("loom/f",),
            connect_url="s3://bucket/r", storage_options=(("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_ALLOW_HTTP", "true"), ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"), ("AWS_REGION", "x"),
            ("AWS_SECRET_ACCESS_KEY", {PASSWORD!r})))
        r = read_sink(remote, timeout_s=1)
        out["remote-unreachable"] = [r.status.value, r.error]
        print(json.dumps(out))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("{"))  # rc may be 134 at exit
    out = json.loads(line)
    assert out["files-first"] == ["ok", "3", 3, 4, None, pytest.approx(commit_time(uri, 3))]
    assert out["files-since"] == ["ok", "3", 3, 4, 7, pytest.approx(commit_time(uri, 3))]
    assert out["store-first"] == out["files-first"]
    assert out["store-since"] == out["files-since"]
    assert out["store-missing"] == "missing"
    status, error = out["remote-unreachable"]
    assert status == "unreachable" and "s3://bucket/r" in error and "\x1b" not in error
    assert PASSWORD not in error


# -- ClickHouse -----------------------------------------------------------------------------------


def test_clickhouse_new_parts_yield_one_materialization_and_no_password_leaks(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    instance: dg.DagsterInstance,
    clickhouse: Any,
    topic_prefix: str,
) -> None:
    import clickhouse_connect

    client = clickhouse_connect.get_client(host="127.0.0.1", port=clickhouse.port, username="default")
    client.command(f"CREATE DATABASE {topic_prefix}")
    client.command(
        f"CREATE TABLE {topic_prefix}.events (event_id String, value Int64, doubled Int64, note Nullable(String)) "
        "ENGINE = MergeTree ORDER BY event_id"
    )
    columns = ["event_id", "value", "doubled", "note"]
    key = dg.AssetKey(["clickhouse", topic_prefix, "events"])
    url = f"http://default:{PASSWORD}@127.0.0.1:{clickhouse.port}/{topic_prefix}"
    graph = make_graph(tmp_path, monkeypatch, "ch", ch_url=url, ch_table=f"{topic_prefix}.events")
    h = harness(graph, instance)

    client.insert(
        f"{topic_prefix}.events", [[f"a{i}", i, 2 * i, None] for i in range(10)], column_names=columns
    )
    first = h.materializations(h.tick())
    assert [m.asset_key for m in first] == [key]
    assert h.stored_metadata(key)["dagster/row_count"] == 10
    assert h.materializations(h.tick()) == []

    client.insert(
        f"{topic_prefix}.events", [[f"b{i}", i, 2 * i, None] for i in range(7)], column_names=columns
    )
    assert len(h.materializations(h.tick())) == 1
    stored = h.stored_metadata(key)
    assert (stored["dagster/row_count"], stored["loom/rows_added"]) == (17, 7)
    assert stored["loom/last_data_at"] == pytest.approx(time.time(), abs=120)

    client.command(f"OPTIMIZE TABLE {topic_prefix}.events FINAL")  # a merge is not new data
    assert h.materializations(h.tick()) == []
    assert h.stored_check(key).passed
    assert_no_secret(h)


# -- SQL ------------------------------------------------------------------------------------------


def _sqlite(path: Path) -> sa.Engine:
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(
            sa.text("CREATE TABLE events (event_id TEXT, value INTEGER, doubled INTEGER, ts TIMESTAMP)")
        )
    return engine


def _insert(engine: sa.Engine, n: int, ts: str = "2026-01-01 00:00:00") -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO events VALUES (:e, :v, :d, :ts)"),
            [{"e": f"e{i}", "v": i, "d": 2 * i, "ts": ts} for i in range(n)],
        )


def test_sqlite_rows_yield_one_materialization(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance
) -> None:
    db = tmp_path / "warehouse.db"
    engine = _sqlite(db)
    graph = make_graph(tmp_path, monkeypatch, "sql", sql_url=f"sqlite+aiosqlite:///{db}")
    h = harness(graph, instance)
    _insert(engine, 4)
    assert [m.asset_key for m in h.materializations(h.tick())] == [SQL_KEY]
    assert h.stored_metadata(SQL_KEY)["dagster/row_count"] == 4
    assert h.materializations(h.tick()) == []
    _insert(engine, 3)
    assert len(h.materializations(h.tick())) == 1
    assert h.stored_metadata(SQL_KEY)["loom/rows_added"] == 3
    assert h.stored_check(SQL_KEY).passed


def test_sqlite_timestamp_column_gives_the_data_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance
) -> None:
    db = tmp_path / "warehouse.db"
    engine = _sqlite(db)
    graph = make_graph(tmp_path, monkeypatch, "sql", sql_url=f"sqlite+aiosqlite:///{db}")
    settings = SinkHealthSettings(
        default_freshness=WINDOWS, sql_timestamp_columns={SQL_KEY.to_user_string(): "ts"}
    )
    t0 = 1_800_000_000.0
    h = harness(graph, instance, settings, Clock(t0 + 60))
    _insert(engine, 2, ts="2027-01-15 08:00:00")  # 1_800_000_000 is 2027-01-15T08:00:00Z
    assert len(h.materializations(h.tick())) == 1
    assert h.stored_metadata(SQL_KEY)["loom/last_data_at"] == pytest.approx(t0)
    assert h.stored_check(SQL_KEY).passed
    h.clock.now = t0 + WINDOWS.warn_after_s + 1
    h.tick()
    idle = h.stored_check(SQL_KEY)  # the age past the window is the freshness policy's to judge
    assert idle.passed and idle.metadata["loom/freshness"].value == FreshnessStatus.IDLE.value
    assert idle.metadata["loom/age_s"].value == pytest.approx(WINDOWS.warn_after_s + 1)


def test_sync_urls_and_read_only_sqlite(tmp_path: Path) -> None:
    assert sync_sqlalchemy_url("postgresql+asyncpg://u:p@h:5432/db") == "postgresql://u:p@h:5432/db"
    assert sync_sqlalchemy_url("mysql+aiomysql://u:p@h/db") == "mysql+pymysql://u:p@h/db"
    assert sync_sqlalchemy_url("postgresql+psycopg://u:p@h/db") == "postgresql+psycopg://u:p@h/db"
    missing = tmp_path / "nowhere.db"
    sqlite = sync_sqlalchemy_url(f"sqlite+aiosqlite:///{missing}")
    assert sqlite.startswith("sqlite:///") and "mode=ro" in sqlite
    with pytest.raises(sa.exc.OperationalError):
        sa.create_engine(sqlite).connect()
    assert not missing.exists()  # reading never creates the database file


# -- freshness ------------------------------------------------------------------------------------


def test_freshness_check_leaves_the_age_to_the_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance
) -> None:
    """Past the warn and fail windows with no source lag the check passes (``idle``, the age in its
    metadata): warning and failing on age alone is the sink asset's ``FreshnessPolicy``."""
    uri = tmp_path / "lake" / "events"
    append_delta(uri, 1)
    t0 = commit_time(uri, 0)
    h = harness(
        make_graph(tmp_path, monkeypatch, "delta", delta_uri=str(uri)), instance, clock=Clock(t0 + 10)
    )

    def status() -> tuple[bool, str, dg.AssetCheckSeverity]:
        evaluation = h.stored_check(DELTA_KEY)
        return evaluation.passed, str(evaluation.metadata["loom/freshness"].value), evaluation.severity

    assert len(h.evaluations(h.tick())) == 1
    assert status()[:2] == (True, "fresh")
    h.clock.now = t0 + 200
    assert h.evaluations(h.tick()) == []  # unchanged status: nothing new to store
    h.clock.now = t0 + WINDOWS.warn_after_s + 1
    assert len(h.evaluations(h.tick())) == 1  # fresh -> idle: a new status is stored
    assert status()[:2] == (True, "idle")
    h.clock.now = t0 + WINDOWS.fail_after_s + 1
    h.tick()  # still idle (stored again: the refresh interval has passed)
    stored = h.stored_check(DELTA_KEY)
    assert stored.passed and stored.metadata["loom/freshness"].value == "idle"
    assert stored.metadata["loom/age_s"].value == pytest.approx(WINDOWS.fail_after_s + 1)
    assert "no new data for 60m" in (stored.description or "")
    assert "freshness policy" in (stored.description or "")

    append_delta(uri, 1)
    h.clock.now = commit_time(uri, 1) + 5
    events = h.tick()
    assert len(h.materializations(events)) == 1 and len(h.evaluations(events)) == 1
    assert status()[:2] == (True, "fresh")


def _report_lag(instance: dg.DagsterInstance, metadata: dict[str, Any], passed: bool = False) -> None:
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(asset_key=FLOW_KEY, check_name=KAFKA_LAG, passed=passed, metadata=metadata)
    )


def test_sink_silent_while_its_source_lags_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance
) -> None:
    uri = tmp_path / "lake" / "events"
    append_delta(uri, 1)
    t0 = commit_time(uri, 0)
    graph = make_graph(tmp_path, monkeypatch, "delta", delta_uri=str(uri))
    h = harness(graph, instance, clock=Clock(t0 + WINDOWS.warn_after_s + 30))

    _report_lag(instance, {"total_lag": 0}, passed=True)
    h.tick()
    assert h.stored_check(DELTA_KEY).metadata["loom/freshness"].value == "idle"

    _report_lag(instance, {"total_lag": 1234, "partitions": 3})
    assert h.stored_check(FLOW_KEY, KAFKA_LAG).metadata["total_lag"].value == 1234  # stored runless
    h.tick()
    evaluation = h.stored_check(DELTA_KEY)
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert evaluation.metadata["loom/freshness"].value == FreshnessStatus.SILENT_WHILE_LAGGING.value
    assert evaluation.metadata["loom/source_lag"].value == 1234
    assert "silent while its source lags" in (evaluation.description or "")
    assert "loom/events" in (evaluation.description or "")

    _report_lag(instance, {"state": "OK"})  # the lag sensor may not say a total: tolerated
    h.tick()
    assert h.stored_check(DELTA_KEY).metadata["loom/freshness"].value == "idle"

    _report_lag(instance, {"total_lag": 50})  # within the warn window, lag alone is no failure
    h.clock.now = t0 + 10
    h.tick()
    assert h.stored_check(DELTA_KEY).passed


def test_silent_sink_is_judged_by_the_source_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance
) -> None:
    """With the lag check's delay (``max_delay_s``: age of the oldest unconsumed message), a silent sink
    fails when that delay exceeds the warn window, even with an offset lag of 1; a source whose delay is
    known on every partition and recent is no such failure, whatever its offset lag; an unknown delay
    (null, or partitions not read) falls back to the offset lag."""
    uri = tmp_path / "lake" / "events"
    append_delta(uri, 1)
    t0 = commit_time(uri, 0)
    graph = make_graph(tmp_path, monkeypatch, "delta", delta_uri=str(uri))
    h = harness(graph, instance, clock=Clock(t0 + WINDOWS.warn_after_s + 30))

    def freshness() -> tuple[str, dg.AssetCheckSeverity, dict[str, Any], str]:
        evaluation = h.stored_check(DELTA_KEY)
        metadata = {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}
        return str(metadata["loom/freshness"]), evaluation.severity, metadata, evaluation.description or ""

    _report_lag(instance, {"total_lag": 1, "max_delay_s": 900.0, "delay_unknown_partitions": 0})
    h.tick()
    status, severity, metadata, text = freshness()
    assert (status, severity) == ("silent_while_lagging", dg.AssetCheckSeverity.ERROR)
    assert metadata["loom/source_delay_s"] == 900.0 and metadata["loom/source_lag"] == 1
    assert "oldest unconsumed message is 15m old (delay 900 s > warn_after_s 300" in text

    _report_lag(instance, {"total_lag": 5000, "max_delay_s": 20.0, "delay_unknown_partitions": 0})
    h.tick()
    status, severity, metadata, _ = freshness()
    assert status == "idle" and h.stored_check(DELTA_KEY).passed  # consuming: data arrived 20 s ago
    assert metadata["loom/source_lag"] == 5000 and metadata["loom/source_delay_s"] == 20.0

    _report_lag(instance, {"total_lag": 5000, "max_delay_s": 20.0, "delay_unknown_partitions": 2})
    h.tick()
    status, _, _, text = freshness()
    assert status == "silent_while_lagging" and "is 5000 message(s) behind" in text

    _report_lag(instance, {"total_lag": 0, "max_delay_s": 0.0, "delay_unknown_partitions": 0}, passed=True)
    h.tick()
    assert freshness()[0] == "idle"
    _report_lag(
        instance, {"total_lag": 3, "max_delay_s": dg.MetadataValue.null(), "delay_unknown_partitions": 1}
    )
    h.tick()
    assert freshness()[0] == "silent_while_lagging"


def test_freshness_checks_are_declared_and_runnable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance
) -> None:
    uri = tmp_path / "lake" / "events"
    append_delta(uri, 2)
    t0 = commit_time(uri, 0)
    db = tmp_path / "warehouse.db"
    _insert(_sqlite(db), 2)
    graph = make_graph(
        tmp_path, monkeypatch, "delta,sql", delta_uri=str(uri), sql_url=f"sqlite+aiosqlite:///{db}"
    )
    h = harness(graph, instance, clock=Clock(t0 + WINDOWS.warn_after_s + 5))
    declared = set(h.defs.resolve_asset_graph().asset_check_keys)
    assert {
        dg.AssetCheckKey(DELTA_KEY, SINK_FRESHNESS),
        dg.AssetCheckKey(SQL_KEY, SINK_FRESHNESS),
    } <= declared

    _report_lag(instance, {"total_lag": 7})
    evaluation = h.run_check(DELTA_KEY)
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert evaluation.metadata["loom/freshness"].value == "silent_while_lagging"
    assert h.stored_check(DELTA_KEY).metadata["loom/freshness"].value == "silent_while_lagging"

    evaluation = h.run_check(SQL_KEY)  # no timestamp column, no sensor yet: cannot tell, no failure
    assert (evaluation.metadata["loom/freshness"].value, evaluation.passed) == ("unknown", True)
    assert "loom/age_s" not in evaluation.metadata
    h.clock.now = time.time() + 10
    h.tick()  # the sensor reports a materialization: the check now knows when data landed
    assert h.run_check(SQL_KEY).metadata["loom/freshness"].value == "fresh"


# -- missing and unreachable ----------------------------------------------------------------------


def test_missing_tables_and_unreachable_databases_have_clear_statuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance
) -> None:
    ch_url = f"http://default:{PASSWORD}@127.0.0.1:1/analytics"
    graph = make_graph(
        tmp_path,
        monkeypatch,
        "delta,ch,sql",
        delta_uri=str(tmp_path / "lake" / "never-written"),
        ch_url=ch_url,
        sql_url=f"sqlite+aiosqlite:///{tmp_path / 'absent.db'}",
    )
    h = harness(graph, instance)
    events = h.tick()
    assert h.materializations(events) == []
    by_key = {e.asset_key.to_user_string(): e for e in h.evaluations(events)}
    delta, ch, sql = (
        by_key["delta/events"],
        by_key["clickhouse/analytics/events"],
        by_key["sql/warehouse/events"],
    )
    assert (delta.passed, delta.severity, delta.metadata["loom/freshness"].value) == (
        False,
        dg.AssetCheckSeverity.WARN,
        "missing",
    )
    assert "no Delta table" in (delta.description or "")
    assert (ch.passed, ch.severity, ch.metadata["loom/freshness"].value) == (
        False,
        dg.AssetCheckSeverity.ERROR,
        "unreachable",
    )
    assert (sql.metadata["loom/freshness"].value, sql.severity) == (
        "unreachable",
        dg.AssetCheckSeverity.ERROR,
    )
    assert "unable to open database file" in (sql.description or "")
    assert not (tmp_path / "absent.db").exists()
    assert_no_secret(h, *(repr(e) for e in events))

    with sa.create_engine(f"sqlite:///{tmp_path / 'absent.db'}").begin() as conn:
        conn.execute(sa.text("CREATE TABLE other (x INTEGER)"))
    h.tick()
    missing = h.stored_check(SQL_KEY)
    assert missing.metadata["loom/freshness"].value == "missing"
    assert "table 'events' does not exist" in (missing.description or "")


def test_targets_keep_secrets_out_of_repr_and_merge_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_TEST_SINKS", "delta,ch,sql")
    cfg = shapes_config(
        tmp_path / "cfg",
        ch_url=f"http://default:{PASSWORD}@127.0.0.1:8123",
        sql_url=f"postgresql+asyncpg://app:{PASSWORD}@db:5432/shop",
    )
    graph = build_loom_asset_graph(
        [
            LoomFlowSpec(SHAPES, config=cfg, environment="test"),
            LoomFlowSpec(AUDIT, config=cfg, environment="test"),
        ]
    )
    targets = {t.asset_key: t for t in sink_targets(graph_sinks(graph))}
    assert set(targets) == {"delta/events", "clickhouse/analytics/events", "sql/warehouse/events"}
    assert targets["delta/events"].flow_keys == ("loom/events", "loom/events_audit")
    for target in targets.values():
        assert PASSWORD not in repr(target)
    assert PASSWORD in targets["sql/warehouse/events"].connect_url
    assert targets["clickhouse/analytics/events"].database == "analytics"

    reading = read_sink(targets["sql/warehouse/events"])  # no postgres driver / no server here
    assert reading.status in (ReadStatus.ERROR, ReadStatus.UNREACHABLE)
    assert PASSWORD not in (reading.error or "")
    assert SinkReading.from_json(json.loads(json.dumps(reading.to_json()))) == reading
