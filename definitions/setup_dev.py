"""Create what the example flows expect to exist: Kafka topics and the ClickHouse table.

``python -m definitions.setup_dev`` reads LOOM_KAFKA_BOOTSTRAP and LOOM_CLICKHOUSE_URL (scripts/dev
sets both). Idempotent.
"""

from __future__ import annotations

import os

CLICKHOUSE_DDL = (
    "CREATE TABLE IF NOT EXISTS analytics.orders_enriched (order_id String, customer_id String, "
    "amount Float64, amount_cents Int64, currency String, band String) ENGINE = MergeTree ORDER BY order_id"
)
TOPICS = ["orders", "orders.enriched", "orders.dlq"]


def create_clickhouse_table(url: str) -> None:
    """Create ``analytics.orders_enriched`` if missing."""
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=url)
    try:
        client.command("CREATE DATABASE IF NOT EXISTS analytics")
        client.command(CLICKHOUSE_DDL)
    finally:
        client.close()


def main() -> None:
    """Create topics and tables for the example code location."""
    from loom_dagster.dev.kafka import create_topics

    create_topics(os.environ["LOOM_KAFKA_BOOTSTRAP"], TOPICS, partitions=3)
    create_clickhouse_table(os.environ["LOOM_CLICKHOUSE_URL"])
    print(f"created topics {', '.join(TOPICS)} and analytics.orders_enriched")


if __name__ == "__main__":
    main()
