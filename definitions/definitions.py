"""The example code location: two chained loom flows and two batch assets downstream of their tables.

    kafka/orders -> loom/orders_enrichment -> delta/orders_enriched     -> orders_by_band
                                           -> clickhouse/analytics/orders_enriched -> revenue_by_customer
                                           -> kafka/orders.enriched -> loom/order_ledger -> sql/warehouse/order_ledger
                                           -> kafka/orders.dlq (dead letters)

Run it with ``scripts/dev`` (starts Kafka and ClickHouse, then ``dagster dev -w workspace.yaml``).
"""

import os
from pathlib import Path

import dagster as dg

from loom_dagster import LoomFlowSpec, build_loom_defs

CONFIG = Path(__file__).parent / "config"
ENVIRONMENT = os.environ.get("LOOM_ENV", "development")

FLOWS = [
    LoomFlowSpec(
        "definitions.flows.orders:orders_flow",
        config=CONFIG / "orders",
        environment=ENVIRONMENT,
        group_name="orders",
        owners=["team:data-platform"],
        tags={"domain": "orders"},
    ),
    LoomFlowSpec(
        "definitions.flows.payments:ledger_flow",
        config=CONFIG / "ledger",
        environment=ENVIRONMENT,
        group_name="ledger",
        owners=["team:finance"],
    ),
]

ORDERS_DELTA = dg.AssetKey(["delta", "orders_enriched"])
ORDERS_CLICKHOUSE = dg.AssetKey(["clickhouse", "analytics", "orders_enriched"])


def _data_dir() -> Path:
    return Path(os.environ.get("LOOM_DATA_DIR", "/tmp/loom-data"))


@dg.asset(deps=[ORDERS_DELTA], group_name="reporting", kinds={"python", "deltalake"})
def orders_by_band(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Order count and revenue per size band, read from the Delta table the orders flow writes."""
    from deltalake import DeltaTable

    table = DeltaTable(str(_data_dir() / "delta" / "orders_enriched")).to_pyarrow_table(
        columns=["band", "amount_cents"]
    )
    totals: dict[str, list[int]] = {}
    for band, cents in zip(
        table.column("band").to_pylist(), table.column("amount_cents").to_pylist(), strict=True
    ):
        entry = totals.setdefault(band, [0, 0])
        entry[0] += 1
        entry[1] += cents
    context.log.info(f"bands: {totals}")
    return dg.MaterializeResult(
        metadata={f"{band}_orders": count for band, (count, _) in totals.items()} | {"rows": table.num_rows}
    )


@dg.asset(deps=[ORDERS_CLICKHOUSE], group_name="reporting", kinds={"python", "clickhouse"})
def revenue_by_customer(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Top customers by revenue, queried from the ClickHouse table the orders flow writes."""
    import clickhouse_connect

    client = clickhouse_connect.get_client(dsn=os.environ.get("LOOM_CLICKHOUSE_URL", "http://127.0.0.1:8123"))
    try:
        rows = client.query(
            "SELECT customer_id, sum(amount_cents) AS cents FROM analytics.orders_enriched "
            "GROUP BY customer_id ORDER BY cents DESC LIMIT 10"
        ).result_rows
    finally:
        client.close()
    context.log.info(f"top customers: {rows}")
    return dg.MaterializeResult(metadata={"customers": len(rows)})


defs = dg.Definitions.merge(
    build_loom_defs(FLOWS),
    dg.Definitions(assets=[orders_by_band, revenue_by_customer]),
)
