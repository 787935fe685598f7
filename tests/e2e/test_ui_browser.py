"""The example code location under the real ``dagster dev``, checked in a real (headless) browser.

Drives Debian's Chromium over the DevTools protocol (``tests/support/browser.py``): opens the global asset
lineage, expands every group, and checks that the flows, topics, Delta, ClickHouse and SQL tables render as
nodes joined by the expected edges; then deploys the orders flow and opens its page (deployment metadata)
and its checks (evaluated by the daemon's sensors). Screenshots go to ``docs/screenshots``.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from definitions.setup_dev import TOPICS, create_clickhouse_table
from loom_dagster import DeploymentStore
from loom_dagster.core import procfs
from loom_dagster.dev.kafka import KafkaBroker, create_topics
from loom_dagster.dev.produce import produce, sample_orders
from tests.support.browser import CHROMIUM, BrowserError, Chromium
from tests.support.dagster_dev import ROOT, dagster_dev, launch_materialization, wait_run
from tests.support.example import EXAMPLE_EDGES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no Chromium at {CHROMIUM}"),
]

SCREENSHOTS = ROOT / "docs" / "screenshots"
PAGE_TIMEOUT = 90.0  # a cold webserver on 2 CI cores compiles nothing, but the first GraphQL calls are slow

# asset key -> (label the graph shows, a kind tag that tells same-named nodes apart; None: label is unique)
EXPECTED_NODES: dict[str, tuple[str, str | None]] = {
    "loom/orders_enrichment": ("orders_enrichment", "loom"),
    "loom/order_ledger": ("order_ledger", "loom"),
    "kafka/orders": ("orders", "kafka"),
    "kafka/orders.enriched": ("orders.enriched", "kafka"),
    "kafka/orders.dlq": ("orders.dlq", "kafka"),
    "delta/orders_enriched": ("orders_enriched", "delta"),
    "clickhouse/analytics/orders_enriched": ("orders_enriched", "clickhouse"),
    "sql/warehouse/order_ledger": ("order_ledger", "sql"),
    "orders_by_band": ("orders_by_band", None),
    "revenue_by_customer": ("revenue_by_customer", None),
}

EXPECTED_EDGES = EXAMPLE_EDGES

# What the asset graph has rendered: nodes (label, kind tags, SVG bounds), edge paths, groups, zoom.
# Dagster draws the graph as one <svg>: groups and assets are <foreignObject>s, edges are <path>s, all in
# the same SVG coordinates. Below zoom 0.6 it draws "minimal" nodes (a possibly truncated name, no tags).
GRAPH = """(() => {
  const svg = document.querySelector('svg[class*="svgContainer"]');
  if (!svg) return null;
  const nodes = [];
  for (const fo of svg.querySelectorAll('foreignObject')) {
    const name = fo.querySelector('[class*="AssetNode_assetName"]');
    if (!name) continue;
    const tip = name.querySelector('[data-tooltip]');
    const num = (k) => parseFloat(fo.getAttribute(k));
    const r = fo.getBoundingClientRect();
    nodes.push({
      label: (tip ? tip.getAttribute('data-tooltip') : name.textContent).trim(),
      kinds: [...fo.querySelectorAll('[class*="OpTags_opTagsContainer"]')].map((e) => e.textContent.trim()),
      x: num('x'), y: num('y'), w: num('width'), h: num('height'),
      minimal: !!fo.querySelector('[class*="minimalAssetNode"]'),
      onscreen: r.width > 0 && r.left >= 0 && r.top >= 0 && r.right <= innerWidth && r.bottom <= innerHeight,
    });
  }
  const edges = [...svg.querySelectorAll('path')]
    .filter((p) => !p.closest('marker, defs'))
    .map((p) => p.getAttribute('d'));
  const groups = [...svg.querySelectorAll('foreignObject.group')].map((g) => g.textContent.trim());
  const area = svg.parentElement.parentElement.getBoundingClientRect();
  const width = parseFloat(svg.getAttribute('width'));
  return {
    nodes, edges, groups,
    layout: {w: width, h: parseFloat(svg.getAttribute('height'))},
    area: {w: area.width, h: area.height},
    window: {w: window.innerWidth, h: window.innerHeight},
    scale: svg.getBoundingClientRect().width / width,
    search: location.search,
  };
})()"""

GRAPH_SUMMARY = f"(() => {{ const g = {GRAPH}; return g && [g.nodes.length, g.edges.length, g.scale]; }})()"
TARGET_SCALE = 0.75  # full nodes (name, status rows, kind tags) need zoom >= 0.6


@pytest.fixture()
def dev_url(tmp_path: Path, kafka: KafkaBroker, clickhouse: Any) -> Iterator[str]:
    """``dagster dev`` on the example with a real broker and ClickHouse engine; the instance is the
    example's, minus the community pop-up. Jobs deployed during the test are stopped afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    instance = (ROOT / "definitions" / "dagster.yaml").read_text()
    (home / "dagster.yaml").write_text(instance + "\nnux:\n  enabled: false\n")
    create_topics(kafka.bootstrap_servers, TOPICS, partitions=3)
    create_clickhouse_table(clickhouse.url)
    env = {
        "LOOM_DATA_DIR": str(tmp_path / "data"),
        "LOOM_KAFKA_BOOTSTRAP": kafka.bootstrap_servers,
        "LOOM_CLICKHOUSE_URL": clickhouse.url,
    }
    started = time.monotonic()
    try:
        with dagster_dev(home, env=env, timeout_s=240) as url:
            print(f"dagster dev ready in {time.monotonic() - started:.1f}s")
            yield url
    finally:
        for deployment in DeploymentStore(home / "loom").all():
            for proc in deployment.job.processes:
                if procfs.is_alive(proc.pid, proc.start_ticks):
                    os.kill(proc.pid, signal.SIGKILL)


