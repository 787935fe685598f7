"""Sink health bench: one sensor tick over 200 Delta tables, and the Delta health read of a table with
10 commits next to one with 10,000 commits (built with small appends, cached between runs): the log reader
over local files, the same reader over delta-rs' object store (the path of s3:// / gs:// / az:// tables,
timed on a file:// URI), and deltalake's own table load for comparison.

    .venv/bin/python bench/sink_health.py [--tables 200] [--commits 10000] [--cache-dir DIR]
    .venv/bin/python bench/sink_health.py --smoke    # 3 tables, 10 vs 20 commits in a temp dir, one repeat

Prints figures measured side by side in this one run (no thresholds asserted here). The deltalake
comparison runs in a child process: deltalake + pyarrow may abort the interpreter at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dagster as dg  # noqa: E402
import pyarrow as pa  # noqa: E402
from deltalake import write_deltalake  # noqa: E402

from loom_dagster.asset_graph import LoomAssetGraph, build_asset_graph  # noqa: E402
from loom_dagster.core.flows.catalog import compile_spec  # noqa: E402
from loom_dagster.core.flows.records import SinkBackend  # noqa: E402
from loom_dagster.core.flows.spec import LoomFlowSpec  # noqa: E402
from loom_dagster.core.sensor_settings import SinkHealthSettings  # noqa: E402
from loom_dagster.core.sinks.delta_log import latest_delta_version  # noqa: E402
from loom_dagster.core.sinks.read import read_sink  # noqa: E402
from loom_dagster.core.sinks.reading import SinkReading  # noqa: E402
from loom_dagster.core.sinks.targets import SinkTarget  # noqa: E402
from loom_dagster.sensors.sinks import build_sink_health_sensor  # noqa: E402
from loom_dagster.translator import LoomTranslator  # noqa: E402

SHAPES = "tests.flows.shapes:make_flow"
CONFIG = """
kafka:
  consumer: {{brokers: ["127.0.0.1:9"], group_id: bench-{i}, topics: [bench.events], delivery: at_least_once}}
  producer: {{brokers: ["127.0.0.1:9"]}}
  producers:
    events_dlq: {{brokers: ["127.0.0.1:9"], topic: bench.events.dlq}}
streaming:
  sinks:
    events_delta: {{uri: "{uri}", table: events_{i:03d}}}
