"""Two chained flows for the contract tests: ``chain_a`` (ticks -> ``rows`` topic) and ``chain_b`` (``rows``
-> Delta, errors to ``chain_b_dlq``). Variants of each keep the flow's name and change its struct, one
import path each:

- ``chain_a``: writes ``Row`` (id, seq, amount); ``chain_a_compatible``: ``RowRegion`` (adds ``region`` with a
  default, ``seq`` as before); ``chain_a_breaking``: ``RowRenamed`` (``amount`` renamed ``total``).
- ``chain_b``: reads ``Row``; ``chain_b_strict``: reads ``RowCurrency`` (a new required ``currency``).

Every struct declares the message type ``chain.row``: the variants are versions of one contract.
"""

from __future__ import annotations

from typing import Any

from loom.core.model import LoomStruct
from loom.streaming import (
    Backend,
    FromTopic,
    IntoTable,
    IntoTopic,
    Message,
    Process,
    RecordStep,
    StreamFlow,
)

from tests.flows.delta_only import Tick


class Row(LoomStruct):
    __loom_message_type__ = "chain.row"
    id: str
    seq: int
    amount: float


class RowRegion(LoomStruct):
    __loom_message_type__ = "chain.row"
    id: str
    seq: int
    amount: float
    region: str = "eu"


class RowRenamed(LoomStruct):
    __loom_message_type__ = "chain.row"
    id: str
    seq: int
    total: float


class RowCurrency(LoomStruct):
    __loom_message_type__ = "chain.row"
    id: str
    seq: int
    amount: float
    currency: str


class ToRow(RecordStep[Tick, Row]):
    def execute(self, message: Message[Tick], **kwargs: object) -> Row:
        return Row(id=message.payload.id, seq=message.payload.seq, amount=message.payload.seq * 1.5)


class ToRowRegion(RecordStep[Tick, RowRegion]):
    def execute(self, message: Message[Tick], **kwargs: object) -> RowRegion:
        return RowRegion(id=message.payload.id, seq=message.payload.seq, amount=message.payload.seq * 1.5)


class ToRowRenamed(RecordStep[Tick, RowRenamed]):
    def execute(self, message: Message[Tick], **kwargs: object) -> RowRenamed:
        return RowRenamed(id=message.payload.id, seq=message.payload.seq, total=message.payload.seq * 1.5)


def writer(step: Any) -> StreamFlow[Any, Any]:
    """Flow ``chain_a``: ticks -> *step* -> the ``rows`` topic (its struct inferred from the step)."""
    return StreamFlow(
        name="chain_a",
        source=FromTopic("ticks", payload=Tick),
        process=Process(step, IntoTopic("rows")),
        errors=IntoTopic("chain_a_dlq"),
    )


def reader(payload: Any) -> StreamFlow[Any, Any]:
    """Flow ``chain_b``: the ``rows`` topic decoded as *payload* -> Delta."""
    return StreamFlow(
        name="chain_b",
        source=FromTopic("rows", payload=payload),
        process=Process(IntoTable(payload, name="rows_delta", backend=Backend.DELTA)),
        errors=IntoTopic("chain_b_dlq"),
    )


chain_a = writer(ToRow)
chain_a_compatible = writer(ToRowRegion)
chain_a_breaking = writer(ToRowRenamed)
chain_b = reader(Row)
chain_b_strict = reader(RowCurrency)
