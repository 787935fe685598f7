"""OpenLineage run events for deployments: a flow is a STREAMING job, each deployment of it one run.

Event sequence (one run per deploy attempt; the run of a healthy deployment stays open):

- deploy (compiled, lineage checked, about to run its pre-launch checks) -> ``START``;
- its job passed the health gate -> ``COMPLETE`` for the replaced deployment's run (a redeploy), then
  ``RUNNING`` for the new one;
- the deploy failed (a pre-launch check, the preflight, the health gate) -> ``FAIL`` with an
  ``errorMessage`` facet; the deployment that was running (or is rolled back to) keeps its run;
- every ``running_period_s`` while the job health sensor sees the job healthy -> ``RUNNING``;
- undeploy -> ``COMPLETE``.

Every event carries the job facet ``jobType`` (``processingType: STREAMING``, ``integration: LOOM``,
``jobType: FLOW``) and the flow's inputs and outputs named by the OpenLineage naming spec
(https://openlineage.io/docs/spec/naming), with a ``schema`` facet where the payload's columns are known:

- Kafka: ``kafka://{first bootstrap host}:{port}``, name = topic;
- Delta: local ``file`` + absolute path; ``s3://{bucket}`` / ``gs://{bucket}`` + object key; other
  schemes ``{scheme}://{authority}`` + path;
- ClickHouse: ``clickhouse://{host}:{port}``, name ``{database}.{table}``;
- SQL: ``postgres://{host}:{port}`` + ``{database}.{schema}.{table}``, ``mysql://{host}:{port}`` +
  ``{database}.{table}``, ``mssql://{host}:{port}`` + ``{database}.{schema}.{table}``,
  ``sqlite://{absolute file}`` + ``{table}``, other dialects ``{dialect}://{host}:{port}`` +
  ``{database}.{table}``;
- MongoDB: ``mongodb://{host}:{port}``, name ``{database}.{collection}``.

Namespaces are built from host and port only (``strip_userinfo`` first), names never carry a query
string: no credential reaches an event. The run id is a UUIDv7 (the client's ``generate_static_uuid``)
of the deploy's start time, flow, Dagster run and plan hash, kept in ``<flow dir>/openlineage.json`` once
the deployment is recorded, so the sensor's ``RUNNING`` and the undeploy's ``COMPLETE`` attach to it.

Emitting never fails a deploy: any error (transport down, client not installed, bad config) is logged as a
redacted warning. The client (``openlineage-python``, the ``openlineage`` extra) is imported only when an
event is sent; no Dagster import here.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from loom_dagster.core.deploy.deployer import DeployObserver, DeployResult
from loom_dagster.core.deploy.store import Deployment, DeploymentStore
from loom_dagster.core.flows.columns import payload_columns
from loom_dagster.core.flows.records import LoomColumn, LoomStorageSink, SinkBackend
from loom_dagster.core.job.failure import clip
from loom_dagster.core.redact import redact_text, strip_userinfo

if TYPE_CHECKING:
    from openlineage.client import OpenLineageClient
    from openlineage.client.event_v2 import RunEvent

    from loom_dagster.core.flows.catalog import CompiledFlow

_log = logging.getLogger(__name__)

INTEGRATION = "LOOM"
JOB_TYPE = "FLOW"
PROCESSING_TYPE = "STREAMING"
DEFAULT_NAMESPACE = "loom"
NAMESPACE_VARIABLE = "OPENLINEAGE_NAMESPACE"
STATE_FILE = "openlineage.json"
RUN_ID_KEY = "openlineage_run_id"
RUN_STARTED_KEY = "openlineage_started_at"
HEARTBEAT_FILE = "openlineage-running.json"
MAX_ERROR_CHARS = 4000

_DEFAULT_PORTS = {
    "kafka": 9092,
    "clickhouse-http": 8123,
    "clickhouse-https": 8443,
    "postgres": 5432,
    "mysql": 3306,
    "mssql": 1433,
    "oracle": 1521,
    "mongodb": 27017,
}
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfss", "abfs", "wasbs", "az", "azure", "adl"})
_STORE_SCHEMES = {"s3a": "s3", "gcs": "gs", "abfs": "abfss"}


class LineageField(msgspec.Struct, frozen=True):
    """One column of a dataset's ``schema`` facet."""

    name: str
    type: str
    description: str | None = None


