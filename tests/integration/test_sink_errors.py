"""A job that cannot write is not healthy: the status record carries the sink error, ``job_running``
names it, and deterministic failures (exit 2, the same error twice in a row) are not restarted forever.

Real parts: the session Kafka broker, SQLite sink tables, jobs deployed through ``dg.materialize`` with
``LoomDeployResource``, and the health sensor evaluated on a real Dagster instance. A restart run the
sensor requests is executed the way the daemon would: a materialization carrying the request's tags.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import msgspec
import pytest
from loom.core.observability.event import LifecycleEvent, Scope

from loom_dagster import (
    DeploymentStore,
    LoomDeployResource,
    LoomFlowSpec,
    build_loom_asset_graph,
    build_loom_defs,
)
from loom_dagster.core import procfs
from loom_dagster.core.deploy.restart_policy import load_cursor
from loom_dagster.core.job.status import JobStatus, SinkError, read_status
from loom_dagster.core.sensor_settings import JobHealthSettings
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.dev.produce import produce
from loom_dagster.runtime.observer import StatusObserver
from loom_dagster.sensors.health import build_job_health_sensor
from tests.conftest import make_topics, write_yaml
from tests.flows.sql_rows import Reading
from tests.support.deploy_env import kill_deployed_jobs

FLOW = "readings"
FLOW_KEY = dg.AssetKey(["loom", FLOW])
TABLE_DDL = "CREATE TABLE readings (id VARCHAR NOT NULL, value INTEGER NOT NULL)"
FROZEN_TRIGGER = "CREATE TRIGGER readings_frozen BEFORE INSERT ON readings BEGIN SELECT RAISE(ABORT, 'readings are frozen'); END"
NO_BACKOFF = JobHealthSettings(backoff_initial_s=0.0, backoff_max_s=0.0, max_restarts=10)


# ----- unit test: the observer (the restart policy's own: tests/core/deploy/test_restart_policy.py)


def test_observer_keeps_the_last_sink_error_redacted_and_marks_recovery() -> None:
    observer = StatusObserver()
    secret = "postgresql://app:hunter2@db/x " + "y" * 5000
    observer.on_event(
        LifecycleEvent.exception(
            scope=Scope.WRITE,
            name="f:orders_sql",
            error=f"(OperationalError) no such table: orders\n[SQL: INSERT] {secret}",
            meta={"sink": "orders_sql", "batch_size": 3, "error_type": "OperationalError"},
        )
    )
    error = observer.snapshot().sink_error
    assert error is not None and error.sink == "orders_sql" and error.count == 1 and error.active
    assert "hunter2" not in error.error and error.error.startswith(
        "(OperationalError) no such table: orders\n"
    )
    assert len(error.error) <= 8000 and observer.snapshot().errors == 3
    observer.on_event(
        LifecycleEvent.end(
            scope=Scope.WRITE, name="f:orders_sql", meta={"sink": "orders_sql", "batch_size": 3}
        )
    )
    recovered = observer.snapshot().sink_error
    assert recovered is not None and recovered.recovered_at is not None and not recovered.active
    status = JobStatus(flow="f", pid=1, host="h", sink_error=recovered)
    assert JobStatus.from_dict(status.to_dict()).sink_error == recovered


# ----- real jobs


@dataclass
class SqlBench:
    """The ``readings`` flow (Kafka -> SQLite table) on a unique topic prefix, with its own state dir."""

    bootstrap: str
    prefix: str
    root: Path
    produced: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        make_topics(self.bootstrap, self.prefix, ["readings"], 1)
        self.db = self.root / "warehouse.db"
        self.config = write_yaml(
            self.root / "config" / "base.yaml",
            f"""
            kafka:
              consumer:
                brokers: ["{self.bootstrap}"]
                group_id: {self.prefix}-readings
                topics: [{self.prefix}.readings]
                delivery: at_least_once
                auto_offset_reset: earliest
            streaming:
              runtime: {{epoch_interval_ms: 200}}
              sinks:
                readings_sql: {{database: warehouse, buffer_max_records: 5, buffer_max_age_s: 1}}
            database:
              warehouse: {{url: "sqlite+aiosqlite:///{self.db}"}}
            """,
        ).parent
        self.state_dir = self.root / "state"
        self.store = DeploymentStore(self.state_dir)

    def sql(self, *statements: str) -> None:
        """Run DDL on the sink database."""
        with sqlite3.connect(self.db) as connection:
            for statement in statements:
                connection.execute(statement)

    def rows(self) -> set[str]:
        """Ids in the sink table."""
        with sqlite3.connect(self.db) as connection:
            return {row[0] for row in connection.execute("SELECT id FROM readings")}

    def resource(self) -> LoomDeployResource:
        return LoomDeployResource(state_dir=str(self.state_dir), health_timeout_s=60.0)

    def spec(self) -> LoomFlowSpec:
        return LoomFlowSpec("tests.flows.sql_rows:readings_flow", config=self.config, environment="test")

    def materialize(self, instance: dg.DagsterInstance, tags: dict[str, str] | None = None) -> bool:
        """Materialize (deploy) the flow; *tags* are a run request's (what the daemon would launch)."""
        defs = build_loom_defs([self.spec()])
        result = dg.materialize(
            list(defs.assets or []),
            selection=[FLOW_KEY],
            resources={"loom": self.resource()},
            instance=instance,
            tags=tags,
            raise_on_error=False,
        )
        return result.success

    def produce(self, count: int) -> None:
        start = len(self.produced)
        ids = [f"r-{i}" for i in range(start, start + count)]
        produce(
            self.bootstrap, f"{self.prefix}.readings", [Reading(id=i, value=n) for n, i in enumerate(ids)]
        )
        self.produced.extend(ids)

    def wait_dead(self, timeout_s: float = 60.0) -> JobStatus:
        """Wait until the current deployment's process has exited; its final status record."""
        current = self.store.current(FLOW)
        assert current is not None
        (proc,) = current.job.processes
        deadline = time.monotonic() + timeout_s
        while procfs.is_alive(proc.pid, proc.start_ticks):
            assert time.monotonic() < deadline, f"job pid {proc.pid} still alive after {timeout_s}s"
            time.sleep(0.1)
        status = read_status(proc.status_path)
        assert status is not None
        return status

    def tick(
        self, instance: dg.DagsterInstance, cursor: str | None, settings: JobHealthSettings = NO_BACKOFF
    ) -> tuple[dg.SensorResult, dg.AssetCheckEvaluation]:
        """One evaluation of the health sensor: its result and the ``job_running`` evaluation."""
        sensor = build_job_health_sensor(build_loom_asset_graph([self.spec()]), settings)
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"loom": self.resource()}
        )
        result = sensor(context)
        assert isinstance(result, dg.SensorResult)
        (check,) = [e for e in result.asset_events or [] if isinstance(e, dg.AssetCheckEvaluation)]
        return result, check

    def stop_everything(self) -> None:
        """SIGKILL every job this bench launched, by PID + start time, then any leftover by PID."""
        kill_deployed_jobs(self.store, [FLOW], self.state_dir)


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[SqlBench]:
    bench = SqlBench(kafka.bootstrap_servers, topic_prefix, tmp_path)
    try:
        yield bench
    finally:
        bench.stop_everything()


