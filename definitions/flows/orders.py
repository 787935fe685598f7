"""Order enrichment flow: Kafka -> enrich -> Delta + ClickHouse + summary topic, errors to a DLQ.

The flow is plain loom; nothing here knows about Dagster.
"""

from __future__ import annotations

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


class Order(LoomStruct):
    """An order as it arrives on the `orders` topic."""

    order_id: str
    customer_id: str
    amount: float
    currency: str = "EUR"


class EnrichedOrder(LoomStruct):
    """An order with its amount converted to cents and a size band."""

    order_id: str
    customer_id: str
    amount: float
    amount_cents: int
    currency: str
    band: str


class EnrichOrder(RecordStep[Order, EnrichedOrder]):
    """Reject negative amounts; add cents and a size band."""

    def execute(self, message: Message[Order], **kwargs: object) -> EnrichedOrder:
        order = message.payload
        if order.amount < 0:
            raise RuleViolation("amount", f"negative amount {order.amount}")
        band = "large" if order.amount >= 100 else "small"
        return EnrichedOrder(
            order_id=order.order_id,
            customer_id=order.customer_id,
            amount=order.amount,
            amount_cents=round(order.amount * 100),
            currency=order.currency,
            band=band,
        )


orders_flow: StreamFlow[Order, EnrichedOrder] = StreamFlow(
    name="orders_enrichment",
    source=FromTopic("orders", payload=Order),
    process=Process(
        EnrichOrder,
        Broadcast(
            BroadcastRoute(
                process=Process(IntoTable(EnrichedOrder, name="orders_delta", backend=Backend.DELTA))
            ),
            BroadcastRoute(
                process=Process(IntoTable(EnrichedOrder, name="orders_ch", backend=Backend.CLICKHOUSE))
            ),
            BroadcastRoute(process=Process(IntoTopic("orders_enriched", payload=EnrichedOrder))),
        ),
    ),
    errors=IntoTopic("orders_dlq"),
)
