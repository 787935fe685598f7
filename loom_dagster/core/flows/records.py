"""Typed, frozen records derived from a loom ``CompiledPlan``: what the translator and builders see.

They carry only what the asset graph, the lineage check and the deployer need, with secrets already
removed, so they are safe to put into asset metadata.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from loom_dagster.core.contracts.shape import PayloadContract
from loom_dagster.core.contracts.topic import TopicContract


class SinkBackend(StrEnum):
    """Storage backends loom's ``IntoTable`` writes to."""

    DELTA = "delta"
    CLICKHOUSE = "clickhouse"
    SQL = "sql"


class TopicRole(StrEnum):
    """Why a flow writes a topic."""

    OUTPUT = "output"
    DLQ = "dlq"


class LoomColumn(msgspec.Struct, frozen=True):
    """One column of a table sink, derived from a field of the payload struct."""

    name: str
    type: str
    nullable: bool = False
    description: str | None = None


class LoomSourceTopic(msgspec.Struct, frozen=True):
    """A Kafka topic a flow consumes (physical name, from config)."""

    topic: str
    flow_name: str
    consumer_group: str
    payload_types: tuple[str, ...] = ()
    contracts: tuple[PayloadContract, ...] = ()
    """The struct(s) the flow decodes the topic with: one (``FromTopic``), or the types a
    ``FromMultiTypeTopic`` dispatches by message type."""


class LoomSourceCollection(msgspec.Struct, frozen=True):
    """A MongoDB collection a flow watches through change streams."""

    database: str
    collection: str
    flow_name: str


class LoomStorageSink(msgspec.Struct, frozen=True):
    """A table a flow writes through loom's ``IntoTable``.

    ``identity`` is what the lineage check compares: the Delta URI, ClickHouse ``database.table``,
    or SQL ``database ref`` + table. ``uri`` never carries a password.
    """

    flow_name: str
    sink_name: str
    backend: SinkBackend
    table: str
    database: str | None
    uri: str | None
    payload_type: str
    columns: tuple[LoomColumn, ...] = ()
    node_path: tuple[int, ...] = ()
    upstream: tuple[tuple[str, ...], ...] = ()
    """Asset-key paths the table's node depends on (its writer flow), set by the graph builder."""

    @property
    def identity(self) -> str:
        """Stable identity of the physical table, for lineage checks."""
        if self.backend is SinkBackend.DELTA:
            return f"delta:{self.uri}"
        if self.backend is SinkBackend.CLICKHOUSE:
            return f"clickhouse:{self.database}.{self.table}"
        return f"sql:{self.database}/{self.table}"

    @property
    def slot(self) -> str:
        """Name of the sink in the flow (its ``IntoTable`` name), stable across config changes."""
        return self.sink_name or ".".join(map(str, self.node_path))


class LoomOutputTopic(msgspec.Struct, frozen=True):
    """A Kafka topic a flow writes: its output, a branch output, or an error route (DLQ)."""

    topic: str
    flow_name: str
    role: TopicRole
    ref: str
    error_kinds: tuple[str, ...] = ()
    payload_type: str | None = None
    contract: PayloadContract | None = None
    """The struct the flow writes (``OUTPUT`` role only: dead-letter topics carry error envelopes):
    ``IntoTopic(payload=...)``, else the output type of the step before it; ``None`` if neither says."""

    @property
    def identity(self) -> str:
        """Stable identity of the physical topic, for lineage checks."""
        return f"kafka:{self.topic}"

    @property
    def slot(self) -> str:
        """Logical reference of the output in the flow."""
        return f"{self.role.value}:{self.ref}"


class LoomFlow(msgspec.Struct, frozen=True):
    """One compiled flow, as the asset graph sees it."""

    name: str
    import_path: str
    plan_hash: str
    config_hash: str
    environment: str
    source_kind: str
    consumer_group: str | None
    delivery: str | None
    source_topics: tuple[LoomSourceTopic, ...] = ()
    source_collections: tuple[LoomSourceCollection, ...] = ()
    storage_sinks: tuple[LoomStorageSink, ...] = ()
    output_topics: tuple[LoomOutputTopic, ...] = ()
    error_routes: tuple[tuple[str, str], ...] = ()
    steps: tuple[str, ...] = ()
    group_name: str | None = None
    description: str | None = None
    owners: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = msgspec.field(default_factory=tuple)

    @property
    def sink_identities(self) -> dict[str, str]:
        """Slot -> identity of every sink (tables and topics) the flow writes."""
        out = {s.slot: s.identity for s in self.storage_sinks}
        out.update({t.slot: t.identity for t in self.output_topics})
        return out


class LoomTopic(msgspec.Struct, frozen=True):
    """A Kafka topic as one node of the asset graph, merged over every flow that reads or writes it."""

    topic: str
    written_by: tuple[str, ...] = ()
    read_by: tuple[str, ...] = ()
    roles: tuple[TopicRole, ...] = ()
    error_kinds: tuple[str, ...] = ()
    upstream: tuple[tuple[str, ...], ...] = ()
    """Asset-key paths the topic's node depends on (the flows writing it), set by the graph builder."""
    contract: TopicContract | None = None
    """The struct written to the topic and each reading flow's verdict (flows of this code location)."""

    @property
    def is_dlq(self) -> bool:
        """Whether some flow routes errors to this topic."""
        return TopicRole.DLQ in self.roles