@pytest.fixture()
def browser() -> Iterator[Chromium]:
    with Chromium(window_size=(1600, 1000)) as chromium:
        # Belt and braces with ``nux: enabled: false``: the pop-up would cover the graph.
        chromium.add_init_script("try { localStorage.setItem('communityNux', '\"1\"') } catch (e) {}")
        yield chromium


def test_asset_graph_and_flow_page_in_chromium(
    dev_url: str, browser: Chromium, tmp_path: Path, kafka: KafkaBroker
) -> None:
    try:
        check_graph_and_flow_page(dev_url, browser, kafka.bootstrap_servers)
    except (AssertionError, TimeoutError, BrowserError):
        try:
            print(f"failure screenshot: {browser.screenshot(tmp_path / 'failure.png')}")
        except Exception as exc:  # the browser may be what failed: keep the original error
            print(f"no failure screenshot: {exc}")
        raise


def check_graph_and_flow_page(dev_url: str, browser: Chromium, bootstrap: str) -> None:
    timings: dict[str, float] = {}
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    graph = open_lineage(browser, dev_url)
    timings["lineage rendered"] = time.monotonic() - started
    nodes = identify_nodes(graph, browser)
    edges = rendered_edges(graph, nodes, browser)
    missing = EXPECTED_EDGES - edges
    extra = edges - EXPECTED_EDGES
    assert not missing and not extra, (
        f"rendered edges differ: missing {sorted(missing)}, unexpected {sorted(extra)}\n{browser.describe()}"
    )
    browser.screenshot(SCREENSHOTS / "asset-graph.png")

    # Deploy the flow (as the Materialize button does), so its page shows the deployment and checks.
    run_id = launch_materialization(dev_url, [["loom", "orders_enrichment"]])
    assert wait_run(dev_url, run_id) == "SUCCESS"
    produce(bootstrap, "orders", sample_orders(300), key=lambda o: o.customer_id)

    started = time.monotonic()
    browser.set_viewport(1600, 1000)
    browser.open(f"{dev_url}/assets/loom/orders_enrichment", timeout=PAGE_TIMEOUT)
    browser.wait_for(
        "document.body.innerText.includes('plan_hash') && document.body.innerText.includes('Kinds')"
        " && document.body.innerText.includes('loom/pid')",
        timeout=PAGE_TIMEOUT,
        what="the flow asset page with its deployment metadata and definition",
    )
    browser.wait_stable("document.body.innerText.length", quiet=2.0, timeout=30)
    text = browser.text()
    for needle in ("orders_enrichment", "plan_hash", "consumer_group", "topics", "import_path", "sinks"):
        assert needle in text, f"{needle!r} not on the flow asset page\n{browser.describe()}"
    definition = text[text.find("Kinds") :][:200]  # the Definition pane: Group, Owners, Kinds, Tags
    for kind in ("loom", "bytewax"):
        assert kind in definition, f"kind {kind!r} not under Kinds\n{browser.describe()}"
    for neighbour in (
        "kafka / orders",
        "delta / orders_enriched",
        "clickhouse / analytics / orders_enriched",
    ):
        assert neighbour in text, f"{neighbour!r} not in the page's lineage\n{browser.describe()}"
    for needle in ("loom/gate_s", "loom/log_path", "loom/host"):
        assert needle in text, f"deployment metadata {needle!r} missing\n{browser.describe()}"
    browser.screenshot(SCREENSHOTS / "flow-asset.png", full_page=True)
    timings["flow page rendered"] = time.monotonic() - started

    # The daemon's sensors report job_running (every 15 s) and kafka_lag (every 30 s) on the flow.
    started = time.monotonic()
    checks_url = f"{dev_url}/assets/loom/orders_enrichment?view=checks"
    ready = (
        "(() => { const t = document.body.innerText;"
        " return t.includes('job_running') && t.includes('kafka_lag') && (t.match(/Succeeded/g) || []).length >= 2; })()"
    )
    deadline = time.monotonic() + 150
    while True:
        browser.open(checks_url, timeout=PAGE_TIMEOUT)
        try:
            browser.wait_for(ready, timeout=20, what="job_running and kafka_lag evaluated by the sensors")
            break
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
    browser.wait_stable("document.body.innerText.length", quiet=2.0, timeout=30)
    browser.screenshot(SCREENSHOTS / "flow-checks.png")
    timings["checks evaluated by the daemon"] = time.monotonic() - started
    print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