def _requests(result: dg.SensorResult) -> list[dg.RunRequest]:
    return list(result.run_requests or [])


def _text(check: dg.AssetCheckEvaluation, name: str) -> Any:
    return check.metadata[name].value


@pytest.mark.kafka
@pytest.mark.slow
def test_dropped_table_kills_the_job_and_the_check_names_it(bench: SqlBench) -> None:
    bench.sql(TABLE_DDL)
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance)
        bench.sql("DROP TABLE readings")
        bench.produce(20)
        status = bench.wait_dead()

        # The status record: which sink, when, the whole error, how many failed writes; the final error.
        error = status.sink_error
        assert error is not None and error.sink == "readings_sql" and error.active and error.count >= 1
        assert "no such table: readings" in error.error and "[SQL: INSERT INTO readings" in error.error
        assert error.error_type == "OperationalError" and status.started_at < error.at <= time.time()
        assert status.exit_code == 1 and status.sinks["readings_sql"].failed_writes >= 1
        assert (status.error or "").startswith("failed at run time: sink 'readings_sql' failed to write: ")

        # job_running fails naming the sink and the error; the first death is restarted.
        result, check = bench.tick(instance, None)
        assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
        description = check.description or ""
        assert description.startswith("dead: sink 'readings_sql' failed to write")
        assert "no such table: readings" in description and "restart requested" in description
        assert _text(check, "loom/sink_error/sink") == "readings_sql"
        assert "no such table: readings" in _text(check, "loom/sink_error")
        (request,) = _requests(result)

        # Restarts fail the same way (the pre-launch table check refuses the missing table): twice in a
        # row with the same error, and the sensor stops asking.
        assert not bench.materialize(instance, tags=request.tags)
        result, check = bench.tick(instance, result.cursor)
        (request,) = _requests(result)
        assert not bench.materialize(instance, tags=request.tags)
        result, check = bench.tick(instance, result.cursor)
        assert _requests(result) == []
        description = check.description or ""
        assert description.startswith(
            "failed 2 times with the same error; restarting won't help until the cause is fixed: "
        ), description
        assert "readings" in description and not check.passed
        result, check = bench.tick(instance, result.cursor)
        assert _requests(result) == [] and (check.description or "").startswith("failed 2 times")

        # Fixed and materialized again: a new deployment clears the halt, and nothing was lost.
        bench.sql(TABLE_DDL)
        assert bench.materialize(instance)
        result, check = bench.tick(instance, result.cursor)
        assert check.passed and _requests(result) == []
        assert load_cursor(result.cursor)[FLOW].halted is None
        bench.produce(5)  # fills one buffer, so the replayed tail is flushed too
        deadline = time.monotonic() + 60
        while not set(bench.produced) <= bench.rows():
            assert time.monotonic() < deadline, f"missing rows: {set(bench.produced) - bench.rows()}"
            time.sleep(0.5)


