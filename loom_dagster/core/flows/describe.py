"""Derive the frozen records of ``loom_dagster.core.flows.records`` from a loom ``CompiledPlan``."""

from __future__ import annotations

import ast
import functools
import hashlib
import hmac
import inspect
import json
import linecache
import sys
import threading
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from loom_dagster.core.contracts.shape import payload_contract
from loom_dagster.core.errors import FlowLoadError
from loom_dagster.core.flows.columns import payload_columns
from loom_dagster.core.flows.records import (
    LoomFlow,
    LoomOutputTopic,
    LoomSourceCollection,
    LoomSourceTopic,
    LoomStorageSink,
    SinkBackend,
    TopicRole,
)
from loom_dagster.core.redact import redact_text, redact_url

if TYPE_CHECKING:
    from loom.streaming import StreamFlow
    from loom.streaming.compiler import CompiledPlan, CompiledSink, CompiledStorageSink


def describe_plan(
    flow: StreamFlow[Any, Any],
    plan: CompiledPlan,
    *,
    import_path: str,
    environment: str,
    config_hash: str,
) -> LoomFlow:
    """Records for one compiled flow: its sources, storage sinks, output topics and hashes."""
    source = plan.source
    collections: tuple[LoomSourceCollection, ...] = ()
    topics: tuple[LoomSourceTopic, ...] = ()
    group: str | None = None
    delivery: str | None = None
    if hasattr(source, "collections"):
        database = str(getattr(source.settings, "database", ""))
        collections = tuple(LoomSourceCollection(database, c, plan.name) for c in source.collections)
        kind = "mongo"
    else:
        settings = source.settings
        group, delivery = settings.group_id, settings.delivery
        classes = _source_payload_classes(source)
        payloads = tuple(sorted(_type_name(t) for t in classes))
        contracts = tuple(c for c in map(payload_contract, classes) if c is not None)
        topics = tuple(LoomSourceTopic(t, plan.name, group, payloads, contracts) for t in source.topics)
        kind = "kafka"
    return LoomFlow(
        name=plan.name,
        import_path=import_path,
        plan_hash=plan_hash(plan),
        config_hash=config_hash,
        environment=environment,
        source_kind=kind,
        consumer_group=group,
        delivery=delivery,
        source_topics=topics,
        source_collections=collections,
        storage_sinks=tuple(
            storage_sink(plan.name, path, sink) for path, sink in sorted(plan.terminal_storage_sinks.items())
        ),
        output_topics=output_topics(flow, plan),
        error_routes=tuple(sorted((_enum_value(k), v.topic) for k, v in plan.error_routes.items())),
        steps=tuple(_node_label(n.node) for n in plan.nodes),
    )


def _source_payload_classes(source: Any) -> tuple[Any, ...]:
    """The struct(s) a Kafka source decodes: its payload type, or the types it dispatches on, sorted by
    message type."""
    if hasattr(source, "payload_type"):
        return (source.payload_type,)
    dispatch = getattr(source, "dispatch", None)
    types = getattr(dispatch, "message_types", None) or {}
    return tuple(t for _, t in sorted(getattr(types, "items", lambda: [])(), key=lambda kv: str(kv[0])))


def storage_sink(flow_name: str, path: tuple[int, ...], sink: CompiledStorageSink) -> LoomStorageSink:
    """Record for one ``IntoTable`` sink, by the type of its resolved config."""
    from loom.streaming.nodes._table.common import (
        ClickHouseSinkConfig,
        DeltaSinkConfig,
        SqlAlchemySinkConfig,
    )

    node, config = sink.node, sink.config
    payload = getattr(node, "payload", None)
    sink_name = str(getattr(node, "name", "") or "")

    def record(backend: SinkBackend, table: str, database: str | None, uri: str) -> LoomStorageSink:
        return LoomStorageSink(
            flow_name=flow_name,
            sink_name=sink_name,
            backend=backend,
            table=table,
            database=database,
            uri=uri,
            payload_type=_type_name(payload) if payload is not None else "",
            columns=payload_columns(payload) if payload is not None else (),
            node_path=tuple(path),
        )

    if isinstance(config, DeltaSinkConfig):
        return record(SinkBackend.DELTA, config.table, None, redact_url(config.uri))
    if isinstance(config, ClickHouseSinkConfig):
        database, table = clickhouse_table(config.url, config.table)
        return record(
            SinkBackend.CLICKHOUSE,
            table,
            database,
            f"{redact_url(config.url).rstrip('/')}/{database}.{table}",
        )
    if isinstance(config, SqlAlchemySinkConfig):
        url = sink.database_config.url if sink.database_config is not None else config.url
        return record(SinkBackend.SQL, config.table, config.database, redact_url(url))
    raise FlowLoadError(
        f"flow {flow_name!r}: sink {sink_name or path!r} ({type(node).__name__}) resolves to "
        f"{type(config).__name__}, a backend loom-dagster does not know (it maps Delta, ClickHouse and "
        "SQLAlchemy tables). Write the table through one of those backends; other backends are not "
        "supported yet."
    )


