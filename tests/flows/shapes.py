"""A flow whose sinks are chosen by ``LOOM_TEST_SINKS`` each time it is imported through its factory,
so a test can add or remove a sink between definitions load and materialization."""

from __future__ import annotations

import os

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


class Event(LoomStruct):
    """Input event."""

    event_id: str
    value: int


class Row(LoomStruct):
    """Row written to the tables."""

    event_id: str
    value: int
    doubled: int
    note: str | None = None


class Double(RecordStep[Event, Row]):
    """Double the value."""

    def execute(self, message: Message[Event], **kwargs: object) -> Row:
        return Row(
            event_id=message.payload.event_id, value=message.payload.value, doubled=2 * message.payload.value
        )


def _route(kind: str) -> BroadcastRoute[Row, Row]:
    if kind == "delta":
        return BroadcastRoute(process=Process(IntoTable(Row, name="events_delta", backend=Backend.DELTA)))
    if kind == "ch":
        return BroadcastRoute(process=Process(IntoTable(Row, name="events_ch", backend=Backend.CLICKHOUSE)))
    if kind == "sql":
        return BroadcastRoute(process=Process(IntoTable(Row, table="events", name="events_sql")))
    if kind == "topic":
        return BroadcastRoute(process=Process(IntoTopic("events_out", payload=Row)))
    raise ValueError(kind)


def make_flow() -> StreamFlow[Event, Row]:
    """The flow with the sinks named in ``LOOM_TEST_SINKS`` (default: delta,ch,topic)."""
    kinds = os.environ.get("LOOM_TEST_SINKS", "delta,ch,topic").split(",")
    return StreamFlow(
        name=os.environ.get("LOOM_TEST_FLOW_NAME", "events"),
        source=FromTopic("events", payload=Event),
        process=Process(Double, Broadcast(*(_route(k) for k in kinds))),
        errors=IntoTopic("events_dlq"),
    )


events_flow = make_flow()
not_a_flow = {"name": "events"}


def make_second_reader() -> StreamFlow[Event, Row]:
    """A second flow on the same source topic (``events_audit``), writing only Delta."""
    return StreamFlow(
        name="events_audit",
        source=FromTopic("events", payload=Event),
        process=Process(Double, IntoTable(Row, name="events_delta", backend=Backend.DELTA)),
    )