@pytest.mark.kafka
@pytest.mark.slow
def test_two_identical_job_deaths_stop_the_restarts(bench: SqlBench) -> None:
    bench.sql(TABLE_DDL, FROZEN_TRIGGER)  # the table passes every pre-launch check, but refuses rows
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance)
        bench.produce(20)
        first = bench.wait_dead()
        assert first.sink_error is not None and "readings are frozen" in first.sink_error.error
        result, check = bench.tick(instance, None)
        (request,) = _requests(result)
        assert "readings are frozen" in (check.description or "")

        # The restarted job replays the same rows and dies again: before its health gate (the run
        # fails) or just after it (the run succeeds and the new deployment dies). Either is a death.
        if bench.materialize(instance, tags=request.tags):
            assert bench.wait_dead().pid != first.pid
        result, check = bench.tick(instance, result.cursor)
        assert _requests(result) == []
        description = check.description or ""
        assert description.startswith("failed 2 times with the same error; restarting won't help"), (
            description
        )
        assert "sink 'readings_sql' failed to write" in description and "readings are frozen" in description
        assert _text(check, "loom/same_error_deaths") == 2
        result, _ = bench.tick(instance, result.cursor)
        assert _requests(result) == []


@pytest.mark.kafka
@pytest.mark.slow
def test_bad_input_exit_2_is_never_restarted(bench: SqlBench) -> None:
    bench.sql(TABLE_DDL)
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance)
        deployment = bench.store.current(FLOW)
        assert deployment is not None
        # The job is relaunched with a config file broken since (the code location still loads the
        # good one): it exits 2 at once, before connecting.
        broken = write_yaml(bench.root / "broken" / "base.yaml", "kafka: [this is not a mapping\n")
        launcher = bench.resource().deployer().launcher
        launcher.stop(deployment.job, timeout_s=30)
        request = msgspec.structs.replace(deployment.job.request, config_files=(str(broken),))
        job = launcher.launch(request, str(bench.store.flow_dir(FLOW)))
        bench.store.save(msgspec.structs.replace(deployment, job=job, restarts=deployment.restarts + 1))
        status = bench.wait_dead()
        assert status.exit_code == 2 and status.sink_error is None

        cursor = None
        for _ in range(3):
            result, check = bench.tick(instance, cursor)
            cursor = result.cursor
            assert _requests(result) == []
            assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
            description = check.description or ""
            assert description.startswith("bad input: restarting won't help: cannot load config"), description
            assert _text(check, "loom/exit_code") == 2


def test_sink_error_summary_is_one_line() -> None:
    error = SinkError(sink="s", at=1.0, error="(E) boom\n[SQL: x]", error_type="OperationalError", count=3)
    assert error.summary() == "sink 's' failed to write (3 times): OperationalError: (E) boom"
