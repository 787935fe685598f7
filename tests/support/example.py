"""What the example code location's asset graph must show (shared by the GraphQL and browser tests)."""

EXAMPLE_EDGES = {
    ("kafka/orders", "loom/orders_enrichment"),
    ("loom/orders_enrichment", "delta/orders_enriched"),
    ("loom/orders_enrichment", "clickhouse/analytics/orders_enriched"),
    ("loom/orders_enrichment", "kafka/orders.enriched"),
    ("loom/orders_enrichment", "kafka/orders.dlq"),
    ("kafka/orders.enriched", "loom/order_ledger"),
    ("loom/order_ledger", "sql/warehouse/order_ledger"),
    ("delta/orders_enriched", "orders_by_band"),
    ("clickhouse/analytics/orders_enriched", "revenue_by_customer"),
}