"""


def append(uri: Path, start: int, rows: int = 1) -> None:
    """One small append: one commit."""
    values = list(range(start, start + rows))
    table = pa.table(
        {"event_id": [f"e{v}" for v in values], "value": values, "doubled": [2 * v for v in values]}
    )
    write_deltalake(str(uri), table, mode="append")


def ensure_table(uri: Path, commits: int) -> float:
    """A table with exactly *commits* commits (resumes a partial cache); returns the build seconds."""
    log = uri / "_delta_log"
    done = (latest_delta_version(log) or -1) + 1 if log.is_dir() else 0
    if done > commits:
        raise SystemExit(f"{uri} has {done} commits, more than {commits}: delete it")
    started = time.perf_counter()
    for version in range(done, commits):
        append(uri, version)
        if version and version % 1000 == 0:
            print(f"  building {uri.name}: {version}/{commits} commits", flush=True)
    return time.perf_counter() - started


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median and best wall time of *fn*, in milliseconds."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), min(samples)


def delta_target(uri: Path, name: str) -> SinkTarget:
    return SinkTarget(
        f"delta/{name}",
        SinkBackend.DELTA,
        name,
        None,
        str(uri),
        ("bench",),
        ("loom/bench",),
        connect_url=str(uri),
    )


def build_graph(root: Path, tables: int) -> LoomAssetGraph:
    """*tables* one-sink flows (``shapes`` with only its Delta sink), each with its own table."""
    os.environ["LOOM_TEST_SINKS"] = "delta"
    compiled = []
    for i in range(tables):
        uri = root / "lake" / f"events_{i:03d}"
        cfg = root / "config" / f"f{i:03d}"
        cfg.mkdir(parents=True, exist_ok=True)
        (cfg / "base.yaml").write_text(textwrap.dedent(CONFIG.format(i=i, uri=uri)).lstrip())
        os.environ["LOOM_TEST_FLOW_NAME"] = f"events_{i:03d}"
        compiled.append(compile_spec(LoomFlowSpec(SHAPES, config=cfg, environment="test")))
    return build_asset_graph(compiled, LoomTranslator())


def bench_tick(tables: int) -> None:
    """Wall time of sensor ticks over *tables* Delta tables: first (all new), idle, all changed."""
    with tempfile.TemporaryDirectory(prefix="sink-health-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        graph = build_graph(root, tables)
        compile_s = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(tables):
            for c in range(3):
                append(root / "lake" / f"events_{i:03d}", 10 * c)
        write_s = time.perf_counter() - started
        print(
            f"setup: {tables} flows compiled in {compile_s:.1f}s, {3 * tables} Delta appends in {write_s:.1f}s"
        )
        sensor = build_sink_health_sensor(graph, SinkHealthSettings())
        defs = dg.Definitions(
            assets=[*(n.spec for n in graph.flows), *graph.external_specs], sensors=[sensor]
        )
        with dg.instance_for_test() as instance:
            cursor: str | None = None

            def tick(label: str) -> None:
                nonlocal cursor
                context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
                started = time.perf_counter()
                result = sensor.evaluate_tick(context)
                elapsed = (time.perf_counter() - started) * 1000
                cursor = result.cursor
                store_ms: dict[str, float] = {"AssetMaterialization": 0.0, "AssetCheckEvaluation": 0.0}
                for event in result.asset_events:
                    stored = time.perf_counter()
                    instance.report_runless_asset_event(event)
                    store_ms[type(event).__name__] += (time.perf_counter() - stored) * 1000
                kinds = [type(e).__name__ for e in result.asset_events]
                print(
                    f"tick {label:<26} {elapsed:7.1f} ms | {kinds.count('AssetMaterialization'):3d} materializations, "
                    f"{kinds.count('AssetCheckEvaluation'):3d} check evaluations | storing them in the sqlite test "
                    f"instance: {store_ms['AssetMaterialization']:.0f} + {store_ms['AssetCheckEvaluation']:.0f} ms "
                    f"| cursor {len(cursor or '') / 1024:.0f} KiB"
                )

            tick("first (cold, all new)")
            tick("idle (nothing changed)")
            tick("idle again")
            for i in range(tables):
                append(root / "lake" / f"events_{i:03d}", 1000)
            tick("after 1 commit per table")
            tick("idle")


def bench_read(cache: Path, commits: int, repeat: int = 200, child_repeat: int = 20) -> None:
    """The Delta health read on 10 vs *commits* commits: cold (no previous reading) and steady."""
    small, big = cache / "commits_10", cache / f"commits_{commits}"
    for uri, n in ((small, 10), (big, commits)):
        built = ensure_table(uri, n)
        if built > 0.5:
            print(f"built {uri} ({n} commits) in {built:.0f}s")
    print(
        f"\nDelta health read (log reader over local files), median / best of {repeat}, {small.name} vs {big.name}:"
    )
    rows = []
    for uri in (small, big):
        target = delta_target(uri, uri.name)
        first = read_sink(target)
        if not first.ok or first.version is None:
            raise RuntimeError(f"health read of {uri} failed: {first}")
        behind = SinkReading(
            target.asset_key, target.backend, first.status, 0.0, marker="0", version=first.version - 1
        )
        rows.append(
            (
                uri.name,
                first.version,
                timed(partial(read_sink, target), repeat),
                timed(partial(read_sink, target, first), repeat),
                timed(partial(read_sink, target, behind), repeat),
            )
        )
    header = (
        f"  {'table':<16}{'version':>8}  {'cold read':>18}  {'idle (same version)':>22}  {'1 new commit':>18}"
    )
    print(header)
    for name, version, cold, idle, one in rows:
        print(
            f"  {name:<16}{version:>8}  {cold[0]:8.3f} / {cold[1]:6.3f} ms  "
            f"{idle[0]:10.3f} / {idle[1]:6.3f} ms  {one[0]:8.3f} / {one[1]:6.3f} ms"
        )
    ratio = rows[1][2][0] / rows[0][2][0]
    print(f"  cold read ratio {big.name} / {small.name}: {ratio:.2f}x (median)")
    bench_deltalake(small, big, child_repeat)


DELTALAKE_CHILD = """
import json, sys, time, statistics
from pathlib import Path
from deltalake import DeltaTable
from loom_dagster.core.flows.records import SinkBackend
from loom_dagster.core.sinks.delta_log import ObjectStoreDeltaLog
from loom_dagster.core.sinks.read_delta import read_delta
from loom_dagster.core.sinks.targets import SinkTarget