def open_lineage(browser: Chromium, url: str) -> dict[str, Any]:
    """Open the global asset lineage, expand every group, zoom so all nodes render in full; return GRAPH."""
    browser.open(f"{url}/asset-groups", timeout=PAGE_TIMEOUT)
    browser.wait_for(
        "document.querySelectorAll('svg[class*=\"svgContainer\"] foreignObject').length > 0",
        timeout=PAGE_TIMEOUT,
        what="the asset graph to render",
    )
    # With several groups, the global graph starts with every group collapsed: Alt+E expands them all
    # (the same as "Expand all groups" in the graph's settings menu; it adds ?expanded=... to the URL).
    count = f"({GRAPH}).nodes.length >= {len(EXPECTED_NODES)}"
    for _attempt in range(3):
        if browser.evaluate(count):
            break
        if "expanded=" not in str(browser.evaluate("location.search")):
            browser.press("e", "KeyE", 69, alt=True)
        try:
            browser.wait_for(count, timeout=20, what="all groups to expand")
        except TimeoutError:
            continue
    browser.wait_for(count, timeout=5, what=f"{len(EXPECTED_NODES)} asset nodes once groups are expanded")

    # Dagster fits the graph to the width of its pane; below zoom 0.6 nodes lose their kind tags.
    # Size the window so that the fitted zoom is TARGET_SCALE, and reload (the fit happens on load).
    graph = browser.evaluate(GRAPH)
    chrome_w = graph["window"]["w"] - graph["area"]["w"]
    chrome_h = graph["window"]["h"] - graph["area"]["h"]
    width = max(1600, math.ceil(chrome_w + TARGET_SCALE * graph["layout"]["w"] + 40))
    height = max(1000, math.ceil(chrome_h + TARGET_SCALE * graph["layout"]["h"] + 80))
    browser.set_viewport(width, height)
    browser.open(str(browser.evaluate("location.href")), timeout=PAGE_TIMEOUT)
    browser.wait_for(
        f"(() => {{ const g = {GRAPH}; return g && g.nodes.length >= {len(EXPECTED_NODES)}"
        " && g.nodes.every((n) => !n.minimal) && g.edges.length > 0; })()",
        timeout=PAGE_TIMEOUT,
        what="every asset node drawn in full, with edges",
    )
    browser.wait_stable(GRAPH_SUMMARY, quiet=2.0, timeout=30)
    graph = browser.evaluate(GRAPH)
    print(
        f"graph: {len(graph['nodes'])} nodes, {len(graph['edges'])} edges, groups {graph['groups']}, "
        f"zoom {graph['scale']:.2f}, window {width}x{height}"
    )
    return dict(graph)


