"""Wire the translator's specs into one asset graph: dedupe topics, tables and flows, add the edges."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TypeVar

import dagster as dg
import msgspec

from loom_dagster.core.contracts.shape import PayloadContract
from loom_dagster.core.contracts.topic import topic_contract
from loom_dagster.core.errors import DuplicateAssetKeyError
from loom_dagster.core.flows.catalog import CompiledFlow
from loom_dagster.core.flows.records import (
    LoomFlow,
    LoomSourceCollection,
    LoomStorageSink,
    LoomTopic,
    TopicRole,
)
from loom_dagster.translator import LoomTranslator


class FlowNode(msgspec.Struct):
    """One flow's spec in the graph, and the asset key of each sink slot (for the lineage check)."""

    compiled: CompiledFlow
    spec: dg.AssetSpec
    sink_keys: dict[str, str] = msgspec.field(default_factory=dict)


class LoomAssetGraph(msgspec.Struct):
    """Every loom asset of a code location: flow specs (materializable) and external specs."""

    flows: list[FlowNode]
    external_specs: list[dg.AssetSpec]

    def spec_for(self, key: dg.AssetKey) -> dg.AssetSpec | None:
        """The spec with *key*, among flows and external assets."""
        for node in self.flows:
            if node.spec.key == key:
                return node.spec
        return next((s for s in self.external_specs if s.key == key), None)


def build_asset_graph(compiled: Sequence[CompiledFlow], translator: LoomTranslator) -> LoomAssetGraph:
    """Specs for every flow, topic, collection and table, with deps from sources through flows to sinks."""
    owners = _KeyOwners()
    flow_nodes = [FlowNode(c, translator.get_asset_spec(c.flow)) for c in compiled]
    for node in flow_nodes:
        owners.claim(node.spec.key, f"flow:{node.compiled.flow.name}", f"flow {node.compiled.flow.name!r}")
    flow_key = {n.compiled.flow.name: n.spec.key for n in flow_nodes}

    topics = merge_topics([c.flow for c in compiled])
    topic_specs: dict[str, dg.AssetSpec] = {}
    for topic in topics:
        writers = [flow_key[f] for f in topic.written_by]
        spec = _with_deps(translator.get_asset_spec(_with_upstream(topic, writers)), writers)
        owners.claim(spec.key, f"kafka:{topic.topic}", f"Kafka topic {topic.topic!r}")
        topic_specs[topic.topic] = spec

    collection_specs: dict[tuple[str, str], dg.AssetSpec] = {}
    for coll in _merge_collections([c.flow for c in compiled]):
        spec = translator.get_asset_spec(coll)
        owners.claim(
            spec.key, f"mongo:{coll.database}.{coll.collection}", f"Mongo collection {coll.collection!r}"
        )
        collection_specs[(coll.database, coll.collection)] = spec

    sink_specs: dict[dg.AssetKey, dg.AssetSpec] = {}
    sink_writers: dict[dg.AssetKey, list[dg.AssetKey]] = {}
    for node in flow_nodes:
        flow = node.compiled.flow
        for sink in flow.storage_sinks:
            spec = translator.get_asset_spec(_with_upstream(sink, [node.spec.key]), flow=flow)
            owners.claim(
                spec.key, sink.identity, f"{sink.backend.value} sink {sink.slot!r} of flow {flow.name!r}"
            )
            sink_specs.setdefault(spec.key, spec)  # a table several flows write: the first spec wins
            sink_writers.setdefault(spec.key, []).append(node.spec.key)
            node.sink_keys[sink.slot] = spec.key.to_user_string()
        for out in flow.output_topics:
            node.sink_keys[out.slot] = topic_specs[out.topic].key.to_user_string()
        upstream = [topic_specs[t.topic].key for t in flow.source_topics]
        upstream += [collection_specs[(c.database, c.collection)].key for c in flow.source_collections]
        node.spec = _with_deps(node.spec, upstream)

    sinks = [_with_deps(spec, list(dict.fromkeys(sink_writers[key]))) for key, spec in sink_specs.items()]
    externals = [*topic_specs.values(), *collection_specs.values(), *sinks]
    return LoomAssetGraph(flows=flow_nodes, external_specs=_dedupe_deps(externals))