def timed(fn, repeat):
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return [statistics.median(samples), min(samples)]

def deltalake_load(uri):
    table = DeltaTable(uri)
    table.version(); table.history(limit=1)

out = {}
repeat = int(sys.argv[1])
for uri in sys.argv[2:]:
    url = Path(uri).as_uri()
    target = SinkTarget("delta/t", SinkBackend.DELTA, "t", None, url, ("b",), ("loom/b",), connect_url=url)
    store = lambda: ObjectStoreDeltaLog(url)
    first = read_delta(target, None, now=0.0, log=store())
    out[uri] = {
        "store_cold": timed(lambda: read_delta(target, None, now=0.0, log=store()), repeat),
        "store_idle": timed(lambda: read_delta(target, first, now=0.0, log=store()), repeat),
        "deltalake": timed(lambda: deltalake_load(uri), repeat),
        "version": first.version,
    }
print(json.dumps(out), flush=True)
"""


def bench_deltalake(small: Path, big: Path, repeat: int = 20) -> None:
    """In a child process: the log reader through delta-rs' object store (``ObjectStoreDeltaLog`` on a
    file:// URI, a new store per read as the sensor does), and deltalake's ``DeltaTable(uri)`` +
    ``version()`` + ``history(limit=1)``."""
    proc = subprocess.run(
        [sys.executable, "-c", DELTALAKE_CHILD, str(repeat), str(small), str(big)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"object store comparison failed (rc {proc.returncode}): {proc.stderr[-300:]}")
    figures = json.loads(line)
    print(
        f"\nSame reader over delta-rs' object store (file:// URI), and deltalake's table load, median / best of {repeat}:"
    )
    print(
        f"  {'table':<16}{'version':>8}  {'store cold read':>18}  {'store idle':>18}  {'deltalake load':>18}"
    )
    for uri, f in figures.items():
        cells = "  ".join(
            f"{f[k][0]:8.3f} / {f[k][1]:6.3f} ms" for k in ("store_cold", "store_idle", "deltalake")
        )
        print(f"  {Path(uri).name:<16}{f['version']:>8}  {cells}")
    for uri, f in figures.items():
        print(
            f"  x 200 tables, one after the other ({Path(uri).name}): store idle {200 * f['store_idle'][0]:.0f} ms, "
            f"deltalake load {200 * f['deltalake'][0]:.0f} ms"
        )
    print(f"  (child process exit code {proc.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", type=int, default=200)
    parser.add_argument("--commits", type=int, default=10_000)
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "loom-sink-health-bench"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the bench still runs")
    args = parser.parse_args()
    repeat, child_repeat = (1, 1) if args.smoke else (200, 20)
    with tempfile.TemporaryDirectory(prefix="sink-health-smoke-") as smoke_dir:
        if args.smoke:
            args.tables, args.commits, args.cache_dir = 3, 20, Path(smoke_dir)
        print(f"== one sink health tick over {args.tables} Delta tables ==")
        bench_tick(args.tables)
        print(f"\n== Delta health read: 10 vs {args.commits} commits (cache: {args.cache_dir}) ==")
        bench_read(args.cache_dir, args.commits, repeat, child_repeat)


if __name__ == "__main__":
    main()
