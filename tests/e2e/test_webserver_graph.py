"""The example code location under the real ``dagster dev``: the asset graph over GraphQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.dagster_dev import dagster_dev, graphql
from tests.support.example import EXAMPLE_EDGES

pytestmark = pytest.mark.slow

QUERY = """
query {
  assetNodes {
    assetKey { path }
    dependencyKeys { path }
    dependedByKeys { path }
    kinds
    groupName
    isMaterializable
  }
}
"""

EXPECTED_EDGES = EXAMPLE_EDGES


def test_example_asset_graph_over_graphql(tmp_path: Path) -> None:
    with dagster_dev(tmp_path / "home", env={"LOOM_DATA_DIR": str(tmp_path / "data")}) as url:
        nodes = graphql(url, QUERY)["assetNodes"]
    by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    edges = {("/".join(d["path"]), key) for key, n in by_key.items() for d in n["dependencyKeys"]}
    assert edges == EXPECTED_EDGES
    reverse = {(key, "/".join(d["path"])) for key, n in by_key.items() for d in n["dependedByKeys"]}
    assert reverse == EXPECTED_EDGES
    assert set(by_key["loom/orders_enrichment"]["kinds"]) == {"loom", "bytewax"}
    assert set(by_key["kafka/orders"]["kinds"]) == {"kafka"}
    assert "deltalake" in by_key["delta/orders_enriched"]["kinds"]
    assert set(by_key["kafka/orders.dlq"]["kinds"]) == {"kafka", "dlq"}
    assert "clickhouse" in by_key["clickhouse/analytics/orders_enriched"]["kinds"]
    assert by_key["loom/orders_enrichment"]["isMaterializable"] is True
    assert by_key["kafka/orders"]["isMaterializable"] is False
    assert by_key["loom/orders_enrichment"]["groupName"] == "orders"
