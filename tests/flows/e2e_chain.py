"""Two chained flows for the end-to-end delay tests: ``e2e_a`` reads ``orders`` and writes ``enriched``
(a topic), ``e2e_b`` reads ``enriched`` and writes a Delta table. Each has its own config directory
(``e2e_chain_configs``)."""

from __future__ import annotations

from pathlib import Path

from loom.streaming import Backend, FromTopic, IntoTable, IntoTopic, Message, Process, RecordStep, StreamFlow

from tests.flows.delta_only import Tick, TickRow


class Enrich(RecordStep[Tick, TickRow]):
    """Copy the tick into a row."""

    def execute(self, message: Message[Tick], **kwargs: object) -> TickRow:
        return TickRow(id=message.payload.id, seq=message.payload.seq, version="a")


class Keep(RecordStep[TickRow, TickRow]):
    """Pass the row on."""

    def execute(self, message: Message[TickRow], **kwargs: object) -> TickRow:
        return message.payload


flow_a = StreamFlow(
    name="e2e_a",
    source=FromTopic("orders", payload=Tick),
    process=Process(Enrich, IntoTopic("enriched", payload=TickRow)),
    errors=IntoTopic("a_dlq"),
)

flow_b = StreamFlow(
    name="e2e_b",
    source=FromTopic("enriched", payload=TickRow),
    process=Process(Keep, IntoTable(TickRow, name="chain_delta", backend=Backend.DELTA)),
)


def e2e_chain_configs(root: Path, *, brokers: str, prefix: str, delta_uri: str) -> tuple[Path, Path]:
    """Config directories of ``flow_a`` and ``flow_b``: topics ``<prefix>.orders`` -> ``<prefix>.enriched``
    (dead letters to ``<prefix>.a.dlq``), the table at *delta_uri* flushed at every row."""
    # Imported here: the flows are imported where the test suite is not (the job image has tests/flows only).
    from tests.conftest import write_yaml

    a = write_yaml(
        root / "a" / "base.yaml",
        f"""
        kafka:
          consumer:
            brokers: ["{brokers}"]
            group_id: {prefix}-a
            topics: [{prefix}.orders]
            delivery: at_least_once
            auto_offset_reset: earliest
          producer:
            brokers: ["{brokers}"]
          producers:
            enriched: {{brokers: ["{brokers}"], topic: {prefix}.enriched}}
            a_dlq: {{brokers: ["{brokers}"], topic: {prefix}.a.dlq}}
        streaming:
          runtime: {{epoch_interval_ms: 200}}
        """,
    ).parent
    b = write_yaml(
        root / "b" / "base.yaml",
        f"""
        kafka:
          consumer:
            brokers: ["{brokers}"]
            group_id: {prefix}-b
            topics: [{prefix}.enriched]
            delivery: at_least_once
            auto_offset_reset: earliest
          producer:
            brokers: ["{brokers}"]
        streaming:
          runtime: {{epoch_interval_ms: 200}}
          sinks:
            chain_delta:
              uri: "{delta_uri}"
              table: chain
              buffer_max_records: 1
              buffer_max_age_s: 0.2
        """,
    ).parent
    return a, b
