"""Create what the example flows expect to exist: Kafka topics and every table they write.

``python -m definitions.setup_dev`` reads LOOM_KAFKA_BOOTSTRAP, LOOM_CLICKHOUSE_URL and LOOM_DATA_DIR
(scripts/dev sets them). The tables come from the example specs themselves (``definitions.FLOWS``):
each flow is compiled with its config and ``check_sink_tables(create_missing=True)`` creates the
missing SQL and ClickHouse tables from the payload structs, so the tables always match what the
flows write (Delta tables are created by loom on their first write). Idempotent: existing tables are
only checked, and a mismatching one fails with the DDL that fixes it.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager

from loom_dagster.core.sinks.table_report import SinkTablesReport

TOPICS = ["orders", "orders.enriched", "orders.dlq"]


@contextmanager
def _environ(overrides: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with *overrides* for the duration (the configs read ``${oc.env:...}`` at load)."""
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def create_example_tables(
    environ: Mapping[str, str] | None = None,
    *,
    environment: str | None = None,
    backends: Collection[str] | None = None,
) -> list[tuple[str, SinkTablesReport]]:
    """Create every missing table the example flows write; ``(flow name, report)`` per flow.

    *environ* overrides variables the configs read (LOOM_DATA_DIR, LOOM_CLICKHOUSE_URL...) while the
    flows compile. Raises ``RuntimeError`` with the report's text if a table cannot be created or an
    existing one does not match its payload.
    """
    from definitions.definitions import FLOWS
    from loom_dagster.core.checks.tables import check_sink_tables
    from loom_dagster.core.flows.catalog import compile_spec

    reports = []
    with _environ(environ or {}):
        for spec in FLOWS:
            compiled = compile_spec(spec, environment)
            report = check_sink_tables(compiled, create_missing=True, backends=backends)
            if not report.ok:
                raise RuntimeError(report.describe(compiled.flow.name))
            reports.append((compiled.flow.name, report))
    return reports


def create_clickhouse_table(url: str) -> None:
    """Create the example's ClickHouse tables (``analytics.orders_enriched``) on the server at *url*."""
    create_example_tables({"LOOM_CLICKHOUSE_URL": url}, backends=["clickhouse"])


def main() -> None:
    """Create topics and tables for the example code location."""
    from loom_dagster.dev.kafka import create_topics

    create_topics(os.environ["LOOM_KAFKA_BOOTSTRAP"], TOPICS, partitions=3)
    print(f"created topics {', '.join(TOPICS)}")
    for name, report in create_example_tables():
        print(report.describe(name))


if __name__ == "__main__":
    main()
