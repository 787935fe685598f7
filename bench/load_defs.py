"""Definitions load bench: ``build_loom_defs`` for 1, 50 and 200 generated flows next to a plain Dagster
code location with the same asset keys and edges, each load in a fresh interpreter.

    .venv/bin/python bench/load_defs.py [--counts 1,50,200] [--repeat 3] [--dir DIR] [--layout shared]
    .venv/bin/python bench/load_defs.py --profile 200          # cProfile of one 200-flow load
    .venv/bin/python bench/load_defs.py --smoke                # 2 flows, every variant once; no figures

Variants (every one in its own subprocess, so imports are counted fairly; medians over --repeat):

- ``plain``: ``dg.AssetSpec``s with the same keys and deps, and one plain ``multi_asset`` per flow.
- ``loom``: ``build_loom_defs`` with the compile cache off (``LOOM_DAGSTER_COMPILE_CACHE=off``).
- ``loom+cache-cold``: the compile cache on but empty (this load fills it): the cache's own overhead.
- ``loom+cache``: the same with a warm compile cache (a previous load filled it).
- ``loom+cache-lazy``: warm cache, and the Kafka lag and sink health sensors off: the two builders that
  need every compiled plan at load (the plans carry credentials, so they are never cached). It shows
  what a load costs when nothing forces a compile.

Columns: ``imports`` = dagster + loom_dagster + loom.streaming, ``build`` = ``build_loom_defs`` (flow
imports, config loads, compiles, records, specs, sensors), ``validate`` = ``Definitions.validate_loadable``,
``compile`` / ``config`` = the sum of loom's own ``compile_flow`` / ``load_application_config`` time inside
build, ``rss`` = peak resident memory of the process. No thresholds are asserted.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
_TEMP_DIRS: list[str] = []


@atexit.register
def _remove_temp_dirs() -> None:
    for path in _TEMP_DIRS:
        shutil.rmtree(path, ignore_errors=True)


VARIANTS = ("plain", "loom", "loom+cache-cold", "loom+cache", "loom+cache-lazy")


# --------------------------------------------------------------------------------------------------
# Child: one load, in this fresh interpreter
# --------------------------------------------------------------------------------------------------


class _Timer:
    """Sums the time spent in a wrapped module function."""

    def __init__(self, module: Any, name: str) -> None:
        self.seconds = 0.0
        self.calls = 0
        original = getattr(module, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        setattr(module, name, timed)


def plain_defs(count: int) -> Any:
    """A plain code location: external specs with the generated flows' keys and deps, a multi_asset
    per flow, one job and one resource, as someone would write it by hand without loom-dagster."""
    import dagster as dg

    from bench.generated_flows import plain_graph

    graph = plain_graph(count)

    class DeployResource(dg.ConfigurableResource):  # type: ignore[type-arg]
        mode: str = "deploy"

    def flow_asset(key: str) -> dg.AssetsDefinition:
        name = key.split("/", 1)[1]
        spec = dg.AssetSpec(
            dg.AssetKey.from_user_string(key),
            deps=[dg.AssetKey.from_user_string(d) for d in graph.deps[key]],
            group_name="loom",
            kinds={"loom", "bytewax"},
            description=f"Flow {name}.",
        )

        @dg.multi_asset(
            specs=[spec], name=f"deploy_{name}", pool=f"loom_deploy_{name}", required_resource_keys={"loom"}
        )
        def _deploy(context):  # type: ignore[no-untyped-def]  # local types: no string annotations
            return dg.MaterializeResult(asset_key=spec.key)

        return _deploy

    externals = [
        dg.AssetSpec(
            dg.AssetKey.from_user_string(key),
            deps=[dg.AssetKey.from_user_string(d) for d in graph.deps[key]],
            group_name="kafka" if key.startswith("kafka/") else "loom",
            kinds={key.split("/", 1)[0]},
        )
        for key in graph.external_keys
    ]

    @dg.op(required_resource_keys={"loom"})
    def _noop(context):  # type: ignore[no-untyped-def]
        return None

    @dg.job(name="loom_undeploy")
    def _job():  # type: ignore[no-untyped-def]
        _noop()

    return dg.Definitions(
        assets=[*(flow_asset(k) for k in graph.flow_keys), *externals],
        jobs=[_job],
        resources={"loom": DeployResource()},
    )


def run_child(variant: str, count: int, directory: Path) -> dict[str, Any]:
    """Load the code location once; return the phase timings and counts."""
    import resource

    t0 = time.perf_counter()
    import dagster as dg

    out: dict[str, Any] = {"variant": variant, "count": count, "compile_s": 0.0, "config_s": 0.0}
    if variant == "plain":
        t2 = build_started = time.perf_counter()
        defs = plain_defs(count)
    else:
        import loom.core.config.overrides as overrides
        import loom.streaming.compiler as compiler

        from loom_dagster.definitions_builder import build_loom_defs
        from loom_dagster.sensors.settings import KafkaLagSettings, LoomSensorSettings, SinkHealthSettings

        t2 = time.perf_counter()
        compile_timer = _Timer(compiler, "compile_flow")
        config_timer = _Timer(overrides, "load_application_config")
        from bench.generated_flows import load_specs

        specs = load_specs(directory, count)
        sensors = None
        if variant.endswith("-lazy"):
            sensors = LoomSensorSettings(
                kafka_lag=KafkaLagSettings(enabled=False), sink_health=SinkHealthSettings(enabled=False)
            )
        build_started = time.perf_counter()  # generating the specs is not load work
        defs = build_loom_defs(specs, sensors=sensors)
        out.update(
            compile_s=compile_timer.seconds,
            compiles=compile_timer.calls,
            config_s=config_timer.seconds,
            config_loads=config_timer.calls,
        )
    t3 = time.perf_counter()
    dg.Definitions.validate_loadable(defs)
    t4 = time.perf_counter()
    graph = defs.resolve_asset_graph()
    keys = graph.get_all_asset_keys()
    out.update(
        startup_s=t0 - STARTED,
        imports_s=t2 - t0,
        build_s=t3 - build_started,
        validate_s=t4 - t3,
        load_s=t4 - t0 - (build_started - t2),
        rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        assets=len(keys),
        edges=sum(len(graph.get(k).parent_keys) for k in keys),
    )
    return out


# --------------------------------------------------------------------------------------------------
# Parent: generate, spawn, tabulate
# --------------------------------------------------------------------------------------------------


def spawn(
    variant: str, count: int, directory: Path, env: dict[str, str], code_root: str | None
) -> dict[str, Any]:
    """Run one child load; return its figures plus the wall time of the whole process."""
    argv = [
        sys.executable,
        str(Path(__file__)),
        "--child",
        variant,
        "--count",
        str(count),
        "--dir",
        str(directory),
    ]
    if code_root:
        argv += ["--code-root", code_root]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{variant} x{count} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def child_env(variant: str, cache_dir: Path) -> dict[str, str]:
    """Environment of a child: the compile cache per variant (a new empty one for ``-cold``), no
    LOOM_ENV, no telemetry."""
    env = {k: v for k, v in os.environ.items() if k != "LOOM_ENV"}
    env["DAGSTER_DISABLE_TELEMETRY"] = "1"
    if variant in ("plain", "loom"):
        env["LOOM_DAGSTER_COMPILE_CACHE"] = "off"
    elif variant.endswith("-cold"):
        env["LOOM_DAGSTER_COMPILE_CACHE"] = _temp_dir("loom-compile-cache-cold-")
    else:
        env["LOOM_DAGSTER_COMPILE_CACHE"] = str(cache_dir)
    return env


def _temp_dir(prefix: str) -> str:
    """A temporary directory removed when the bench exits."""
    path = tempfile.mkdtemp(prefix=prefix)
    _TEMP_DIRS.append(path)
    return path


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-field median over repeated runs (counts from the first run)."""
    row = dict(runs[0])
    for field in runs[0]:
        if field.endswith(("_s", "_mb")):
            row[field] = statistics.median(r[field] for r in runs)
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    """The figures, one row per (flows, variant)."""
    header = (
        f"{'flows':>5} {'variant':<16} {'wall':>6} {'imports':>7} {'build':>6} {'valid.':>6} "
        f"{'compile':>7} {'config':>6} {'rss MB':>6} {'assets':>6} {'edges':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['count']:>5} {r['variant']:<16} {r['wall_s']:6.2f} {r['imports_s']:7.2f} {r['build_s']:6.2f} "
            f"{r['validate_s']:6.2f} {r['compile_s']:7.2f} {r['config_s']:6.2f} {r['rss_mb']:6.0f} "
            f"{r['assets']:>6} {r['edges']:>5}"
        )