def identify_nodes(graph: dict[str, Any], browser: Chromium) -> dict[str, dict[str, Any]]:
    """Map each expected asset key to its rendered node, by label and (for same-named nodes) kind tag."""
    found: dict[str, dict[str, Any]] = {}
    for node in graph["nodes"]:
        kinds = " ".join(node["kinds"]).lower()
        matches = [
            key
            for key, (label, kind) in EXPECTED_NODES.items()
            if node["label"] == label and (kind is None or kind in kinds)
        ]
        assert len(matches) <= 1, f"node {node} matches {matches}\n{browser.describe()}"
        if matches:
            assert matches[0] not in found, f"{matches[0]} rendered twice\n{browser.describe()}"
            found[matches[0]] = node
    rendered = [(n["label"], n["kinds"]) for n in graph["nodes"]]
    missing = sorted(set(EXPECTED_NODES) - set(found))
    assert not missing, (
        f"asset nodes not in the rendered graph: {missing}\nrendered (label, kinds): {rendered}\n"
        f"{browser.describe()}"
    )
    assert len(graph["nodes"]) == len(EXPECTED_NODES), f"unexpected nodes: {rendered}\n{browser.describe()}"
    offscreen = sorted(key for key, node in found.items() if not node["onscreen"])
    assert not offscreen, f"asset nodes outside the window: {offscreen}\n{browser.describe()}"
    return found


def rendered_edges(
    graph: dict[str, Any], nodes: dict[str, dict[str, Any]], browser: Chromium
) -> set[tuple[str, str]]:
    """(upstream key, downstream key) for each drawn edge: the nodes its path starts and ends on."""
    edges: set[tuple[str, str]] = set()
    for d in graph["edges"]:
        numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", d or "")]
        assert len(numbers) >= 4, f"odd edge path {d!r}\n{browser.describe()}"
        start = _nearest(nodes, numbers[0], numbers[1])
        end = _nearest(nodes, numbers[-2], numbers[-1])
        assert start and end, f"edge {d!r} does not join two asset nodes\n{browser.describe()}"
        edges.add((start, end))
    return edges


def _nearest(nodes: dict[str, dict[str, Any]], x: float, y: float, tolerance: float = 25.0) -> str | None:
    """The node whose box is nearest to (x, y), if within *tolerance* SVG units."""

    def distance(node: dict[str, Any]) -> float:
        dx = max(node["x"] - x, 0.0, x - (node["x"] + node["w"]))
        dy = max(node["y"] - y, 0.0, y - (node["y"] + node["h"]))
        return math.hypot(dx, dy)

    key = min(nodes, key=lambda k: distance(nodes[k]))
    return key if distance(nodes[key]) <= tolerance else None
