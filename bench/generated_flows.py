"""Generate N distinct loom flows (one module and one config directory per flow) for scale tests.

Each flow reads a Kafka topic, runs one or two record steps, and broadcasts to a Delta table, a
ClickHouse table, a SQL table and an output topic; errors go to a per-flow dead-letter topic. Flows
differ in their payload structs (3 to 12 extra fields), their steps and their topics; every fourth
flow shares its source topic with the previous flow, and the next one reads the previous flow's
output topic, so the graph has fan-out and chains as a real code location does.

    >>> specs = write_flows(Path("/tmp/gen"), 200)  # doctest: +SKIP
    >>> build_loom_defs(specs)                      # doctest: +SKIP

Nothing here imports loom or Dagster at module level: ``plain_graph`` is used by a code location
that must not pay for loom's imports.
"""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loom_dagster.core.flows.spec import LoomFlowSpec

ENVIRONMENT = "development"
LAYOUTS = ("per-flow", "shared")
GROUP_SIZE = 20
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class GeneratedFlow:
    """What the generator wrote for one flow, and the asset keys it should produce."""

    index: int
    name: str
    module: str
    config_dir: str
    source_topic: str
    output_topic: str
    dlq_topic: str
    table: str
    group_name: str

    @property
    def import_path(self) -> str:
        """``package.module:flow``."""
        return f"{self.module}:flow"


@dataclass(frozen=True)
class PlainGraph:
    """Asset keys (user strings) and edges a set of generated flows should produce."""

    flow_keys: list[str]
    external_keys: list[str]
    edges: set[tuple[str, str]] = field(default_factory=set)
    deps: dict[str, list[str]] = field(default_factory=dict)

    @property
    def all_keys(self) -> list[str]:
        """Flow keys then external keys."""
        return [*self.flow_keys, *self.external_keys]


def flow_name(index: int) -> str:
    """Name of the generated flow *index*."""
    return f"gen_{index:04d}"


def default_package(directory: Path) -> str:
    """A package name unique to *directory*, so two generated sets never collide in ``sys.modules``."""
    return "loomgen_" + hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:10]


