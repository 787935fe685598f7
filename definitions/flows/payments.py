"""Order ledger flow: reads the enriched orders topic written by ``orders_enrichment`` and appends
large orders to a SQL table. Chained flows show up as one topic asset between two flow assets."""

from __future__ import annotations

from loom.core.model import LoomStruct
from loom.streaming import FromTopic, IntoTable, Message, Process, RecordStep, StreamFlow

from definitions.flows.orders import EnrichedOrder


class LedgerEntry(LoomStruct):
    """One row of the order ledger."""

    order_id: str
    customer_id: str
    amount_cents: int
    band: str


class ToLedgerEntry(RecordStep[EnrichedOrder, LedgerEntry]):
    """Project an enriched order onto a ledger row."""

    def execute(self, message: Message[EnrichedOrder], **kwargs: object) -> LedgerEntry:
        order = message.payload
        return LedgerEntry(
            order_id=order.order_id,
            customer_id=order.customer_id,
            amount_cents=order.amount_cents,
            band=order.band,
        )


ledger_flow: StreamFlow[EnrichedOrder, LedgerEntry] = StreamFlow(
    name="order_ledger",
    source=FromTopic("orders_enriched", payload=EnrichedOrder),
    process=Process(ToLedgerEntry, IntoTable(LedgerEntry, table="order_ledger", name="ledger_sql")),
)
