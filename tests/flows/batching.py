"""A flow with a keyed ``CollectBatch``: loom refuses it on a multi-process cluster under at_least_once."""

from __future__ import annotations

from loom.streaming import (
    Backend,
    CollectBatch,
    ForEach,
    FromTopic,
    IntoTable,
    Message,
    Process,
    StreamFlow,
)
from loom.streaming.nodes._step import BatchStep

from tests.flows.delta_only import Tick, TickRow


class StampBatch(BatchStep[Tick, TickRow]):
    """Stamp a batch of ticks."""

    def execute(self, messages: list[Message[Tick]], **kwargs: object) -> list[TickRow]:
        return [TickRow(id=m.payload.id, seq=m.payload.seq, version="batch") for m in messages]


batch_flow: StreamFlow[Tick, TickRow] = StreamFlow(
    name="ticks",
    source=FromTopic("ticks", payload=Tick),
    process=Process(
        CollectBatch(max_records=100, timeout_ms=200),
        StampBatch,
        ForEach(),
        IntoTable(TickRow, name="ticks_delta", backend=Backend.DELTA),
    ),
)