def clickhouse_table(url: str, table: str) -> tuple[str, str]:
    """``(database, table)`` of a ClickHouse sink: ``db.table`` wins, else the URL's path, else default."""
    if "." in table:
        database, _, name = table.partition(".")
        return database, name
    path = urlsplit(url).path.strip("/")
    return (path or "default"), table


def output_topics(flow: StreamFlow[Any, Any], plan: CompiledPlan) -> tuple[LoomOutputTopic, ...]:
    """Every topic the flow writes: its output, branch outputs, per-output DLQs and error routes."""
    found: dict[tuple[str, str], LoomOutputTopic] = {}

    def add(
        sink: CompiledSink, role: TopicRole, ref: str, kinds: tuple[str, ...] = (), payload: Any = None
    ) -> None:
        key = (role.value, sink.topic)
        prior = found.get(key)
        merged = tuple(sorted(set(kinds) | set(prior.error_kinds if prior else ())))
        contract = payload_contract(payload) if payload is not None else None
        if contract is None and prior is not None:
            contract = prior.contract
        found[key] = LoomOutputTopic(
            sink.topic,
            plan.name,
            role,
            ref,
            merged,
            _type_name(payload) if contract is not None else None,
            contract,
        )

    payloads = topic_payloads_by_path(flow)
    if plan.output is not None:
        name = flow.output.name if flow.output is not None else "output"
        add(plan.output, TopicRole.OUTPUT, name, payload=payloads.get(()))
    refs = topic_refs_by_path(flow)
    for path, sink in sorted(plan.terminal_sinks.items()):
        add(
            sink,
            TopicRole.OUTPUT,
            refs.get(tuple(path), ".".join(map(str, path))),
            payload=payloads.get(tuple(path)),
        )
    writers = [plan.output] if plan.output is not None else []
    for writer in [*writers, *plan.terminal_sinks.values()]:
        if writer.dlq_topic:
            found[(TopicRole.DLQ.value, writer.dlq_topic)] = LoomOutputTopic(
                writer.dlq_topic, plan.name, TopicRole.DLQ, f"dlq-of:{writer.topic}", ("sink",)
            )
    for kind, sink in plan.error_routes.items():
        declared = flow.errors.get(kind)
        add(sink, TopicRole.DLQ, declared.name if declared is not None else sink.topic, (_enum_value(kind),))
    return tuple(sorted(found.values(), key=lambda t: (t.role.value, t.topic)))


def topic_refs_by_path(flow: StreamFlow[Any, Any]) -> dict[tuple[int, ...], str]:
    """Logical names of the ``IntoTopic`` nodes and branch outputs, keyed by the compiler's node paths."""
    try:
        from loom.streaming.nodes._branches import is_branching_node, iter_branches
    except ImportError:
        return {}
    found: dict[tuple[int, ...], str] = {}

    def visit(nodes: Any, prefix: tuple[int, ...]) -> None:
        for index, node in enumerate(tuple(nodes)):
            path = prefix + (index,)
            if hasattr(node, "partitioning") and hasattr(node, "dlq"):
                found[path] = str(getattr(node, "logical_ref", None) or node.name)
            elif is_branching_node(node):
                for branch in iter_branches(node):
                    branch_path = path + (branch.index,)
                    if branch.output is not None:
                        found[branch_path] = str(
                            getattr(branch.output, "logical_ref", None) or branch.output.name
                        )
                    visit(branch.nodes, branch_path)
            elif getattr(node, "process", None) is not None and hasattr(node.process, "nodes"):
                visit(node.process.nodes, path)

    visit(flow.process.nodes, ())
    return found


