"""``LoomTranslator``: how loom objects become Dagster ``AssetSpec``s. Subclass it to change keys,
groups, metadata or tags, one method per kind of object, as ``DagsterDbtTranslator`` does.

The translator decides how each asset looks; the builders wire the edges (deps) between them.
"""

from __future__ import annotations

import json

import dagster as dg

from loom_dagster.records import (
    LoomFlow,
    LoomSourceCollection,
    LoomStorageSink,
    LoomTopic,
    SinkBackend,
)
from loom_dagster.schema import to_table_schema

DEFAULT_FLOW_GROUP = "loom"
TOPIC_GROUP = "kafka"
MONGO_GROUP = "mongo"
DLQ_TAG = "loom/dlq"
BACKEND_LABELS = {SinkBackend.DELTA: "Delta", SinkBackend.CLICKHOUSE: "ClickHouse", SinkBackend.SQL: "SQL"}


class LoomTranslator:
    """Maps loom flows, topics, collections and tables to ``AssetSpec``s.

    Example:
        >>> import dagster as dg
        >>> class PrefixedTranslator(LoomTranslator):
        ...     def get_flow_spec(self, flow):
        ...         spec = super().get_flow_spec(flow)
        ...         return spec.replace_attributes(key=spec.key.with_prefix("streaming"))
    """

    def get_flow_spec(self, flow: LoomFlow) -> dg.AssetSpec:
        """The flow itself: ``["loom", <flow name>]``; materializing it deploys the job."""
        metadata: dict[str, object] = {
            "loom/import_path": flow.import_path,
            "loom/environment": flow.environment,
            "loom/plan_hash": flow.plan_hash,
            "loom/steps": ", ".join(flow.steps),
        }
        if flow.consumer_group is not None:
            metadata["loom/consumer_group"] = flow.consumer_group
            metadata["loom/delivery"] = flow.delivery or ""
            metadata["loom/topics"] = ", ".join(t.topic for t in flow.source_topics)
        if flow.source_collections:
            metadata["loom/collections"] = ", ".join(
                f"{c.database}.{c.collection}" for c in flow.source_collections
            )
        if flow.error_routes:
            metadata["loom/error_routes"] = error_routes_text(flow.error_routes)
        metadata["loom/sinks"] = dg.MetadataValue.json(flow.sink_identities)
        return dg.AssetSpec(
            key=dg.AssetKey(["loom", flow.name]),
            description=flow.description or _flow_description(flow),
            group_name=flow.group_name or DEFAULT_FLOW_GROUP,
            owners=list(flow.owners),
            tags=dict(flow.tags),
            kinds={"loom", "bytewax"},
            code_version=flow.plan_hash,
            metadata=metadata,
        )

    def get_source_topic_spec(self, topic: LoomTopic) -> dg.AssetSpec:
        """A Kafka topic that flows read and no flow here writes: ``["kafka", <topic>]``."""
        return dg.AssetSpec(
            key=dg.AssetKey(["kafka", topic.topic]),
            description=f"Kafka topic {topic.topic}, read by {_names(topic.read_by)}.",
            group_name=TOPIC_GROUP,
            kinds={"kafka"},
            metadata={"kafka/topic": topic.topic, "loom/read_by": ", ".join(topic.read_by)},
        )

    def get_output_topic_spec(self, topic: LoomTopic) -> dg.AssetSpec:
        """A Kafka topic a flow writes (output or dead-letter queue): ``["kafka", <topic>]``."""
        role = "Dead-letter topic" if topic.is_dlq else "Kafka topic"
        readers = f", read by {_names(topic.read_by)}" if topic.read_by else ""
        tags = {DLQ_TAG: "true"} if topic.is_dlq else {}
        metadata: dict[str, object] = {
            "kafka/topic": topic.topic,
            "loom/written_by": ", ".join(topic.written_by),
        }
        if topic.error_kinds:
            metadata["loom/error_kinds"] = ", ".join(topic.error_kinds)
        if topic.read_by:
            metadata["loom/read_by"] = ", ".join(topic.read_by)
        return dg.AssetSpec(
            key=dg.AssetKey(["kafka", topic.topic]),
            description=f"{role} {topic.topic}, written by {_names(topic.written_by)}{readers}.",
            group_name=TOPIC_GROUP,
            kinds={"kafka", "dlq"} if topic.is_dlq else {"kafka"},
            tags=tags,
            metadata=metadata,
        )

    def get_source_collection_spec(self, collection: LoomSourceCollection) -> dg.AssetSpec:
        """A MongoDB collection watched by change streams: ``["mongo", <db>, <collection>]``."""
        return dg.AssetSpec(
            key=dg.AssetKey(["mongo", collection.database, collection.collection]),
            description=f"MongoDB collection {collection.database}.{collection.collection} (change stream).",
            group_name=MONGO_GROUP,
            kinds={"mongodb"},
            metadata={"dagster/table_name": f"{collection.database}.{collection.collection}"},
        )

    def get_storage_sink_spec(self, sink: LoomStorageSink, flow: LoomFlow) -> dg.AssetSpec:
        """A table a flow writes: ``["delta", t]``, ``["clickhouse", db, t]`` or ``["sql", ref, t]``."""
        if sink.backend is SinkBackend.DELTA:
            key, table_name, kinds = ["delta", sink.table], sink.table, {"deltalake", "table"}
        elif sink.backend is SinkBackend.CLICKHOUSE:
            key = ["clickhouse", sink.database or "default", sink.table]
            table_name, kinds = f"{sink.database}.{sink.table}", {"clickhouse", "table"}
        else:
            key, table_name = ["sql", sink.database or "default", sink.table], sink.table
            kinds = {"sql", "table", *_sql_dialect(sink.uri)}
        metadata: dict[str, object] = {
            "dagster/table_name": table_name,
            "loom/sink": sink.sink_name,
            "loom/backend": sink.backend.value,
            "loom/payload_type": sink.payload_type,
        }
        if sink.uri:
            metadata["dagster/uri"] = sink.uri
        if sink.columns:
            metadata["dagster/column_schema"] = to_table_schema(sink.columns)
        return dg.AssetSpec(
            key=dg.AssetKey(key),
            description=f"{BACKEND_LABELS[sink.backend]} table {table_name}, written by loom flow "
            f"{sink.flow_name} (sink {sink.sink_name}).",
            group_name=flow.group_name or DEFAULT_FLOW_GROUP,
            kinds=kinds,
            owners=list(flow.owners),
            metadata=metadata,
        )