class LineageDataset(msgspec.Struct, frozen=True):
    """A dataset as OpenLineage names it: namespace (the datasource) + name, and its columns if known."""

    namespace: str
    name: str
    fields: tuple[LineageField, ...] = ()


class FlowLineage(msgspec.Struct, frozen=True):
    """What a flow reads and writes, named per the OpenLineage naming spec (no credentials)."""

    flow_name: str
    inputs: tuple[LineageDataset, ...] = ()
    outputs: tuple[LineageDataset, ...] = ()
    description: str | None = None


class LineageRun(msgspec.Struct, frozen=True):
    """One deployment as an OpenLineage run; ``deployed_at`` ties it to its deployment record."""

    run_id: str
    lineage: FlowLineage
    plan_hash: str
    started_at: float
    deployed_at: float | None = None


class _Heartbeat(msgspec.Struct, frozen=True):
    run_id: str
    at: float


class OpenLineageSettings(msgspec.Struct, frozen=True):
    """Where and how events go.

    ``config`` is the client's own configuration (the layout of ``openlineage.yml``, e.g.
    ``{"transport": {"type": "http", "url": "http://marquez:5000"}}``); empty, the client finds it
    itself (``OPENLINEAGE_URL``, ``OPENLINEAGE_CONFIG``, ``openlineage.yml``). ``namespace`` is the jobs'
    namespace (``None``: ``$OPENLINEAGE_NAMESPACE``, else ``loom``).
    """

    config: dict[str, Any] = {}
    namespace: str | None = None
    running_period_s: float = 300.0
    close_timeout_s: float = 10.0

    @property
    def job_namespace(self) -> str:
        """The namespace of the flows' jobs."""
        return self.namespace or os.environ.get(NAMESPACE_VARIABLE) or DEFAULT_NAMESPACE


# -------------------------------------------------------------------------------------- naming


def kafka_namespace(brokers: Sequence[str] | str) -> str:
    """``kafka://{host}:{port}`` of the first bootstrap server (no protocol prefix, no account).

    Example:
        >>> kafka_namespace(["SASL_SSL://app:pw@b1.example:9093", "b2.example:9093"])
        'kafka://b1.example:9093'
        >>> kafka_namespace("localhost")
        'kafka://localhost:9092'
    """
    entries = [brokers] if isinstance(brokers, str) else list(brokers)
    servers = [s.strip() for entry in entries for s in str(entry).split(",") if s.strip()]
    if not servers:
        return "kafka://unknown"
    first = strip_userinfo(servers[0])
    first = first.partition("://")[2] or first
    host, port = _host_port(first.split("/")[0], _DEFAULT_PORTS["kafka"])
    return f"kafka://{host}:{port}"


def storage_dataset(uri: str) -> tuple[str, str]:
    """``(namespace, name)`` of a table stored as files (a Delta table's URI).

    Example:
        >>> storage_dataset("/data/lake/events")
        ('file', '/data/lake/events')
        >>> storage_dataset("s3://key:secret@bucket/lake/events?region=eu")
        ('s3://bucket', 'lake/events')
        >>> storage_dataset("abfss://lake@acct.dfs.core.windows.net/events")
        ('abfss://lake@acct.dfs.core.windows.net', 'events')
    """
    if "://" not in uri:
        return "file", os.path.abspath(uri)
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    authority = parts.netloc
    if scheme in ("s3", "s3a", "gs", "gcs", "file", "hdfs"):
        authority = strip_userinfo(f"x://{authority}")[4:]
    if scheme == "file":
        host = authority.lower()
        return ("file", parts.path) if host in ("", "localhost") else (f"file://{host}", parts.path)
    scheme = _STORE_SCHEMES.get(scheme, scheme)
    path = parts.path.lstrip("/") if scheme in _OBJECT_STORES else parts.path
    return f"{scheme}://{authority}", path