_Upstream = TypeVar("_Upstream", LoomTopic, LoomStorageSink)


def _with_upstream(record: _Upstream, keys: list[dg.AssetKey]) -> _Upstream:
    """*record* carrying the keys its node depends on, for the translator's default hooks (which put
    them in the spec they make: one spec each, where adding deps afterwards would make and validate
    a second)."""
    return msgspec.structs.replace(record, upstream=tuple(tuple(key.path) for key in keys))


def _with_deps(spec: dg.AssetSpec, deps: list[dg.AssetKey]) -> dg.AssetSpec:
    """*spec* with those of *deps* it lacks (a translator hook may leave them out)."""
    present = {dep.asset_key for dep in spec.deps}
    missing = [key for key in deps if key not in present]
    return spec.merge_attributes(deps=missing) if missing else spec


def merge_topics(flows: Sequence[LoomFlow]) -> list[LoomTopic]:
    """One record per physical topic, with every flow that writes or reads it, and (for a topic a flow
    writes) its contract: each writer's struct against each reader's (``core.contracts.topic``)."""
    writers: dict[str, list[str]] = defaultdict(list)
    readers: dict[str, list[str]] = defaultdict(list)
    roles: dict[str, set[TopicRole]] = defaultdict(set)
    kinds: dict[str, set[str]] = defaultdict(set)
    written: dict[str, list[tuple[str, PayloadContract | None]]] = defaultdict(list)
    read: dict[str, list[tuple[str, tuple[PayloadContract, ...]]]] = defaultdict(list)
    for flow in flows:
        for src in flow.source_topics:
            readers[src.topic].append(flow.name)
            read[src.topic].append((flow.name, src.contracts))
        for out in flow.output_topics:
            writers[out.topic].append(flow.name)
            roles[out.topic].add(out.role)
            kinds[out.topic].update(out.error_kinds)
            if out.role is TopicRole.OUTPUT:
                written[out.topic].append((flow.name, out.contract))
    names = sorted(writers.keys() | readers.keys())
    return [
        LoomTopic(
            topic=name,
            written_by=tuple(dict.fromkeys(writers[name])),
            read_by=tuple(dict.fromkeys(readers[name])),
            roles=tuple(sorted(roles[name])),
            error_kinds=tuple(sorted(kinds[name])),
            contract=topic_contract(name, written[name], read[name]) if name in written else None,
        )
        for name in names
    ]


def _merge_collections(flows: Sequence[LoomFlow]) -> list[LoomSourceCollection]:
    seen: dict[tuple[str, str], LoomSourceCollection] = {}
    for flow in flows:
        for coll in flow.source_collections:
            seen.setdefault((coll.database, coll.collection), coll)
    return list(seen.values())


def _dedupe_deps(specs: list[dg.AssetSpec]) -> list[dg.AssetSpec]:
    """Each dep once (the last ``AssetDep`` per key, at its first position); specs without
    duplicates are returned as they are."""
    out = []
    for spec in specs:
        deps = list(spec.deps)
        unique = {d.asset_key: d for d in deps}
        out.append(spec if len(unique) == len(deps) else spec.replace_attributes(deps=list(unique.values())))
    return out


class _KeyOwners:
    """Refuses two different things under one asset key; the same table from two flows is fine."""

    def __init__(self) -> None:
        self._owners: dict[dg.AssetKey, tuple[str, str]] = {}

    def claim(self, key: dg.AssetKey, identity: str, label: str) -> None:
        prior = self._owners.get(key)
        if prior is None:
            self._owners[key] = (identity, label)
            return
        if prior[0] == identity and not identity.startswith("flow:"):
            return
        raise DuplicateAssetKeyError(
            f"asset key {key.to_user_string()!r} is claimed by {prior[1]} and by {label}. Flow names must be "
            "unique, and two different tables or topics cannot share a key: rename one, or give them "
            "distinct keys in a LoomTranslator subclass (e.g. a key prefix)."
        )


def graph_sinks(graph: LoomAssetGraph) -> list[tuple[str, CompiledFlow, dict[str, str]]]:
    """Each flow of *graph* as the Dagster-free sink readers take it: (flow key, compiled flow, sink keys)."""
    return [(node.spec.key.to_user_string(), node.compiled, dict(node.sink_keys)) for node in graph.flows]