def topic_payloads_by_path(flow: StreamFlow[Any, Any]) -> dict[tuple[int, ...], Any]:
    """The struct each ``IntoTopic`` writes, keyed by the compiler's node paths (``()``: ``flow.output``):
    its ``payload=``, else the output type of the last typed step before it (``RecordStep[In, Out]``'s
    ``Out``, or its ``execute`` return annotation), else the source's payload type; ``None`` if unknown."""
    try:
        from loom.streaming.nodes._branches import is_branching_node, iter_branches
    except ImportError:
        return {}
    found: dict[tuple[int, ...], Any] = {}

    def visit(nodes: Any, prefix: tuple[int, ...], current: Any) -> Any:
        for index, node in enumerate(tuple(nodes)):
            path = prefix + (index,)
            if hasattr(node, "partitioning") and hasattr(node, "dlq"):
                found[path] = getattr(node, "payload", None) or current
            elif is_branching_node(node):
                for branch in iter_branches(node):
                    branch_path = path + (branch.index,)
                    typed = branch.key if isinstance(branch.key, type) else current
                    end = visit(branch.nodes, branch_path, typed)
                    if branch.output is not None:
                        found[branch_path] = getattr(branch.output, "payload", None) or end
            elif getattr(node, "process", None) is not None and hasattr(node.process, "nodes"):
                current = visit(node.process.nodes, path, current)
            else:
                current = step_output_type(node) or current
        return current

    source = getattr(flow, "source", None)
    end = visit(flow.process.nodes, (), getattr(source, "payload", None))
    output = getattr(flow, "output", None)
    if output is not None:
        found[()] = getattr(output, "payload", None) or end
    return found


def step_output_type(node: Any) -> Any:
    """The payload type a step class produces: ``Out`` of ``RecordStep[In, Out]`` / ``BatchStep[In, Out]``
    (through its bases), else its ``execute`` return annotation (``list[Out]`` for batch steps); ``None``
    for anything else."""
    import typing

    if not isinstance(node, type):
        return None
    for klass in node.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            args = typing.get_args(base)
            if len(args) == 2 and isinstance(args[1], type) and hasattr(args[1], "__struct_fields__"):
                return args[1]
    execute = getattr(node, "execute", None)
    try:
        returned = typing.get_type_hints(execute).get("return") if execute is not None else None
    except Exception:  # unresolvable annotations: no type to infer
        return None
    if typing.get_origin(returned) is list:
        returned = (typing.get_args(returned) or (None,))[0]
    return returned if isinstance(returned, type) and hasattr(returned, "__struct_fields__") else None