def clickhouse_namespace(url: str) -> str:
    """``clickhouse://{host}:{port}`` of a ClickHouse HTTP URL.

    Example:
        >>> clickhouse_namespace("https://default:pw@ch.example/analytics")
        'clickhouse://ch.example:8443'
    """
    parts = urlsplit(strip_userinfo(url if "://" in url else f"http://{url}"))
    default = _DEFAULT_PORTS["clickhouse-https" if parts.scheme == "https" else "clickhouse-http"]
    host, port = _host_port(parts.netloc, default)
    return f"clickhouse://{host}:{port}"


def sql_dataset(url: str, table: str) -> tuple[str, str]:
    """``(namespace, name)`` of a table behind a SQLAlchemy URL.

    Example:
        >>> sql_dataset("postgresql+asyncpg://app:pw@db.example/shop", "events")
        ('postgres://db.example:5432', 'shop.public.events')
        >>> sql_dataset("mysql+aiomysql://app:pw@db:3307/shop", "events")
        ('mysql://db:3307', 'shop.events')
        >>> sql_dataset("sqlite+aiosqlite:////srv/warehouse.db", "events")
        ('sqlite:///srv/warehouse.db', 'events')
    """
    from sqlalchemy.engine import make_url

    parsed = make_url(strip_userinfo(url))
    dialect = parsed.get_backend_name()
    database = parsed.database or ""
    if dialect == "sqlite":
        location = os.path.abspath(database) if database and database != ":memory:" else ":memory:"
        return f"sqlite://{location}", table
    schema, _, name = table.rpartition(".")
    if dialect in ("postgresql", "postgres", "redshift", "mssql"):
        scheme = "postgres" if dialect in ("postgresql", "postgres") else dialect
        default_schema = "dbo" if dialect == "mssql" else "public"
        namespace = _host_namespace(scheme, parsed.host, parsed.port, _DEFAULT_PORTS.get(scheme))
        return namespace, f"{database}.{schema or default_schema}.{name}"
    scheme = "mysql" if dialect == "mariadb" else dialect
    namespace = _host_namespace(scheme, parsed.host, parsed.port, _DEFAULT_PORTS.get(scheme))
    return namespace, ".".join(p for p in (database, schema, name) if p)


def mongo_namespace(uri: str) -> str:
    """``mongodb://{host}:{port}`` of the first host of a MongoDB URI.

    Example:
        >>> mongo_namespace("mongodb://app:pw@m1:27018,m2/shop?replicaSet=rs0")
        'mongodb://m1:27018'
    """
    rest = strip_userinfo(uri).partition("://")[2] or uri
    hosts = rest.split("/")[0].split("?")[0]
    host, port = _host_port(hosts.split(",")[0], _DEFAULT_PORTS["mongodb"])
    return f"mongodb://{host}:{port}"


def sink_dataset(sink: LoomStorageSink) -> LineageDataset:
    """The dataset of one ``IntoTable`` sink, from its record (whose URI carries no password)."""
    uri = sink.uri or ""
    if sink.backend is SinkBackend.DELTA:
        namespace, name = storage_dataset(uri)
    elif sink.backend is SinkBackend.CLICKHOUSE:
        namespace, name = clickhouse_namespace(uri), f"{sink.database}.{sink.table}"
    else:
        namespace, name = sql_dataset(uri, sink.table)
    return _dataset(namespace, name, sink.columns)


def flow_lineage(compiled: CompiledFlow) -> FlowLineage:
    """Inputs and outputs of a compiled flow: source topics or collections; tables, output and DLQ topics."""
    flow, plan = compiled.flow, compiled.plan
    source: Any = plan.source
    settings = getattr(source, "settings", None)
    inputs: list[LineageDataset] = []
    if flow.source_collections:
        namespace = mongo_namespace(str(getattr(settings, "uri", "") or ""))
        inputs = [_dataset(namespace, f"{c.database}.{c.collection}", ()) for c in flow.source_collections]
    else:
        payload = getattr(source, "payload_type", None)
        columns = payload_columns(payload) if payload is not None else ()
        namespace = kafka_namespace(tuple(getattr(settings, "brokers", ()) or ()))
        inputs = [_dataset(namespace, t.topic, columns) for t in flow.source_topics]
    brokers = _topic_brokers(plan)
    payloads = _topic_payloads(compiled)
    outputs = [sink_dataset(s) for s in flow.storage_sinks]
    for topic in flow.output_topics:
        namespace = kafka_namespace(brokers.get(topic.topic) or getattr(settings, "brokers", ()) or ())
        payload = payloads.get(topic.topic)
        outputs.append(_dataset(namespace, topic.topic, payload_columns(payload) if payload else ()))
    return FlowLineage(flow.name, _unique(inputs), _unique(outputs), flow.description)


