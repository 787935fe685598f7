"""What the example code location's asset graph must show (shared by the GraphQL and browser tests)."""

import dagster as dg

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


def asset_edges(defs: dg.Definitions) -> set[tuple[str, str]]:
    """Every (upstream, downstream) edge of a Definitions' asset graph, as user strings."""
    graph = defs.resolve_asset_graph()
    return {
        (parent.to_user_string(), key.to_user_string())
        for key in graph.get_all_asset_keys()
        for parent in graph.get(key).parent_keys
    }
