"""OpenLineage run events of deployments (``loom_dagster.core.openlineage``).

Events are checked against the official OpenLineage JSON schemas (``tests/data/openlineage``, resolved
locally, no network), dataset names against the naming spec, and the whole sequence (deploy, RUNNING from
the job health sensor, redeploy, a failed deploy, undeploy) as a real HTTP endpoint on loopback receives it
from the client's own HTTP transport, for a flow with a Kafka source and Delta, ClickHouse and SQL sinks.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import jsonschema
import msgspec
import pytest
from referencing import Registry, Resource

from loom_dagster import (
    DeploymentStore,
    LoomDeployResource,
    LoomFlowSpec,
    build_loom_asset_graph,
    build_loom_defs,
)
from loom_dagster.core.deploy.store import Deployment
from loom_dagster.core.flows.catalog import compile_spec
from loom_dagster.core.openlineage import (
    FlowLineage,
    LineageDataset,
    LineageField,
    LineageRun,
    OpenLineageObserver,
    OpenLineageSettings,
    build_event,
    clickhouse_namespace,
    flow_lineage,
    kafka_namespace,
    mongo_namespace,
    new_run_id,
    sql_dataset,
    storage_dataset,
)
from loom_dagster.core.sensor_settings import JobHealthSettings
from loom_dagster.sensors.health import build_job_health_sensor
from tests.conftest import make_topics, shapes_config
from tests.support.deploy_env import DeployBench, bench_fixture, runtime_pids_for

SCHEMAS = Path(__file__).resolve().parents[1] / "data" / "openlineage"
EVENT_SCHEMA = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
PASSWORD = "hunter2-Sup3rSecret"
API_KEY = "ol-api-key-Sekrit"
SINKS = "delta,ch,sql,topic"
FLOW_KEY = dg.AssetKey(["loom", "events"])
ROW_FIELDS = [("event_id", "string"), ("value", "int64"), ("doubled", "int64"), ("note", "string")]


# -- schema validation ----------------------------------------------------------------------------


def _registry() -> Registry:
    resources = []
    for path in sorted(SCHEMAS.glob("*.json")):
        contents = json.loads(path.read_text())
        resources.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources)


REGISTRY = _registry()


def _validate(instance: Any, schema_url: str) -> None:
    """Validate *instance* against the schema at *schema_url*, every ``$ref`` resolved from the local copies."""
    jsonschema.Draft202012Validator(
        {"$ref": schema_url},
        registry=REGISTRY,
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    ).validate(instance)


def validate_event(body: dict[str, Any]) -> None:
    """The event against ``RunEvent``, then every facet against the schema its ``_schemaURL`` names."""
    _validate(body, EVENT_SCHEMA)
    facets = [*body["run"].get("facets", {}).values(), *body["job"].get("facets", {}).values()]
    for dataset in [*body.get("inputs", []), *body.get("outputs", [])]:
        facets += dataset.get("facets", {}).values()
    for facet in facets:
        assert facet["_schemaURL"].split("#")[0] in REGISTRY, facet["_schemaURL"]
        _validate(facet, facet["_schemaURL"])


def _body(event: Any) -> dict[str, Any]:
    from openlineage.client.serde import Serde

    return Serde.to_dict(event)


# -- a lineage endpoint ---------------------------------------------------------------------------


class LineageReceiver:
    """An HTTP server on loopback that records every POSTed event (path, headers, JSON body)."""

    def __init__(self) -> None:
        received: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append((self.path, dict(self.headers), json.loads(body)))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LineageReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def events(self) -> list[dict[str, Any]]:
        return [body for _, _, body in self.received]

    def transport(self, **extra: Any) -> dict[str, Any]:
        """The client config of an HTTP transport posting here."""
        return {"transport": {"type": "http", "url": self.url, **extra}}


@pytest.fixture()
def receiver() -> Iterator[LineageReceiver]:
    with LineageReceiver() as server:
        yield server


# -- naming ---------------------------------------------------------------------------------------


def test_dataset_names_follow_the_naming_spec_without_credentials() -> None:
    assert kafka_namespace(["SASL_SSL://app:pw@B1.example:9093", "b2:9093"]) == "kafka://b1.example:9093"
    assert kafka_namespace(["b1:9092,b2:9092"]) == "kafka://b1:9092"
    assert kafka_namespace(["[::1]:19092"]) == "kafka://[::1]:19092"
    assert kafka_namespace("broker") == "kafka://broker:9092"

    assert storage_dataset("/lake/events") == ("file", "/lake/events")
    assert storage_dataset("file:///lake/events") == ("file", "/lake/events")
    assert storage_dataset("file://nas01/lake/events") == ("file://nas01", "/lake/events")
    assert storage_dataset("s3://AKIA:secret@bucket/lake/events?x=1") == ("s3://bucket", "lake/events")
    assert storage_dataset("s3a://bucket/lake/events") == ("s3://bucket", "lake/events")
    assert storage_dataset("gs://bucket/lake/events") == ("gs://bucket", "lake/events")
    assert storage_dataset("hdfs://nn:8020/lake/events") == ("hdfs://nn:8020", "/lake/events")
    relative = storage_dataset("lake/events")
    assert relative[0] == "file" and relative[1] == str(Path.cwd() / "lake" / "events")

    assert clickhouse_namespace(f"http://default:{PASSWORD}@CH:8124/db") == "clickhouse://ch:8124"
    assert clickhouse_namespace("https://ch.example") == "clickhouse://ch.example:8443"
    assert clickhouse_namespace("http://ch.example") == "clickhouse://ch.example:8123"

    assert sql_dataset(f"postgresql+asyncpg://app:{PASSWORD}@db/shop", "events") == (
        "postgres://db:5432",
        "shop.public.events",
    )
    assert sql_dataset("postgresql://app@db:6432/shop", "sales.events") == (
        "postgres://db:6432",
        "shop.sales.events",
    )
    assert sql_dataset("mysql+aiomysql://app:pw@db/shop", "events") == ("mysql://db:3306", "shop.events")
    assert sql_dataset("mssql+aioodbc://app:pw@db/shop", "events") == ("mssql://db:1433", "shop.dbo.events")
    assert sql_dataset("sqlite+aiosqlite:////srv/w.db", "events") == ("sqlite:///srv/w.db", "events")
    assert sql_dataset("sqlite+aiosqlite:///w.db", "events") == (f"sqlite://{Path.cwd() / 'w.db'}", "events")
    assert mongo_namespace(f"mongodb://app:{PASSWORD}@m1:27018,m2/shop") == "mongodb://m1:27018"


def test_flow_lineage_names_every_source_and_sink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled flow with credentials in every URL: Kafka in, Delta + ClickHouse + SQL + topics out."""
    monkeypatch.setenv("LOOM_TEST_SINKS", SINKS)
    config = shapes_config(
        tmp_path / "cfg",
        brokers="b1.example:9093",
        prefix="p",
        ch_url=f"http://default:{PASSWORD}@ch.example:8123",
        ch_table="analytics.events",
        sql_url=f"postgresql+asyncpg://app:{PASSWORD}@db.example/shop",
    )
    compiled = compile_spec(LoomFlowSpec("tests.flows.shapes:make_flow", config=config, environment="test"))
    lineage = flow_lineage(compiled)

    def names(datasets: tuple[LineageDataset, ...]) -> list[tuple[str, str]]:
        return [(d.namespace, d.name) for d in datasets]

    assert names(lineage.inputs) == [("kafka://b1.example:9093", "p.events")]
    assert lineage.inputs[0].fields == (LineageField("event_id", "string"), LineageField("value", "int64"))
    assert names(lineage.outputs) == [
        ("file", str(tmp_path / "cfg" / "delta" / "events")),
        ("clickhouse://ch.example:8123", "analytics.events"),
        ("postgres://db.example:5432", "shop.public.events"),
        ("kafka://b1.example:9093", "p.events.dlq"),
        ("kafka://b1.example:9093", "p.events.out"),
    ]
    by_name = {d.name: d for d in lineage.outputs}
    assert [(f.name, f.type) for f in by_name["analytics.events"].fields] == ROW_FIELDS
    assert [(f.name, f.type) for f in by_name["p.events.out"].fields] == ROW_FIELDS
    assert by_name["p.events.dlq"].fields == ()
    assert PASSWORD not in msgspec.json.encode(lineage).decode()