def _topic_brokers(plan: Any) -> dict[str, tuple[str, ...]]:
    """Brokers of every topic the plan writes (outputs, branch outputs, per-output DLQs, error routes)."""
    found: dict[str, tuple[str, ...]] = {}
    writers = [plan.output] if plan.output is not None else []
    for sink in [*writers, *plan.terminal_sinks.values(), *plan.error_routes.values()]:
        brokers = tuple(getattr(sink.settings, "brokers", ()) or ())
        found.setdefault(sink.topic, brokers)
        if getattr(sink, "dlq_topic", None):
            found.setdefault(sink.dlq_topic, brokers)
    return found


def _topic_payloads(compiled: CompiledFlow) -> dict[str, type[Any]]:
    """Payload type of each output topic whose ``IntoTopic`` declares one (best effort)."""
    try:
        from loom_dagster.core.flows.describe import topic_refs_by_path

        stream_flow: Any = compiled.spec.load_flow()
        plan: Any = compiled.plan
        nodes = _topic_nodes(stream_flow)
        refs = topic_refs_by_path(stream_flow)
        found: dict[str, type[Any]] = {}
        for path, sink in plan.terminal_sinks.items():
            node = nodes.get(tuple(path))
            payload = getattr(node, "payload", None)
            if isinstance(payload, type) and tuple(path) in refs:
                found.setdefault(sink.topic, payload)
        output_payload = getattr(getattr(stream_flow, "output", None), "payload", None)
        if plan.output is not None and isinstance(output_payload, type):
            found.setdefault(plan.output.topic, output_payload)
        return found
    except Exception as exc:  # a flow shape this walk does not know: no columns for its topics
        _log.debug("loom flow %s: output topic payloads not found: %s", compiled.flow.name, exc)
        return {}


def _topic_nodes(flow: Any) -> dict[tuple[int, ...], Any]:
    """``IntoTopic`` nodes and branch outputs by the compiler's node path (as ``topic_refs_by_path``)."""
    from loom.streaming.nodes._branches import is_branching_node, iter_branches

    found: dict[tuple[int, ...], Any] = {}

    def visit(nodes: Any, prefix: tuple[int, ...]) -> None:
        for index, node in enumerate(tuple(nodes)):
            path = prefix + (index,)
            if hasattr(node, "partitioning") and hasattr(node, "dlq"):
                found[path] = node
            elif is_branching_node(node):
                for branch in iter_branches(node):
                    branch_path = path + (branch.index,)
                    if branch.output is not None:
                        found[branch_path] = branch.output
                    visit(branch.nodes, branch_path)
            elif getattr(node, "process", None) is not None and hasattr(node.process, "nodes"):
                visit(node.process.nodes, path)

    visit(flow.process.nodes, ())
    return found


def source_lineage(deployment: Deployment, description: str | None = None) -> FlowLineage:
    """What a deployment record alone tells: its Kafka source (for runs deployed without lineage kept)."""
    source = deployment.extra.get("source") or {}
    inputs: list[LineageDataset] = []
    if isinstance(source, Mapping) and source.get("kind") == "kafka":
        namespace = kafka_namespace(tuple(source.get("brokers") or ()))
        inputs = [_dataset(namespace, str(t), ()) for t in source.get("topics") or ()]
    return FlowLineage(deployment.flow_name, tuple(inputs), (), description)


def _dataset(namespace: str, name: str, columns: Iterable[LoomColumn]) -> LineageDataset:
    fields = tuple(LineageField(c.name, c.type, c.description) for c in columns)
    return LineageDataset(redact_text(namespace), redact_text(name), fields)