def print_extra(rows: list[dict[str, Any]]) -> None:
    """loom-dagster's time per flow beyond loom's own work, against the plain location: the average at
    each size, and the marginal cost per added flow between the two largest sizes."""
    by = {(r["count"], r["variant"]): r for r in rows}

    def extra(count: int, variant: str) -> tuple[float, float] | None:
        plain, r = by.get((count, "plain")), by.get((count, variant))
        if plain is None or r is None:
            return None
        over = r["build_s"] + r["validate_s"] - plain["build_s"] - plain["validate_s"]
        return over - r["compile_s"], over - r["compile_s"] - r["config_s"]

    print(
        "\nloom-dagster's extra time per flow: build + validate, minus the plain location's, minus loom's "
        "compile_flow [and load_application_config]:"
    )
    counts = sorted({r["count"] for r in rows})
    for variant in VARIANTS[1:]:
        for count in counts:
            e = extra(count, variant)
            if e is not None:
                print(
                    f"  {variant:<16} {count:>4} flows: {e[0] / count * 1000:7.1f} ms/flow beyond compile_flow; "
                    f"{e[1] / count * 1000:6.1f} ms/flow beyond compile_flow + config load"
                )
        if len(counts) >= 2:
            small, large = counts[-2], counts[-1]
            a, b = extra(small, variant), extra(large, variant)
            if a is not None and b is not None:
                added = large - small
                print(
                    f"  {variant:<16} marginal {small}->{large}: {(b[0] - a[0]) / added * 1000:5.1f} ms/flow "
                    f"beyond compile_flow; {(b[1] - a[1]) / added * 1000:6.1f} ms/flow beyond compile_flow "
                    "+ config load"
                )