def _flow_description(flow: LoomFlow) -> str:
    sources = ", ".join(t.topic for t in flow.source_topics) or ", ".join(
        f"{c.database}.{c.collection}" for c in flow.source_collections
    )
    sinks = [f"{BACKEND_LABELS[s.backend]} {_qualified(s)}" for s in flow.storage_sinks]
    sinks += [f"{'DLQ' if t.role.value == 'dlq' else 'topic'} {t.topic}" for t in flow.output_topics]
    return (
        f"Reads {sources} -> writes {', '.join(sinks) or 'nothing'}. A loom streaming flow run as a "
        f"long-running Bytewax job ({flow.import_path}); materialize to deploy or redeploy it."
    )


def _qualified(sink: LoomStorageSink) -> str:
    return f"{sink.database}.{sink.table}" if sink.backend is SinkBackend.CLICKHOUSE else sink.table


def error_routes_text(routes: tuple[tuple[str, str], ...]) -> str:
    """``business, task -> orders.dlq; wire -> raw.dlq``: error kinds grouped by the topic they go to."""
    by_topic: dict[str, list[str]] = {}
    for kind, topic in routes:
        by_topic.setdefault(topic, []).append(kind)
    return "; ".join(f"{', '.join(sorted(kinds))} -> {topic}" for topic, kinds in sorted(by_topic.items()))


def _names(flows: tuple[str, ...]) -> str:
    return ", ".join(flows) or "no flow here"


def _sql_dialect(uri: str | None) -> set[str]:
    if not uri:
        return set()
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    return {{"postgresql": "postgres"}.get(scheme, scheme)} if scheme else set()


def metadata_json(value: object) -> dg.MetadataValue:
    """JSON metadata that survives non-JSON values by stringifying them."""
    return dg.MetadataValue.json(json.loads(json.dumps(value, default=str)))