# -- events ---------------------------------------------------------------------------------------


def _run(description: str | None = "Doubles events") -> LineageRun:
    row = tuple(LineageField(n, t) for n, t in ROW_FIELDS)
    lineage = FlowLineage(
        "events",
        (LineageDataset("kafka://b1:9092", "events", row[:2]),),
        (LineageDataset("clickhouse://ch:8123", "analytics.events", row), LineageDataset("file", "/lake/e")),
        description,
    )
    return LineageRun(new_run_id("events", 1_800_000_000.0, "dagster-run", "p1"), lineage, "p1", 1.8e9)


def test_events_validate_against_the_openlineage_schemas() -> None:
    run = _run()
    settings = OpenLineageSettings(namespace="loom-prod")
    for kind in ("START", "RUNNING", "COMPLETE", "ABORT"):
        body = _body(build_event(kind, run, settings, at=1_800_000_060.0))
        validate_event(body)
        assert body["eventType"] == kind
        assert body["eventTime"].startswith("2027-01-15T08:01:00")
        assert body["job"] == {**body["job"], "namespace": "loom-prod", "name": "events"}
        job_type = body["job"]["facets"]["jobType"]
        assert (job_type["processingType"], job_type["integration"], job_type["jobType"]) == (
            "STREAMING",
            "LOOM",
            "FLOW",
        )
        assert body["job"]["facets"]["documentation"]["description"] == "Doubles events"
        assert body["run"]["facets"]["processing_engine"]["name"] == "loom"
    failed = _body(build_event("FAIL", run, settings, error=f"boom: http://u:{PASSWORD}@ch:8123"))
    validate_event(failed)
    error = failed["run"]["facets"]["errorMessage"]
    assert error["programmingLanguage"] == "PYTHON" and error["message"] == "boom: http://u:***@ch:8123"

    # The run id is a UUIDv7, derived from the deploy's start, flow, Dagster run and plan: stable.
    assert uuid.UUID(run.run_id).version == 7
    assert run.run_id == new_run_id("events", 1_800_000_000.0, "dagster-run", "p1")
    assert run.run_id != new_run_id("events", 1_800_000_000.0, "dagster-run-2", "p1")

    # The validator is real: a broken event and a broken facet are refused.
    broken = _body(build_event("START", run, settings))
    del broken["run"]["runId"]
    with pytest.raises(jsonschema.ValidationError):
        validate_event(broken)
    facet = _body(build_event("START", run, settings))["job"]["facets"]["jobType"]
    del facet["integration"]
    with pytest.raises(jsonschema.ValidationError):
        _validate(facet, facet["_schemaURL"])