def _unique(datasets: Iterable[LineageDataset]) -> tuple[LineageDataset, ...]:
    found: dict[tuple[str, str], LineageDataset] = {}
    for dataset in datasets:
        found.setdefault((dataset.namespace, dataset.name), dataset)
    return tuple(found.values())


def _host_port(authority: str, default: int | None) -> tuple[str, int | None]:
    host, port = authority, None
    if authority.startswith("["):  # [ipv6]:port
        end = authority.find("]")
        host, rest = authority[: end + 1], authority[end + 1 :]
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    elif authority.count(":") == 1:
        name, _, number = authority.partition(":")
        if number.isdigit():
            host, port = name, int(number)
    return host.lower() or "localhost", port or default


def _host_namespace(scheme: str, host: str | None, port: int | None, default: int | None) -> str:
    port = port or default
    return f"{scheme}://{(host or 'localhost').lower()}" + (f":{port}" if port else "")


# -------------------------------------------------------------------------------------- events


def new_run_id(flow_name: str, started_at: float, dagster_run_id: str | None, plan_hash: str) -> str:
    """The run id of a deploy started at *started_at*: a UUIDv7 (time-ordered), the same for the same inputs.

    Example:
        >>> a = new_run_id("orders", 1_800_000_000.0, "r1", "p1")  # doctest: +SKIP
        >>> a == new_run_id("orders", 1_800_000_000.0, "r1", "p1"), a[14]  # doctest: +SKIP
        (True, '7')
    """
    from openlineage.client.uuid import generate_static_uuid

    instant = datetime.fromtimestamp(started_at, tz=UTC)
    data = "\n".join((flow_name, dagster_run_id or "", plan_hash)).encode()
    return str(generate_static_uuid(instant, data))


def build_event(
    event_type: str,
    run: LineageRun,
    settings: OpenLineageSettings,
    *,
    at: float | None = None,
    error: str | None = None,
) -> RunEvent:
    """The OpenLineage ``RunEvent`` (``START``/``RUNNING``/``COMPLETE``/``FAIL``/``ABORT``) of *run*.

    Example:
        >>> run = LineageRun("0190...", FlowLineage("orders"), "p1", started_at=1.0)  # doctest: +SKIP
        >>> build_event("START", run, OpenLineageSettings()).job.facets["jobType"].processingType  # doctest: +SKIP
        'STREAMING'
    """
    from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
    from openlineage.client.facet_v2 import (
        documentation_job,
        error_message_run,
        job_type_job,
        processing_engine_run,
        schema_dataset,
    )

    producer = _producer()
    lineage = run.lineage

    def facets(dataset: LineageDataset) -> dict[str, Any]:
        if not dataset.fields:
            return {}
        fields = [
            schema_dataset.SchemaDatasetFacetFields(name=f.name, type=f.type, description=f.description)
            for f in dataset.fields
        ]
        return {"schema": schema_dataset.SchemaDatasetFacet(fields=fields, producer=producer)}

    job_facets: dict[str, Any] = {
        "jobType": job_type_job.JobTypeJobFacet(
            processingType=PROCESSING_TYPE, integration=INTEGRATION, jobType=JOB_TYPE, producer=producer
        )
    }
    if lineage.description:
        job_facets["documentation"] = documentation_job.DocumentationJobFacet(
            description=lineage.description, producer=producer
        )
    run_facets: dict[str, Any] = {
        "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
            version=_version("loom-kernel"),
            name="loom",
            openlineageAdapterVersion=_version("loom-dagster"),
            producer=producer,
        )
    }
    if error is not None:
        run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=clip(redact_text(error), MAX_ERROR_CHARS, keep_tail=False),
            programmingLanguage="PYTHON",
            producer=producer,
        )
    when = datetime.fromtimestamp(time.time() if at is None else at, tz=UTC)
    return RunEvent(
        eventType=RunState(event_type),
        eventTime=when.isoformat(),
        run=Run(runId=run.run_id, facets=run_facets),
        job=Job(namespace=settings.job_namespace, name=lineage.flow_name, facets=job_facets),
        inputs=[InputDataset(d.namespace, d.name, facets=facets(d)) for d in lineage.inputs],
        outputs=[OutputDataset(d.namespace, d.name, facets=facets(d)) for d in lineage.outputs],
        producer=producer,
    )