def profile(count: int, directory: Path, cache: str, lazy: bool) -> None:
    """cProfile one load in this process (loom imported first, so imports stay out of the profile)."""
    import cProfile
    import pstats

    os.environ["LOOM_DAGSTER_COMPILE_CACHE"] = cache
    import dagster as dg
    import loom.streaming  # noqa: F401

    from bench.generated_flows import load_specs
    from loom_dagster.definitions_builder import build_loom_defs
    from loom_dagster.sensors.settings import KafkaLagSettings, LoomSensorSettings, SinkHealthSettings

    specs = load_specs(directory, count)
    sensors = (
        LoomSensorSettings(
            kafka_lag=KafkaLagSettings(enabled=False), sink_health=SinkHealthSettings(enabled=False)
        )
        if lazy
        else None
    )
    profiler = cProfile.Profile()
    profiler.enable()
    defs = build_loom_defs(specs, sensors=sensors)
    dg.Definitions.validate_loadable(defs)
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(
        r"loom_dagster|compile_flow|load_application_config|dagster/_core", 45
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", default="1,50,200")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to generate flows (default: a temp dir)"
    )
    parser.add_argument(
        "--layout",
        choices=("per-flow", "shared"),
        default="per-flow",
        help="a config directory per flow (default), or one shared config with a section per flow "
        "(OmegaConf refuses a YAML file of more than 10,000 nodes: about 200 flows)",
    )
    parser.add_argument(
        "--code-root", default=None, help="import loom_dagster from here (e.g. an old checkout)"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile one N-flow load and exit"
    )
    parser.add_argument("--profile-cache", default="off", help="LOOM_DAGSTER_COMPILE_CACHE for --profile")
    parser.add_argument("--profile-lazy", action="store_true", help="--profile with plan-free sensors only")
    parser.add_argument("--smoke", action="store_true", help="2 flows, every variant once (checks it runs)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.counts, args.repeat, args.variants, args.profile = "2", 1, ",".join(VARIANTS), 0

    if args.code_root:
        sys.path.insert(0, args.code_root)
    if str(ROOT) not in sys.path:
        sys.path.insert(1 if args.code_root else 0, str(ROOT))

    if args.child:
        print(json.dumps(run_child(args.child, args.count, args.dir)))
        return

    counts = [int(c) for c in args.counts.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    work = Path(args.dir or _temp_dir("loom-load-bench-")).resolve()
    from bench.generated_flows import write_flows

    manifest = work / "manifest.json"
    wanted = max(counts + [args.profile])
    current = json.loads(manifest.read_text()) if manifest.exists() else {}
    if current.get("count", 0) < wanted or current.get("layout", "per-flow") != args.layout:
        write_flows(work, wanted, layout=args.layout, add_to_path=False)
    if args.profile:
        sys.path.insert(0, str(work))
        profile(args.profile, work, args.profile_cache, args.profile_lazy)
        return

    print(
        f"generated flows ({args.layout} config) in {work}; python {sys.version.split()[0]}; "
        f"{os.cpu_count()} cpus; repeat {args.repeat}"
    )
    rows = []
    for count in counts:
        cache_dir = Path(_temp_dir("loom-compile-cache-"))
        if any(v in ("loom+cache", "loom+cache-lazy") for v in variants):
            spawn("loom+cache", count, work, child_env("loom+cache", cache_dir), args.code_root)  # fills it
        for variant in variants:
            runs = [
                spawn(variant, count, work, child_env(variant, cache_dir), args.code_root)
                for _ in range(args.repeat)
            ]
            rows.append(median_row(runs))
            print(f"  done: {count} flows, {variant}", file=sys.stderr)
    print_table(rows)
    print_extra(rows)


if __name__ == "__main__":
    main()
