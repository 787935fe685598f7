"""Definitions load bench: ``build_loom_defs`` for 200 and 1,000 generated flows next to a plain Dagster
code location with the same asset keys and edges, each load in a fresh interpreter.

    .venv/bin/python bench/load_defs.py [--counts 200,1000] [--repeat 3] [--dir DIR] [--layout shared]
    .venv/bin/python bench/load_defs.py --variants plain,state,state-cold,compile   # + the old full compile
    .venv/bin/python bench/load_defs.py --profile 200          # cProfile of one 200-flow load (fresh state)
    .venv/bin/python bench/load_defs.py --smoke                # 2 flows, every variant once; no figures

Variants (every one in its own subprocess, so imports are counted fairly; medians over --repeat):

- ``plain``: ``dg.AssetSpec``s with the same keys and deps, and one plain ``multi_asset`` per flow (with
  a pool and the resource), one job and the resource: the location written by hand, without checks,
  metadata or sensors.
- ``state``: ``build_loom_defs`` with a fresh defs state (``loom_dagster.core.flows.defs_state``): what every code
  server reload and run worker pays. No flow is imported and nothing is compiled. One deploy op for
  every flow, the 3 sensors and the 6 checks a flow declares (``deploy_checks``, ``job_running``,
  ``kafka_lag``, a ``freshness`` per table), the metadata, the undeploy and reset-offsets jobs.
- ``state-cold``: the first load, with an empty state directory: it imports and compiles every flow and
  writes the state (the automatic refresh). Each repetition starts empty; the last one's state is the
  one ``state`` then loads.
- ``compile``: no state (``LOOM_DAGSTER_DEFS_STATE=off``): every load compiles every flow (the
  behaviour before the defs state). Not run by default (slow at 1,000 flows).

The compile cache is off everywhere. ``loom_dagster`` is byte-compiled before the first child, as
``pip install`` does for an installed package: a checkout installed editable under
``PYTHONDONTWRITEBYTECODE`` (set on this machine) would otherwise compile its source in every child.

Columns: ``wall`` = the whole child process, ``cpu`` = its CPU time (user + system; steadier than wall
on a busy machine), ``ready`` = from its start until its figures are taken (loaded and validated),
``exit`` = the rest: Python's teardown (a garbage-collection pass over every object, which a code server
does not pay when it loads), ``load`` = imports + build + validate, ``imports`` = dagster +
loom_dagster, ``build`` = ``build_loom_defs``, ``validate`` =
``Definitions.validate_loadable``, ``compile`` / ``config`` = time in loom-dagster's ``compile_plan``
(loom's ``compile_flow``) / loom's config loads inside build, with their call counts, ``flows imp.`` =
generated flow modules imported, ``rss`` = peak resident memory. The ratios are to ``plain`` at the same
size. No thresholds are asserted.
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
SPAWNED_AT = "LOAD_BENCH_SPAWNED_AT"
"""Environment variable: when the parent started the child (``time.time()``), for its ``ready`` time."""
ROOT = Path(__file__).resolve().parents[1]
_TEMP_DIRS: list[str] = []


@atexit.register
def _remove_temp_dirs() -> None:
    for path in _TEMP_DIRS:
        shutil.rmtree(path, ignore_errors=True)


VARIANTS = ("plain", "state-cold", "state", "compile")
DEFAULT_VARIANTS = ("plain", "state-cold", "state")


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
        import loom_dagster.core.flows.catalog as catalog
        import loom_dagster.core.flows.loading as loading
        from loom_dagster.definitions import build_loom_defs

        t2 = time.perf_counter()
        compile_timer = _Timer(catalog, "compile_plan")  # loom's compile_flow, without importing loom
        config_timer = _Timer(loading, "_load_application_config")
        from bench.generated_flows import default_package, load_specs

        specs = load_specs(directory, count)
        build_started = time.perf_counter()  # generating the specs is not load work
        defs = build_loom_defs(specs)
        package = default_package(directory)
        out.update(
            compile_s=compile_timer.seconds,
            compiles=compile_timer.calls,
            config_s=config_timer.seconds,
            config_loads=config_timer.calls,
            flow_imports=sum(1 for m in sys.modules if m.startswith(package + ".")),
            loom_imported="loom.streaming" in sys.modules,
        )
    t3 = time.perf_counter()
    dg.Definitions.validate_loadable(defs)
    t4 = time.perf_counter()
    graph = defs.resolve_asset_graph()
    keys = graph.get_all_asset_keys()
    spawned_at = float(os.environ.get(SPAWNED_AT, "nan"))
    out.update(
        ready_s=time.time() - spawned_at,
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
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    env = {**env, SPAWNED_AT: repr(time.time())}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{variant} x{count} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    result["exit_s"] = wall - result["ready_s"]
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def compile_package(code_root: Path) -> None:
    """Byte-compile ``loom_dagster`` under *code_root* (what an install does), so no child pays for it."""
    import compileall

    compileall.compile_dir(str(code_root / "loom_dagster"), quiet=1)


def child_env(variant: str, state_dir: str) -> dict[str, str]:
    """Environment of a child: its defs state directory (``off`` for ``compile``), no compile cache,
    no LOOM_ENV, no telemetry."""
    env = {k: v for k, v in os.environ.items() if k != "LOOM_ENV"}
    env["DAGSTER_DISABLE_TELEMETRY"] = "1"
    env["LOOM_DAGSTER_COMPILE_CACHE"] = "off"
    env["LOOM_DAGSTER_DEFS_STATE"] = "off" if variant in ("plain", "compile") else state_dir
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
        f"{'flows':>5} {'variant':<10} {'wall':>6} {'cpu':>6} {'ready':>6} {'exit':>5} {'load':>6} "
        f"{'imports':>7} {'build':>6} {'valid.':>6} "
        f"{'compile':>12} {'config':>12} {'flows imp.':>10} {'rss MB':>6} {'assets':>6} {'edges':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        compiles = f"{r['compile_s']:.2f} ({r.get('compiles', 0)})"
        configs = f"{r['config_s']:.2f} ({r.get('config_loads', 0)})"
        print(
            f"{r['count']:>5} {r['variant']:<10} {r['wall_s']:6.2f} {r['cpu_s']:6.2f} {r['ready_s']:6.2f} "
            f"{r['exit_s']:5.2f} {r['load_s']:6.2f} {r['imports_s']:7.2f} "
            f"{r['build_s']:6.2f} {r['validate_s']:6.2f} {compiles:>12} {configs:>12} "
            f"{r.get('flow_imports', 0):>10} {r['rss_mb']:6.0f} {r['assets']:>6} {r['edges']:>5}"
        )


def print_ratios(rows: list[dict[str, Any]]) -> None:
    """Each loom variant against the plain location of the same size (wall, cpu, ready, load), and what the
    automatic refresh of a cold first load costs over a load with a fresh state."""
    by = {(r["count"], r["variant"]): r for r in rows}
    print("\nratio to plain AssetSpecs (wall / cpu / ready / load):")
    for count in sorted({r["count"] for r in rows}):
        plain = by.get((count, "plain"))
        for variant in VARIANTS[1:]:
            r = by.get((count, variant))
            if plain is None or r is None:
                continue
            print(
                f"  {count:>5} flows  {variant:<10} {r['wall_s']:6.2f} s vs {plain['wall_s']:5.2f} s: "
                f"{r['wall_s'] / plain['wall_s']:5.2f}x wall, {r['cpu_s'] / plain['cpu_s']:5.2f}x cpu, "
                f"{r['ready_s'] / plain['ready_s']:5.2f}x ready, {r['load_s'] / plain['load_s']:5.2f}x load"
            )
        cold, warm = by.get((count, "state-cold")), by.get((count, "state"))
        if cold is not None and warm is not None:
            extra = cold["wall_s"] - warm["wall_s"]
            print(
                f"  {count:>5} flows  automatic refresh (cold first load - fresh-state load): {extra:6.2f} s "
                f"({extra / count * 1000:.1f} ms/flow)"
            )


def profile(count: int, directory: Path, state: str) -> None:
    """cProfile one load in this process (dagster imported first, so imports stay out of the profile);
    with a state directory, a first unprofiled load fills it."""
    import cProfile
    import pstats

    os.environ["LOOM_DAGSTER_COMPILE_CACHE"] = "off"
    os.environ["LOOM_DAGSTER_DEFS_STATE"] = state
    import dagster as dg

    from bench.generated_flows import load_specs
    from loom_dagster.definitions import build_loom_defs

    specs = load_specs(directory, count)
    if state != "off":
        build_loom_defs(specs)
    profiler = cProfile.Profile()
    profiler.enable()
    defs = build_loom_defs(specs)
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
    parser.add_argument("--counts", default="200,1000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
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
    parser.add_argument(
        "--profile-state",
        default=None,
        help="defs state directory for --profile, or off (default: a temp dir)",
    )
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
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    work = Path(args.dir or _temp_dir("loom-load-bench-")).resolve()
    from bench.generated_flows import write_flows

    manifest = work / "manifest.json"
    wanted = max(counts + [args.profile])
    current = json.loads(manifest.read_text()) if manifest.exists() else {}
    if current.get("count", 0) < wanted or current.get("layout", "per-flow") != args.layout:
        write_flows(work, wanted, layout=args.layout, add_to_path=False)
    if args.profile:
        sys.path.insert(0, str(work))
        profile(args.profile, work, args.profile_state or _temp_dir("loom-defs-state-profile-"))
        return

    compile_package(Path(args.code_root) if args.code_root else ROOT)
    print(
        f"generated flows ({args.layout} config) in {work}; python {sys.version.split()[0]}; "
        f"{os.cpu_count()} cpus; repeat {args.repeat}"
    )
    # Repetitions are interleaved (plain, cold, fresh, plain, cold, fresh...), so a drift of the machine
    # (frequency, another process) lands on every variant alike. The fresh-state load reads a state
    # filled by one unmeasured cold load; each measured cold load starts from an empty directory.
    ordered = [v for v in VARIANTS if v in variants]
    rows = []
    for count in counts:
        filled = ""
        if "state" in ordered:
            filled = _temp_dir("loom-defs-state-")
            spawn("state-cold", count, work, child_env("state-cold", filled), args.code_root)
        runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in ordered}
        for _ in range(args.repeat):
            for variant in ordered:
                state_dir = _temp_dir("loom-defs-state-") if variant == "state-cold" else filled
                env = child_env(variant, state_dir)
                runs[variant].append(spawn(variant, count, work, env, args.code_root))
        rows += [median_row(runs[variant]) for variant in ordered]
        print(f"  done: {count} flows", file=sys.stderr)
    print_table(rows)
    print_ratios(rows)


if __name__ == "__main__":
    main()