def describe_flows(
    count: int, directory: Path, package: str, layout: str = "per-flow"
) -> list[GeneratedFlow]:
    """The flows ``write_flows`` writes, without writing anything."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    flows = []
    for i in range(count):
        name = flow_name(i)
        source = f"gen.{i:04d}.in"
        if i % 4 == 1:
            source = f"gen.{i - 1:04d}.in"  # shares the previous flow's source topic
        elif i % 4 == 2:
            source = f"gen.{i - 1:04d}.out"  # chained behind the previous flow
        flows.append(
            GeneratedFlow(
                index=i,
                name=name,
                module=f"{package}.flow_{i:04d}",
                config_dir=str(directory / "config" / (name if layout == "per-flow" else "shared")),
                source_topic=source,
                output_topic=f"gen.{i:04d}.out",
                dlq_topic=f"gen.{i:04d}.dlq",
                table=f"{name}_rows",
                group_name=f"gen_group_{i // GROUP_SIZE:02d}",
            )
        )
    return flows


def write_flows(
    directory: Path,
    count: int,
    *,
    package: str | None = None,
    layout: str = "per-flow",
    add_to_path: bool = True,
) -> list[LoomFlowSpec]:
    """Write *count* flow modules and their config under *directory*; return their specs.

    The modules go to ``<directory>/<package>/flow_NNNN.py`` (a ``flow`` StreamFlow each). With
    ``layout="per-flow"`` each flow has ``<directory>/config/gen_NNNN/{base,development}.yaml``; with
    ``"shared"`` every flow points at one ``<directory>/config/shared`` holding a section per flow
    (``kafka.consumers.<flow>_in``, ``kafka.producers.<flow>_out``, ``streaming.sinks.<flow>_delta``...).
    *directory* is put on ``sys.path`` unless *add_to_path* is false. A ``manifest.json`` records the
    package and layout for ``load_specs``.
    """
    directory = Path(directory).resolve()
    package = package or default_package(directory)
    pkg_dir = directory / package
    pkg_dir.mkdir(parents=True, exist_ok=True)
    (pkg_dir / "__init__.py").write_text('"""Generated loom flows."""\n')
    flows = describe_flows(count, directory, package, layout)
    for flow in flows:
        (pkg_dir / f"flow_{flow.index:04d}.py").write_text(_module_source(flow))
        if layout == "per-flow":
            _write_config(Path(flow.config_dir), [flow], directory)
    if layout == "shared":
        _write_config(directory / "config" / "shared", flows, directory)
    (directory / MANIFEST).write_text(json.dumps({"package": package, "count": count, "layout": layout}))
    if add_to_path:
        _on_path(directory)
    return specs_for(flows)


def load_specs(directory: Path, count: int | None = None, *, add_to_path: bool = True) -> list[LoomFlowSpec]:
    """Specs of flows already written to *directory* (the first *count*, default all)."""
    directory = Path(directory).resolve()
    manifest = json.loads((directory / MANIFEST).read_text())
    total = manifest["count"] if count is None else count
    if add_to_path:
        _on_path(directory)
    layout = manifest.get("layout", "per-flow")
    return specs_for(describe_flows(total, directory, manifest["package"], layout))


def specs_for(flows: list[GeneratedFlow]) -> list[LoomFlowSpec]:
    """One ``LoomFlowSpec`` per generated flow."""
    from loom_dagster.core.flows.spec import LoomFlowSpec

    return [
        LoomFlowSpec(
            f.import_path,
            config=f.config_dir,
            environment=ENVIRONMENT,
            group_name=f.group_name,
            owners=["team:generated"],
            tags={"domain": f.group_name},
        )
        for f in flows
    ]


def plain_graph(count: int) -> PlainGraph:
    """Keys and edges the generated flows should produce, computed without loom (for baselines)."""
    flows = describe_flows(count, Path("/unused"), "unused")
    flow_keys = [f"loom/{f.name}" for f in flows]
    deps: dict[str, list[str]] = {}
    for f in flows:
        flow_key = f"loom/{f.name}"
        deps.setdefault(flow_key, []).append(f"kafka/{f.source_topic}")
        deps.setdefault(f"kafka/{f.source_topic}", [])
        for key in (
            f"delta/{f.table}",
            f"clickhouse/analytics/{f.table}",
            f"sql/warehouse/{f.table}",
            f"kafka/{f.output_topic}",
            f"kafka/{f.dlq_topic}",
        ):
            deps.setdefault(key, []).append(flow_key)
    external = sorted(k for k in deps if not k.startswith("loom/"))
    edges = {(parent, child) for child, parents in deps.items() for parent in parents}
    return PlainGraph(flow_keys=flow_keys, external_keys=external, edges=edges, deps=deps)


def _on_path(directory: Path) -> None:
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))


def _fields(flow: GeneratedFlow) -> list[tuple[str, str]]:
    kinds = ["int", "float", "str", "bool", "str | None", "list[str]", "dict[str, int]", "int | None"]
    extra = 3 + flow.index % 10
    return [(f"f{j}_{flow.index}", kinds[(flow.index + j) % len(kinds)]) for j in range(extra)]


def _module_source(flow: GeneratedFlow) -> str:
    fields = _fields(flow)
    row_fields = "\n".join(f"    {n}: {t}" for n, t in fields)
    defaults = {
        "int": "0",
        "float": "0.0",
        "str": '""',
        "bool": "False",
        "str | None": "None",
        "list[str]": "[]",
        "dict[str, int]": "{}",
        "int | None": "None",
    }
    row_args = ",\n            ".join(f"{n}={defaults[t]}" for n, t in fields)
    second_step = flow.index % 3 == 0
    steps = "Enrich, Normalize" if second_step else "Enrich"
    normalize = (
        textwrap.dedent(
            f'''

            class Normalize(RecordStep[Row{flow.index}, Row{flow.index}]):
                """Clamp negative amounts to zero."""

                def execute(self, message: Message[Row{flow.index}], **kwargs: object) -> Row{flow.index}:
                    row = message.payload
                    return row if row.amount >= 0 else msgspec.structs.replace(row, amount=0.0)
            '''
        )
        if second_step
        else ""
    )
    return f'''"""Generated flow {flow.name}: {flow.source_topic} -> Delta, ClickHouse, SQL, topic; DLQ."""

from __future__ import annotations

import msgspec
from loom.core.errors import RuleViolation
from loom.core.model import LoomStruct
from loom.streaming import (
    Backend,
    Broadcast,
    BroadcastRoute,
    FromTopic,
    IntoTable,
    IntoTopic,
    Message,
    Process,
    RecordStep,
    StreamFlow,
)


class Event{flow.index}(LoomStruct):
    """Input event of {flow.name}."""

    event_id: str
    customer_id: str
    amount: float


class Row{flow.index}(LoomStruct):
    """Row {flow.name} writes to its tables and output topic."""

    event_id: str
    customer_id: str
    amount: float
    amount_cents: int
{row_fields}


class Enrich(RecordStep[Event{flow.index}, Row{flow.index}]):
    """Reject events without a customer; add cents."""

    def execute(self, message: Message[Event{flow.index}], **kwargs: object) -> Row{flow.index}:
        event = message.payload
        if not event.customer_id:
            raise RuleViolation("customer_id", "missing customer")
        return Row{flow.index}(
            event_id=event.event_id,
            customer_id=event.customer_id,
            amount=event.amount,
            amount_cents=round(event.amount * {100 + flow.index}),
            {row_args},
        )
{normalize}

def _table(name: str, backend: Backend | None = None) -> BroadcastRoute[Row{flow.index}, Row{flow.index}]:
    node = (
        IntoTable(Row{flow.index}, name=name, backend=backend)
        if backend is not None
        else IntoTable(Row{flow.index}, name=name, table="{flow.table}")
    )
    return BroadcastRoute(process=Process(node))


flow: StreamFlow[Event{flow.index}, Row{flow.index}] = StreamFlow(
    name="{flow.name}",
    source=FromTopic("{flow.name}_in", payload=Event{flow.index}),
    process=Process(
        {steps},
        Broadcast(
            _table("{flow.name}_delta", Backend.DELTA),
            _table("{flow.name}_ch", Backend.CLICKHOUSE),
            _table("{flow.name}_sql"),
            BroadcastRoute(process=Process(IntoTopic("{flow.name}_out", payload=Row{flow.index}))),
        ),
    ),
    errors=IntoTopic("{flow.name}_dlq"),
)
'''


_BROKERS = '["${oc.env:LOOM_KAFKA_BOOTSTRAP,127.0.0.1:9092}"]'


def _write_config(config_dir: Path, flows: list[GeneratedFlow], directory: Path) -> None:
    """``base.yaml`` + ``development.yaml`` for *flows*: the only flow's consumer as ``kafka.consumer``
    (per-flow layout), or one ``kafka.consumers.<flow>_in`` section per flow (shared layout)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    single = len(flows) == 1 and flows[0].config_dir == str(config_dir)
    title = f"config of {flows[0].name}" if single else f"shared config of {len(flows)} flows"
    if single:
        consumers = "  consumer:\n" + _indent(_consumer(flows[0]), 4)
    else:
        consumers = "  consumers:\n" + "".join(
            f"    {f.name}_in:\n" + _indent(_consumer(f), 6) for f in flows
        )
    producers = "".join(
        f"    {f.name}_out:\n      brokers: {_BROKERS}\n      topic: {f.output_topic}\n"
        f"    {f.name}_dlq:\n      brokers: {_BROKERS}\n      topic: {f.dlq_topic}\n"
        for f in flows
    )
    data = "${oc.env:LOOM_DATA_DIR," + str(directory / "data") + "}"
    sinks = "".join(
        f"    {f.name}_delta:\n"
        f'      uri: "{data}/delta/{f.table}"\n'
        f"      table: {f.table}\n      buffer_max_records: 1000\n      buffer_max_age_s: 5\n"
        f"    {f.name}_ch:\n"
        f"      database: clickhouse\n      table: analytics.{f.table}\n"
        f"      buffer_max_records: 1000\n      buffer_max_age_s: 5\n"
        f"    {f.name}_sql:\n      database: warehouse\n"
        for f in flows
    )
    client = flows[0].name.replace("_", "-") if single else "loom-generated"
    (config_dir / "base.yaml").write_text(
        f"# Generated {title}; {ENVIRONMENT}.yaml overlays it.\n"
        "kafka:\n"
        f"{consumers}"
        f"  producer:\n    brokers: {_BROKERS}\n    client_id: {client}\n"
        f"  producers:\n{producers}"
        "streaming:\n  runtime:\n    workers_per_process: 1\n    epoch_interval_ms: 500\n"
        f"  sinks:\n{sinks}"
        "database:\n"
        '  clickhouse:\n    url: "${oc.env:LOOM_CLICKHOUSE_URL,http://default:@127.0.0.1:8123}"\n'
        "  warehouse:\n"
        '    url: "${oc.env:LOOM_WAREHOUSE_URL,postgresql+asyncpg://loom:secret@127.0.0.1:5432/warehouse}"\n'
    )
    overlay = "".join(
        f"    {f.name}_{sink}:\n      buffer_max_records: 100\n      buffer_max_age_s: 1\n"
        for f in flows
        for sink in ("delta", "ch")
    )
    (config_dir / f"{ENVIRONMENT}.yaml").write_text(
        f"# {ENVIRONMENT} overlay: small buffers so rows show up quickly.\nstreaming:\n  sinks:\n{overlay}"
    )


def _consumer(flow: GeneratedFlow) -> str:
    return (
        f"brokers: {_BROKERS}\n"
        f"group_id: {flow.name.replace('_', '-')}\n"
        f"topics: [{flow.source_topic}]\n"
        "delivery: at_least_once\n"
        "auto_offset_reset: earliest\n"
    )


def _indent(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line + "\n" for line in text.splitlines())