def _producer() -> str:
    return f"https://pypi.org/project/loom-dagster/{_version('loom-dagster')}/"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_client(settings: OpenLineageSettings) -> OpenLineageClient:
    """An ``OpenLineageClient`` from the settings' config (or the client's own discovery when empty)."""
    try:
        from openlineage.client import OpenLineageClient
    except ImportError as exc:
        raise ImportError(
            "OpenLineage events need openlineage-python: pip install 'loom-dagster[openlineage]'"
        ) from exc
    return OpenLineageClient(config=dict(settings.config) or None)


# -------------------------------------------------------------------------------------- observer


class OpenLineageObserver(DeployObserver):
    """Emits a deployment's OpenLineage run events (see the module docstring); never raises.

    Example:
        >>> observer = OpenLineageObserver(DeploymentStore("/tmp/loom-state"), OpenLineageSettings(
        ...     config={"transport": {"type": "http", "url": "http://marquez:5000"}}))
        >>> deployer = FlowDeployer(launcher, observer.store, observer=observer)  # doctest: +SKIP
    """

    def __init__(
        self,
        store: DeploymentStore,
        settings: OpenLineageSettings | None = None,
        *,
        client: Callable[[OpenLineageSettings], OpenLineageClient] = build_client,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings or OpenLineageSettings()
        self._client = client
        self._clock = clock
        self._pending: dict[str, LineageRun] = {}

    # DeployObserver ---------------------------------------------------------------------------

    def deploying(self, compiled: CompiledFlow, run_id: str | None) -> None:
        """``START`` of a new run for this deploy."""
        name = compiled.flow.name
        try:
            now = self._clock()
            run = LineageRun(
                run_id=new_run_id(name, now, run_id, compiled.flow.plan_hash),
                lineage=flow_lineage(compiled),
                plan_hash=compiled.flow.plan_hash,
                started_at=now,
            )
        except Exception as exc:
            self._warn("START", name, exc)
            return
        self._pending[name] = run
        self._emit(name, [("START", run, None)])

    def deployed(self, result: DeployResult) -> None:
        """``COMPLETE`` for the replaced deployment's run, then ``RUNNING`` for the new one."""
        deployment = result.deployment
        if deployment is None:
            return
        name = deployment.flow_name
        try:
            pending = self._pending.pop(name, None)
            if pending is None:  # a deployer whose deploying() was not seen: start the run now
                self.deploying(result.compiled, deployment.run_id)
                pending = self._pending.pop(name, None)
            if pending is None:
                return
            run = msgspec.structs.replace(pending, deployed_at=deployment.deployed_at)
            events: list[tuple[str, LineageRun, str | None]] = []
            previous = result.previous
            if previous is not None and not previous.stopped_on_purpose:
                events.append(("COMPLETE", self.run_of(previous), None))
            self._save(run)
            events.append(("RUNNING", run, None))
        except Exception as exc:
            self._warn("RUNNING", name, exc)
            return
        self._emit(name, events)
        self._beat(run)

    def record_extra(self, flow_name: str) -> dict[str, object]:
        """The run id and start of the deploy's run, kept in its record: the run is found again from
        any process that reads the record (the daemon's sensor, a run pod), not only from this host."""
        pending = self._pending.get(flow_name)
        if pending is None:
            return {}
        return {RUN_ID_KEY: pending.run_id, RUN_STARTED_KEY: pending.started_at}

    def failed(self, flow_name: str, error: BaseException) -> None:
        """``FAIL`` (with an ``errorMessage`` facet) for the run this deploy started, if it started one."""
        run = self._pending.pop(flow_name, None)
        if run is not None:
            self._emit(flow_name, [("FAIL", run, f"{type(error).__name__}: {error}")])

    def undeployed(self, deployment: Deployment) -> None:
        """``COMPLETE`` for the stopped deployment's run."""
        try:
            run = self.run_of(deployment)
        except Exception as exc:
            self._warn("COMPLETE", deployment.flow_name, exc)
            return
        self._emit(deployment.flow_name, [("COMPLETE", run, None)])

    def running(self, deployment: Deployment) -> None:
        """``RUNNING`` for a healthy deployment, at most once per ``running_period_s``."""
        try:
            run = self.run_of(deployment)
            now = self._clock()
            beat = self._last_beat(deployment.flow_name)
            if beat is not None and beat.run_id == run.run_id:
                if now - beat.at < self.settings.running_period_s:
                    return
            self._beat(run, now)  # before sending: a transport that is down is retried next period
        except Exception as exc:
            self._warn("RUNNING", deployment.flow_name, exc)
            return
        self._emit(deployment.flow_name, [("RUNNING", run, None)])

    # state --------------------------------------------------------------------------------------

    def run_of(self, deployment: Deployment) -> LineageRun:
        """The run of a deployment: the one kept when it was deployed, else one derived from its record."""
        kept = self._load(deployment.flow_name)
        if kept is not None and kept.deployed_at == deployment.deployed_at:
            return kept
        recorded = deployment.extra.get(RUN_ID_KEY)
        if isinstance(recorded, str):
            started = deployment.extra.get(RUN_STARTED_KEY)
            return LineageRun(
                run_id=recorded,
                lineage=source_lineage(deployment),
                plan_hash=deployment.plan_hash,
                started_at=float(started) if isinstance(started, int | float) else deployment.deployed_at,
                deployed_at=deployment.deployed_at,
            )
        return LineageRun(
            run_id=new_run_id(
                deployment.flow_name, deployment.deployed_at, deployment.run_id, deployment.plan_hash
            ),
            lineage=source_lineage(deployment),
            plan_hash=deployment.plan_hash,
            started_at=deployment.deployed_at,
            deployed_at=deployment.deployed_at,
        )

    def _path(self, flow_name: str, file: str) -> Path:
        return self.store.flow_dir(flow_name) / file

    def _load(self, flow_name: str) -> LineageRun | None:
        try:
            return msgspec.json.decode(self._path(flow_name, STATE_FILE).read_bytes(), type=LineageRun)
        except (OSError, ValueError):
            return None

    def _save(self, run: LineageRun) -> None:
        _write(self._path(run.lineage.flow_name, STATE_FILE), msgspec.json.encode(run))

    def _last_beat(self, flow_name: str) -> _Heartbeat | None:
        try:
            return msgspec.json.decode(self._path(flow_name, HEARTBEAT_FILE).read_bytes(), type=_Heartbeat)
        except (OSError, ValueError):
            return None

    def _beat(self, run: LineageRun, at: float | None = None) -> None:
        try:
            beat = _Heartbeat(run.run_id, self._clock() if at is None else at)
            _write(self._path(run.lineage.flow_name, HEARTBEAT_FILE), msgspec.json.encode(beat))
        except OSError as exc:
            self._warn("RUNNING", run.lineage.flow_name, exc)

    # emission -----------------------------------------------------------------------------------

    def _emit(self, flow_name: str, events: Sequence[tuple[str, LineageRun, str | None]]) -> None:
        """Send *events* in order through a client of their own; stop at the first failure (warned)."""
        if not events:
            return
        kind = events[0][0]
        try:
            client = self._client(self.settings)
            try:
                for kind, run, error in events:
                    client.emit(build_event(kind, run, self.settings, at=self._clock(), error=error))
            finally:
                client.close(self.settings.close_timeout_s)
        except Exception as exc:
            self._warn(kind, flow_name, exc)

    def _warn(self, kind: str, flow_name: str, exc: BaseException) -> None:
        _log.warning(
            "OpenLineage %s event of flow %r not sent (the deploy goes on): %s",
            kind,
            flow_name,
            redact_text(f"{type(exc).__name__}: {exc}"),
        )


def _write(path: Path, data: bytes) -> None:
    from loom_dagster.core.deploy.store import write_private_file

    write_private_file(path, data)