def _deployment(deployed_at: float = 1_800_000_000.0, run_id: str = "dagster-run") -> Deployment:
    return Deployment.decode(
        json.dumps(
            {
                "flow_name": "events",
                "plan_hash": "p1",
                "config_hash": "c1",
                "deployed_at": deployed_at,
                "run_id": run_id,
                "extra": {"source": {"kind": "kafka", "brokers": ["b1:9092"], "topics": ["events"]}},
                "job": {
                    "flow_name": "events",
                    "launcher": "local",
                    "host": "h",
                    "processes": [{"pid": 7, "start_ticks": 1}],
                    "log_path": "",
                    "started_at": deployed_at,
                    "request": {
                        "flow_name": "events",
                        "import_path": "m:f",
                        "config_files": [],
                        "environment": "test",
                        "plan_hash": "p1",
                        "config_hash": "c1",
                    },
                },
            }
        )
    )


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_running_events_once_per_period_on_one_stable_run(tmp_path: Path, receiver: LineageReceiver) -> None:
    """The sensor's RUNNING: at most one per period, all on the deployment's run, and COMPLETE closes it."""
    clock = _Clock(1_800_000_100.0)
    settings = OpenLineageSettings(config=receiver.transport(), running_period_s=300)
    observer = OpenLineageObserver(DeploymentStore(tmp_path), settings, clock=clock)
    deployment = _deployment()
    for now in (1_800_000_100.0, 1_800_000_200.0, 1_800_000_399.0, 1_800_000_400.0, 1_800_000_500.0):
        clock.now = now
        observer.running(deployment)
    observer.undeployed(deployment)
    events = receiver.events
    assert [e["eventType"] for e in events] == ["RUNNING", "RUNNING", "COMPLETE"]
    assert len({e["run"]["runId"] for e in events}) == 1
    assert events[0]["run"]["runId"] == observer.run_of(deployment).run_id
    assert [(d["namespace"], d["name"]) for d in events[0]["inputs"]] == [("kafka://b1:9092", "events")]
    for event in events:
        validate_event(event)
    # Another deployment is another run.
    assert observer.run_of(_deployment(deployed_at=1_800_000_900.0)).run_id != events[0]["run"]["runId"]


