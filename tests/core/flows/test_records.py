"""The msgspec records keep their on-disk and cursor shapes: status files and sensor cursors written by
the earlier hand-written code load, and what is written now is byte-for-byte what was written then."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from loom_dagster.core.flows.records import SinkBackend
from loom_dagster.core.job.status import JobStatus, SinkError, SinkStatus, read_status, write_status
from loom_dagster.core.sinks.reading import ReadStatus, SinkReading
from loom_dagster.core.sinks.targets import SinkTarget
from loom_dagster.runtime.reporter import StatusReporter
from loom_dagster.sensors.sinks import SinkState, dump_cursor, load_cursor

# Written by the dataclass version (json.dumps(asdict(status), separators=(",", ":"), sort_keys=True)).
OLD_STATUS = (
    '{"connected_at":1.75,"error":null,"errors":1,"exit_code":null,"flow":"orders","heartbeat_at":2.0,'
    '"host":"h","last_poll_at":null,"partitions":3,"pid":42,"process_id":1,"records_in":3,"records_out":4,'
    '"sink_error":{"at":1.0,"count":2,"error":"boom\\nx","error_type":"E","first_at":0.5,"recovered_at":null,'
    '"sink":"s"},"sinks":{"d":{"failed_writes":0,"last_write_at":1.9,"records":3},"e":{"failed_writes":0,'
    '"last_write_at":null,"records":0}},"started_at":1.5,"state":"running"}'
)
# Written by the dataclass SinkState (json.dumps({"v": 1, "sinks": ...}, separators=(",", ":"))).
OLD_CURSOR = (
    '{"v":1,"sinks":{"delta/ticks":{"ok":true,"m":"5","v":5,"r":10,"lm":1795885470.123,"d":1795885470.123,'
    '"c":"fresh","ct":1795885471.5},"sql/db/t":{"ok":false,"c":"missing","ct":1795885471.5}}}'
)


def _status() -> JobStatus:
    return JobStatus(
        flow="orders",
        pid=42,
        host="h",
        state="running",
        started_at=1.5,
        heartbeat_at=2.0,
        connected_at=1.75,
        records_in=3,
        records_out=4,
        errors=1,
        sinks={"d": SinkStatus(last_write_at=1.9, records=3), "e": SinkStatus()},
        sink_error=SinkError(sink="s", at=1.0, error="boom\nx", error_type="E", count=2, first_at=0.5),
        process_id=1,
        partitions=3,
    )


def test_status_file_keeps_its_shape(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_text(OLD_STATUS)
    assert read_status(path) == _status()
    write_status(path, _status(), durable=True)
    assert path.read_text() == OLD_STATUS
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed over the record
    assert JobStatus.from_dict(json.loads(OLD_STATUS)).to_dict() == json.loads(OLD_STATUS)


def test_older_and_damaged_status_files(tmp_path: Path) -> None:
    data = json.loads(OLD_STATUS)
    older = {k: v for k, v in data.items() if k not in ("sink_error", "process_id", "partitions", "host")}
    status = JobStatus.from_dict({**older, "future_field": 1, "records_in": None})
    assert (status.host, status.records_in, status.sink_error, status.partitions) == ("", 0, None, None)
    kept = JobStatus.from_dict({**data, "sink_error": {"sink": 3}, "sinks": {"x": 5, "y": {"records": None}}})
    assert kept.sink_error is None and kept.sinks == {"y": SinkStatus()}
    for bad in (
        {**data, "state": "weird"},
        {**data, "pid": "x"},
        {k: v for k, v in data.items() if k != "flow"},
    ):
        with pytest.raises(ValueError, match="not a loom-dagster job status record"):
            JobStatus.from_dict(bad)
    path = tmp_path / "status.json"
    for text in (OLD_STATUS[:60], "", "[]", '{"flow": "f"}'):
        path.write_text(text)
        assert read_status(path) is None
    assert read_status(tmp_path / "missing.json") is None
    assert SinkError.from_dict(None) is None
    assert SinkError.from_dict({"sink": "s", "at": 2, "count": None}) == SinkError(sink="s", at=2.0, error="")


def test_reporter_snapshots_are_copies(tmp_path: Path) -> None:
    reporter = StatusReporter(tmp_path / "status.json", _status())
    snapshot = reporter.snapshot()
    snapshot.sinks["new"] = SinkStatus(records=1)
    assert "new" not in reporter.snapshot().sinks
    reporter.set_state("stopped", exit_code=0)
    final = read_status(tmp_path / "status.json")
    assert final is not None and final.state == "stopped" and final.exit_code == 0


def test_sink_reading_round_trips() -> None:
    reading = SinkReading(
        "delta/t",
        SinkBackend.DELTA,
        ReadStatus.OK,
        1.0,
        marker="3",
        version=3,
        rows=9,
        extra={"partial": True},
    )
    as_json = reading.to_json()
    assert list(as_json) == [
        "asset_key", "backend", "status", "read_at", "marker", "version", "last_modified", "rows",
        "rows_added", "read_ms", "error", "extra",
    ]  # fmt: skip
    assert as_json["backend"] == "delta" and as_json["status"] == "ok"
    assert SinkReading.from_json(json.loads(json.dumps(as_json))) == reading
    assert SinkReading.from_json({**as_json, "read_ms": None, "extra": None}).extra == {}
    with pytest.raises(ValueError):
        SinkReading.from_json({**as_json, "backend": "parquet"})
    with pytest.raises(AttributeError):
        reading.rows = 1  # type: ignore[misc]
    assert msgspec.structs.replace(reading, rows=10).rows == 10


def test_sensor_cursor_written_by_the_old_code_loads() -> None:
    targets = [
        SinkTarget(key, backend, "t", None, "x", ("f",), ("loom/f",))
        for key, backend in (("delta/ticks", SinkBackend.DELTA), ("sql/db/t", SinkBackend.SQL))
    ]
    states = load_cursor(OLD_CURSOR, targets)
    ticks, table = states["delta/ticks"], states["sql/db/t"]
    assert ticks.reading is not None and ticks.reading.backend is SinkBackend.DELTA
    assert (ticks.reading.marker, ticks.reading.version, ticks.reading.rows) == ("5", 5, 10)
    assert (ticks.reading.last_modified, ticks.last_data_at, ticks.check_status) == (
        1795885470.123,
        1795885470.123,
        "fresh",
    )
    assert table == SinkState(check_status="missing", check_at=1795885471.5)
    assert dump_cursor(states) == OLD_CURSOR
    assert load_cursor('{"v":1,"sinks":{"delta/ticks":{"ok":true,"v":"x"}}}', targets) == {}
    assert SinkState.from_json({"m": "1"}, targets[0]) == SinkState()  # no "ok": no reading


def test_a_deployment_record_holding_env_values_loads_and_is_rewritten_without_them(tmp_path: Path) -> None:
    """Records written before env values moved out load as they are (a restart gets the values); the next
    write keeps only the names and a reference, and reading it back gives the same record."""
    from loom_dagster.core.deploy.store import Deployment, DeploymentStore

    old = {
        "config_hash": "c", "deployed_at": 1.0, "flow_name": "f", "plan_hash": "p",
        "job": {
            "flow_name": "f", "host": "h", "launcher": "local", "log_path": "", "processes": [], "started_at": 1.0,
            "request": {
                "config_files": [], "config_hash": "c", "environment": "test", "flow_name": "f",
                "import_path": "m:f", "plan_hash": "p", "env": [["DB_PASSWORD", "hunter2"], ["MODE", "x"]],
            },
        },
    }  # fmt: skip
    store = DeploymentStore(tmp_path / "state")
    (store.flow_dir("f") / "deployment.json").write_text(json.dumps(old))
    record = store.current("f")
    assert record is not None and record.job.request.env == (("DB_PASSWORD", "hunter2"), ("MODE", "x"))
    store.save(record)
    written = (store.flow_dir("f") / "deployment.json").read_text()
    assert "hunter2" not in written and "hunter2" not in (store.flow_dir("f") / "history.jsonl").read_text()
    request = json.loads(written)["job"]["request"]
    assert request["env"] == [["DB_PASSWORD", ""], ["MODE", ""]] and request["env_ref"].startswith(
        "file:env/"
    )
    assert store.current("f") == record == store.history("f")[0]
    assert Deployment.decode(written).job.request.env_ref == request["env_ref"]  # the stored shape decodes