def plan_hash(plan: CompiledPlan) -> str:
    """Stable hash of a compiled plan: same flow code and config give the same hash in any process."""
    canonical = json.dumps(_canonical(plan), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_hash(config: Any, key: bytes | None = None) -> str:
    """The config hash: HMAC-SHA256 (16 hex) of a resolved loom config under the installation's key
    (``loom_dagster.core.deploy.store.installation_key``, or *key*). Secrets are included, so a rotated
    password is a change, yet the hash, shown in metadata, annotations and ConfigMap names, reveals
    nothing of them: without the key a guess cannot be checked. The same config hashes alike in every
    process of one installation and differently in another. The one config-hash function: the catalog
    memoizes it per config object, the deploy applies it to a snapshot's files.

    Example:
        >>> config = {"password": "hunter2"}
        >>> config_hash(config, key=b"k" * 32) == config_hash(dict(config), key=b"k" * 32)
        True
        >>> config_hash(config, key=b"k" * 32) != config_hash(config, key=b"j" * 32)
        True
    """
    from loom_dagster.core.deploy.store import installation_key

    if isinstance(config, Mapping):
        data: Any = dict(config)
    else:
        from omegaconf import OmegaConf

        raw = getattr(config, "_config", None) or getattr(config, "raw", None)
        try:
            data = OmegaConf.to_container(raw, resolve=True) if raw is not None else repr(config)
        except Exception:
            data = repr(config)
    canonical = json.dumps(data, sort_keys=True, default=str)
    secret = key if key is not None else installation_key()
    return hmac.new(secret, canonical.encode(), hashlib.sha256).hexdigest()[:16]


def _canonical(value: Any, depth: int = 0) -> Any:
    if depth > 12:
        return repr(value)
    if value is None or isinstance(value, bool | int | float | str):
        return redact_text(value) if isinstance(value, str) else value
    if isinstance(value, Enum):
        return _enum_value(value)
    if isinstance(value, type):
        return _class_fingerprint(value)
    if isinstance(value, Mapping):
        return {str(_canonical(k, depth + 1)): _canonical(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_canonical(v, depth + 1) for v in value]
        return sorted(items, key=repr) if isinstance(value, set | frozenset) else items
    if is_dataclass(value):
        return {
            "__type__": _type_name(type(value)),
            **{f.name: _canonical(getattr(value, f.name), depth + 1) for f in fields(value)},
        }
    struct_fields = getattr(type(value), "__struct_fields__", None)
    if struct_fields is not None:
        return {
            "__type__": _type_name(type(value)),
            **{n: _canonical(getattr(value, n), depth + 1) for n in struct_fields},
        }
    children = _node_children(value)
    if children is not None:
        return {"__type__": _type_name(type(value)), "children": _canonical(children, depth + 1)}
    return {"__type__": _type_name(type(value)), "repr": redact_text(_stable_repr(value))}


def _node_children(value: Any) -> Any:
    for attr in ("routes", "nodes", "process"):
        if hasattr(value, attr) and not callable(getattr(value, attr)):
            return getattr(value, attr)
    return None


def _stable_repr(value: Any) -> str:
    text = repr(value)
    return "" if " at 0x" in text else text


_CLASS_FINGERPRINTS: dict[type, str] = {}


def _class_fingerprint(cls: type) -> str:
    """Qualified name plus a hash of the class source, so editing a step changes the plan hash."""
    cached = _CLASS_FINGERPRINTS.get(cls)
    if cached is not None:
        return cached
    try:
        source = class_source(cls)
        digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    except (OSError, TypeError):
        digest = "nosource"
    result = f"{_type_name(cls)}@{digest}"
    _CLASS_FINGERPRINTS[cls] = result
    return result


_CLASS_LINES: dict[str, tuple[list[str], dict[str, tuple[int, int]]]] = {}
_CLASS_LINES_LOCK = threading.Lock()


def class_source(cls: type) -> str:
    """``inspect.getsource(cls)``, reading each module's structure once instead of once per class.

    ``inspect`` parses the whole module for every class it looks up, then tokenizes the class to find
    its end; with hundreds of flows, each with its own step and payload classes, that dominated the
    plan hash. This parses each module once and takes each class's extent from the syntax tree, with
    ``inspect.getblock``'s rules: from the first decorator, through the last statement, plus trailing
    comment lines indented at least as deep as the body. The text is the same.
    """
    file = inspect.getsourcefile(cls)
    module = sys.modules.get(cls.__module__)
    if not file or module is None or getattr(cls, "__wrapped__", None) is not None:
        return inspect.getsource(cls)
    linecache.checkcache(file)
    lines = linecache.getlines(file, module.__dict__)
    if not lines:
        raise OSError("could not get source code")
    with _CLASS_LINES_LOCK:
        cached = _CLASS_LINES.get(file)
        if cached is None or cached[0] is not lines:
            finder = _ClassIndex(lines)
            finder.visit(ast.parse("".join(lines)))
            cached = (lines, finder.spans)
            _CLASS_LINES[file] = cached
    span = cached[1].get(cls.__qualname__)
    if span is None:
        raise OSError("could not find class definition")
    return "".join(lines[span[0] : span[1]])


class _ClassIndex(ast.NodeVisitor):
    """Qualified name -> lines ``[start, end)`` of every class, the first definition in source order
    (as ``inspect`` finds it)."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.stack: list[str] = []
        self.spans: dict[str, tuple[int, int]] = {}

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.stack += [node.name, "<locals>"]
        self.generic_visit(node)
        del self.stack[-2:]

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.stack.append(node.name)
        qualname = ".".join(self.stack)
        if qualname not in self.spans:
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            self.spans[qualname] = (start, self._block_end(node))
        self.generic_visit(node)
        self.stack.pop()

    def _block_end(self, node: ast.ClassDef) -> int:
        """Where ``inspect.getblock`` stops: after the last statement, or after the last comment line
        that follows it (blank lines in between) indented at least as deep as the body."""
        end = node.end_lineno or node.lineno
        first = node.body[0]
        head = self.lines[first.lineno - 1][: first.col_offset]
        if head.strip():  # body on the header line: no indented block, comments are not part of it
            return end
        body_col = len(head)
        for index in range(end, len(self.lines)):
            text = self.lines[index]
            stripped = text.strip()
            if not stripped:
                continue
            if not stripped.startswith("#"):
                break
            if len(text) - len(text.lstrip()) >= body_col:
                end = index + 1
        return end


def flow_fingerprint(flow: StreamFlow[Any, Any]) -> str:
    """Hash of everything in a ``StreamFlow`` that its compiled plan and records can depend on.

    The object graph (nodes, names, tables, backends, routes...), the source of every class and
    function it references, and the columns of every payload struct. Two flows with the same
    fingerprint, compiled with the same config and loom version, give the same records.
    """
    canonical = json.dumps(_structure(flow, 0, set()), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def _structure(value: Any, depth: int, path: set[int]) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Enum):
        return [_type_name(type(value)), _enum_value(value)]
    if isinstance(value, type):
        columns = payload_columns(value) if hasattr(value, "__struct_fields__") else ()
        return [_class_fingerprint(value), [[c.name, c.type, c.nullable] for c in columns]]
    if depth > 40 or id(value) in path:
        return [_type_name(type(value)), "..."]
    path = path | {id(value)}
    if inspect.isfunction(value) or inspect.ismethod(value):
        function: Any = getattr(value, "__func__", value)
        cells = []
        for cell in function.__closure__ or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # an empty cell
                cells.append(None)
        captured = [function.__defaults__, function.__kwdefaults__, cells]
        return [_function_fingerprint(function), _structure(captured, depth + 1, path)]
    if isinstance(value, functools.partial):
        return [
            _type_name(type(value)),
            _structure([value.func, value.args, value.keywords], depth + 1, path),
        ]
    if isinstance(value, Mapping):
        return [[_structure(k, depth + 1, path), _structure(v, depth + 1, path)] for k, v in value.items()]
    if isinstance(value, list | tuple):
        return [_structure(v, depth + 1, path) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_structure(v, depth + 1, path) for v in value), key=repr)
    return [_type_name(type(value)), _class_fingerprint(type(value)), _attributes(value, depth, path)]


def attribute_names(value: Any) -> list[str]:
    """The names of an object's state: dataclass fields, msgspec struct fields, else slots (mangled
    names for private ones) plus ``__dict__``; in order, without duplicates or ``__weakref__``."""
    names: list[str] = []
    if is_dataclass(value):
        names = [f.name for f in fields(value)]
    elif hasattr(type(value), "__struct_fields__"):
        names = list(type(value).__struct_fields__)
    else:
        for klass in type(value).__mro__:
            slots = klass.__dict__.get("__slots__", ())
            for slot in [slots] if isinstance(slots, str) else slots:
                private = slot.startswith("__") and not slot.endswith("__")
                names.append(f"_{klass.__name__.lstrip('_')}{slot}" if private else slot)
        names += list(getattr(value, "__dict__", {}))
    return [n for n in dict.fromkeys(names) if n != "__weakref__"]


def _attributes(value: Any, depth: int, path: set[int]) -> Any:
    found = {n: getattr(value, n) for n in attribute_names(value) if hasattr(value, n)}
    if not found:
        return _stable_repr(value)
    return {n: _structure(v, depth + 1, path) for n, v in found.items()}


def _function_fingerprint(function: Any) -> str:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        code = getattr(function, "__code__", None)
        source = repr((code.co_code, code.co_consts)) if code is not None else repr(function)
    return f"{_type_name(function)}@{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def _node_label(node: Any) -> str:
    if isinstance(node, type):
        return node.__name__
    name = getattr(node, "name", None)
    return f"{type(node).__name__}({name})" if name else type(node).__name__


def _type_name(t: Any) -> str:
    return f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', getattr(t, '__name__', repr(t)))}"


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value))