def test_a_lineage_endpoint_that_fails_never_fails_and_leaks_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A transport that cannot reach its endpoint, or a client that cannot be built: a redacted warning."""
    transport = {
        "type": "http",
        "url": f"http://svc:{PASSWORD}@127.0.0.1:9",
        "timeout": 2,
        "retry": {"total": 0},
        "auth": {"type": "api_key", "apiKey": API_KEY},
    }
    observer = OpenLineageObserver(
        DeploymentStore(tmp_path), OpenLineageSettings(config={"transport": transport})
    )
    caplog.set_level(logging.WARNING, logger="loom_dagster.core.openlineage")
    started = time.monotonic()
    observer.running(_deployment())
    observer.undeployed(_deployment())
    assert time.monotonic() - started < 10
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("not sent (the deploy goes on)" in w for w in warnings), warnings
    assert not any(PASSWORD in w or API_KEY in w for w in warnings), warnings

    def missing(_: OpenLineageSettings) -> Any:
        raise ImportError(
            "OpenLineage events need openlineage-python: pip install 'loom-dagster[openlineage]'"
        )

    caplog.clear()
    OpenLineageObserver(DeploymentStore(tmp_path), client=missing).undeployed(_deployment())
    assert "pip install 'loom-dagster[openlineage]'" in caplog.text


def test_the_resource_builds_the_observer_only_when_configured(tmp_path: Path) -> None:
    plain = LoomDeployResource(state_dir=str(tmp_path)).deployer()
    assert type(plain.observer).__name__ == "DeployObserver"
    configured = LoomDeployResource(
        state_dir=str(tmp_path),
        openlineage={"transport": {"type": "console"}},
        openlineage_namespace="loom-prod",
        openlineage_running_period_s=60,
    ).deployer()
    assert isinstance(configured.observer, OpenLineageObserver)
    assert configured.observer.settings.job_namespace == "loom-prod"
    assert configured.observer.settings.running_period_s == 60
    assert configured.observer.store.root == plain.store.root


# -- a real deploy sequence -----------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.slow
def test_deploy_running_redeploy_failure_undeploy_reach_a_real_endpoint(
    kafka: Any,
    clickhouse: Any,
    tmp_path: Path,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    receiver: LineageReceiver,
) -> None:
    """Real deploys (local launcher, real broker, ClickHouse, SQLite, Delta) with the client's HTTP
    transport posting to a server on loopback: every event in order, valid, named, and secret-free."""
    monkeypatch.setenv("LOOM_TEST_SINKS", SINKS)
    make_topics(kafka.bootstrap_servers, topic_prefix, ["events", "events.out", "events.dlq"], 1)
    import clickhouse_connect

    client = clickhouse_connect.get_client(host="127.0.0.1", port=clickhouse.port, username="default")
    client.command(f"CREATE DATABASE IF NOT EXISTS {topic_prefix}")
    client.close()
    ch_url = f"http://default:{PASSWORD}@127.0.0.1:{clickhouse.port}"
    config = shapes_config(
        tmp_path / "config",
        brokers=kafka.bootstrap_servers,
        prefix=topic_prefix,
        ch_table=f"{topic_prefix}.events",
        ch_url=ch_url,
    )
    state = tmp_path / "state"
    spec = LoomFlowSpec(
        "tests.flows.shapes:make_flow", config=config, environment="test", env={"LOOM_TEST_SINKS": SINKS}
    )
    defs = build_loom_defs([spec])
    transport = receiver.transport(endpoint="api/v1/lineage", auth={"type": "api_key", "apiKey": API_KEY})

    def resource(period_s: float = 3600.0) -> LoomDeployResource:
        return LoomDeployResource(
            state_dir=str(state),
            health_timeout_s=60,
            create_missing_tables=True,
            connect_timeout_s=3,
            openlineage=transport,
            openlineage_namespace="loom-test",
            openlineage_running_period_s=period_s,
        )

    def materialize(instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            list(defs.assets or []),
            selection=[FLOW_KEY],
            resources={"loom": resource()},
            instance=instance,
            raise_on_error=False,
        )

    sensor = build_job_health_sensor(build_loom_asset_graph([spec]), JobHealthSettings())

    def tick(instance: dg.DagsterInstance, period_s: float) -> None:
        context = dg.build_sensor_context(instance=instance, resources={"loom": resource(period_s)})
        sensor(context)

    timings: dict[str, float] = {}
    try:
        with dg.instance_for_test() as instance:
            started = time.monotonic()
            assert materialize(instance).success
            timings["deploy"] = time.monotonic() - started
            assert [e["eventType"] for e in receiver.events] == ["START", "RUNNING"]

            tick(instance, period_s=3600)  # the deploy's RUNNING counts for this period: nothing new
            assert len(receiver.events) == 2
            time.sleep(0.1)
            tick(instance, period_s=0.05)  # a period later: RUNNING again, on the same run
            assert [e["eventType"] for e in receiver.events] == ["START", "RUNNING", "RUNNING"]

            started = time.monotonic()
            assert materialize(instance).success  # redeploy
            timings["redeploy"] = time.monotonic() - started

            base = config / "base.yaml"
            good = base.read_text()
            base.write_text(good.replace(f"127.0.0.1:{clickhouse.port}", "127.0.0.1:9"))
            started = time.monotonic()
            refused = materialize(instance)  # the ClickHouse table check cannot connect
            timings["failed deploy"] = time.monotonic() - started
            assert not refused.success
            base.write_text(good)

            undeploy = defs.resolve_job_def("loom_undeploy").execute_in_process(
                run_config={"ops": {"undeploy_loom_flows": {"config": {"flows": ["events"]}}}},
                resources={"loom": resource()},
                instance=instance,
            )
            assert undeploy.success
    finally:
        for pid in runtime_pids_for(state):
            os.kill(pid, signal.SIGKILL)
    print(f"\n[openlineage] {', '.join(f'{k} {v:.1f}s' for k, v in timings.items())}")

    events = receiver.events
    kinds = [e["eventType"] for e in events]
    assert kinds == [
        "START",
        "RUNNING",
        "RUNNING",
        "START",
        "COMPLETE",
        "RUNNING",
        "START",
        "FAIL",
        "COMPLETE",
    ]
    runs = [e["run"]["runId"] for e in events]
    first, second, failed = runs[0], runs[3], runs[6]
    assert runs == [first, first, first, second, first, second, failed, failed, second]
    assert len({first, second, failed}) == 3
    assert all(uuid.UUID(r).version == 7 for r in runs)
    error = events[7]["run"]["facets"]["errorMessage"]["message"]
    assert "SinkTablesError" in error and "unreachable" in error and "127.0.0.1:9 " in error, error

    for event in events:
        validate_event(event)
        assert event["job"]["namespace"] == "loom-test" and event["job"]["name"] == "events"
        assert event["job"]["facets"]["jobType"]["processingType"] == "STREAMING"
    inputs = [(d["namespace"], d["name"]) for d in events[0]["inputs"]]
    outputs = {(d["namespace"], d["name"]): d for d in events[0]["outputs"]}
    host, port = kafka.bootstrap_servers.split(",")[0].rsplit(":", 1)
    kafka_ns = f"kafka://{host}:{port}"
    assert inputs == [(kafka_ns, f"{topic_prefix}.events")]
    assert set(outputs) == {
        ("file", str(config / "delta" / "events")),
        (f"clickhouse://127.0.0.1:{clickhouse.port}", f"{topic_prefix}.events"),
        (f"sqlite://{config / 'warehouse.db'}", "events"),
        (kafka_ns, f"{topic_prefix}.events.out"),
        (kafka_ns, f"{topic_prefix}.events.dlq"),
    }
    ch = outputs[(f"clickhouse://127.0.0.1:{clickhouse.port}", f"{topic_prefix}.events")]
    assert [(f["name"], f["type"]) for f in ch["facets"]["schema"]["fields"]] == ROW_FIELDS

    for path, headers, body in receiver.received:
        assert path == "/api/v1/lineage"
        assert headers.get("Authorization") == f"Bearer {API_KEY}"
        text = json.dumps(body)
        assert PASSWORD not in text and API_KEY not in text
        for dataset in [*body["inputs"], *body["outputs"]]:  # no account at all in a dataset's name
            assert "@" not in dataset["namespace"] + dataset["name"] and "default" not in dataset["namespace"]


@pytest.fixture()
def bench(kafka: Any, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


@pytest.mark.kafka
@pytest.mark.slow
def test_a_failed_health_gate_is_a_fail_event(bench: DeployBench, receiver: LineageReceiver) -> None:
    """The deploy bench's ticks flow whose step raises at start: the job fails its gate, the run FAILs."""
    resource = bench.resource(preflight=False, openlineage=receiver.transport())
    with dg.instance_for_test() as instance:
        assert not bench.materialize(instance, resource, LOOM_TEST_FAIL_AT_START="1").success
    events = receiver.events
    assert [e["eventType"] for e in events] == ["START", "FAIL"]
    assert events[0]["run"]["runId"] == events[1]["run"]["runId"]
    message = events[1]["run"]["facets"]["errorMessage"]["message"]
    assert "failed its health gate" in message and "LOOM_TEST_FAIL_AT_START is set" in message
    for event in events:
        validate_event(event)
    kafka_ns = f"kafka://{bench.bootstrap.split(',')[0]}"
    assert [(d["namespace"], d["name"]) for d in events[1]["inputs"]] == [(kafka_ns, f"{bench.prefix}.ticks")]
    assert {(d["namespace"], d["name"]) for d in events[1]["outputs"]} == {
        ("file", bench.delta_uri),
        (kafka_ns, f"{bench.prefix}.ticks.out"),
        (kafka_ns, f"{bench.prefix}.ticks.dlq"),
    }
