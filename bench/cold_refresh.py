"""Cold defs-state refresh bench: every generated flow imported, compiled and written to an empty state,
compiled in this process (``serial``: ``LOOM_DAGSTER_REFRESH_WORKERS=1``) next to a pool of worker
processes (``parallel``: ``loom_dagster.core.flows.refresh_pool``), each refresh in a fresh interpreter.

    .venv/bin/python bench/cold_refresh.py [--counts 200,1000] [--repeat 3] [--workers auto] [--dir DIR]
    .venv/bin/python bench/cold_refresh.py --counts 8,16,24,32,48,64 --force-pool   # the small-location threshold
    .venv/bin/python bench/cold_refresh.py --smoke       # 3 flows, both ways once, states compared; no figures

Columns (medians over ``--repeat``, serial and parallel runs interleaved so a drift of the machine lands
on both): ``refresh`` = ``DefsState.load`` of the specs with an empty state directory (what the automatic
refresh of a first load and ``loom-dagster refresh`` add to a load), ``wall`` = the whole child process,
``cpu`` = the CPU time of the child and its workers (user + system), ``workers`` = the pool's
processes (1: no pool), ``ms/flow`` = refresh / flows, ``ratio`` = serial / parallel refresh. ``--force-pool`` starts the pool at any size (``MIN_FLOWS_PER_WORKER`` = 1), to find
the size where it starts paying. Every run's state is checked equal to the serial one's (the records, the
files and variables they derive from; not the salt or the timestamps). The compile cache is off.

Figures (2 CPUs, Python 3.11, per-flow config layout; the machine was shared with other jobs, so a
second core was free only part of the time: ``cpu`` shows what the refresh itself cost)::

    flows | serial refresh   wall    cpu ms/flow | parallel refresh   wall    cpu ms/flow workers | ratio
      200 |         8.91 s   9.32   9.17    44.6 |           5.88 s   6.00   9.67    29.4       2 | 1.51x
     1000 |        43.26 s  44.07  43.17    43.3 |          27.15 s  27.29  43.17    27.1       2 | 1.59x

With another job holding one of the two cores throughout, the same runs were level (200: 0.80x,
1000: 1.09x): the pool cannot make CPUs that are not there. The small-location threshold
(``--counts 8,16,32,48,64,96 --force-pool``): two workers cost about 0.7 s of CPU more than the serial
refresh's own imports; with the second core free they won from about 32 flows (32: 1.90 s serial,
1.40 s pool), with it busy they lost up to about 96 (8: 1.05 s vs 1.91 s; 64: 3.05 s vs 4.04 s), hence
``refresh_pool.MIN_FLOWS_PER_WORKER = 32``: a pool from 64 flows, one worker per 32.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_TEMP_DIRS: list[str] = []


@atexit.register
def _remove_temp_dirs() -> None:
    for path in _TEMP_DIRS:
        shutil.rmtree(path, ignore_errors=True)


def _temp_dir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    _TEMP_DIRS.append(path)
    return path


# --------------------------------------------------------------------------------------------------
# Child: one cold refresh, in this fresh interpreter
# --------------------------------------------------------------------------------------------------


def run_child(directory: Path, count: int, state_dir: str, workers: int, force_pool: bool) -> dict[str, Any]:
    """Refresh *count* flows into the empty *state_dir*; return the figures."""
    import loom_dagster.core.flows.refresh_pool as refresh_pool
    from bench.generated_flows import load_specs
    from loom_dagster.core.flows.defs_state import DefsState

    if force_pool:
        refresh_pool.MIN_FLOWS_PER_WORKER = 1
    specs = load_specs(directory, count)
    state = DefsState(state_dir, workers=workers)
    pools: list[int] = []
    original = refresh_pool.refresh_in_pool

    def counted(tasks: Any, size: int, on_result: Any) -> Any:
        pools.append(size)
        return original(tasks, size, on_result)

    import loom_dagster.core.flows.defs_state as defs_state

    defs_state.refresh_in_pool = counted  # type: ignore[assignment]
    started = time.perf_counter()
    load = state.load(specs)
    refresh = time.perf_counter() - started
    assert load.count("refreshed") == count, load.summary()
    return {
        "count": count,
        "refresh_s": refresh,
        "workers": max(pools, default=1),
        "loom_in_parent": "loom.streaming" in sys.modules,
    }


# --------------------------------------------------------------------------------------------------
# Parent: generate, spawn, compare, tabulate
# --------------------------------------------------------------------------------------------------


def spawn(directory: Path, count: int, workers: int, force_pool: bool) -> tuple[dict[str, Any], str]:
    """One cold refresh in a child; its figures (plus the child's wall time) and its state directory."""
    state_dir = _temp_dir("loom-cold-refresh-")
    argv = [sys.executable, str(Path(__file__)), "--child", "--dir", str(directory), "--count", str(count)]
    argv += ["--state", state_dir, "--workers", str(workers)] + (["--force-pool"] if force_pool else [])
    env = {k: v for k, v in os.environ.items() if k != "LOOM_ENV"}
    env.update(DAGSTER_DISABLE_TELEMETRY="1", LOOM_DAGSTER_COMPILE_CACHE="off")
    env.pop("LOOM_DAGSTER_REFRESH_WORKERS", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child's and its workers' CPU time
    if done.returncode != 0:
        raise SystemExit(f"refresh of {count} flows with {workers} worker(s) failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    result["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result, state_dir


def state_records(state_dir: str) -> dict[str, Any]:
    """The entries of a state directory by key, without what differs between two refreshes of the same
    inputs (the salt of the variables' digest, the digest itself, the timings)."""
    import msgspec

    from loom_dagster.core.flows.defs_state import FlowState

    out = {}
    for path in sorted(Path(state_dir).glob("*.json")):
        entry = msgspec.json.decode(path.read_bytes(), type=FlowState)
        out[entry.key] = msgspec.structs.replace(
            entry, env_salt="", env_digest="", compile_seconds=0.0, refreshed_at=0.0
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", default="200,1000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", default="auto", help="the parallel runs' workers (default: the CPUs)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to generate flows (default: a temp dir)"
    )
    parser.add_argument("--force-pool", action="store_true", help="start the pool at any size")
    parser.add_argument("--smoke", action="store_true", help="3 flows, both ways once; no figures")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--state", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    if args.child:
        print(json.dumps(run_child(args.dir, args.count, args.state, int(args.workers), args.force_pool)))
        return

    from loom_dagster.core.flows.refresh_pool import available_cpus

    if args.smoke:
        args.counts, args.repeat, args.workers, args.force_pool = "3", 1, "2", True
    workers = available_cpus() if args.workers == "auto" else int(args.workers)
    counts = [int(c) for c in args.counts.split(",")]
    work = Path(args.dir or _temp_dir("loom-cold-refresh-flows-")).resolve()
    from bench.generated_flows import write_flows

    manifest = work / "manifest.json"
    current = json.loads(manifest.read_text()) if manifest.exists() else {}
    if current.get("count", 0) < max(counts) or current.get("layout", "per-flow") != "per-flow":
        write_flows(work, max(counts), add_to_path=False)
    import compileall

    compileall.compile_dir(str(ROOT / "loom_dagster"), quiet=1)  # as an install does
    if not args.smoke:
        print(
            f"generated flows in {work}; python {sys.version.split()[0]}; {available_cpus()} cpus; "
            f"parallel with up to {workers} workers{' (pool forced)' if args.force_pool else ''}; "
            f"repeat {args.repeat}"
        )
    rows = []
    for count in counts:
        runs: dict[str, list[dict[str, Any]]] = {"serial": [], "parallel": []}
        reference: dict[str, Any] | None = None
        for _ in range(args.repeat):
            for mode, size in (("serial", 1), ("parallel", workers)):
                result, state_dir = spawn(work, count, size, args.force_pool)
                records = state_records(state_dir)
                if len(records) != count:
                    raise SystemExit(f"{mode} refresh of {count} flows wrote {len(records)} entries")
                if reference is None:
                    reference = records
                elif records != reference:
                    raise SystemExit(
                        f"{mode} refresh of {count} flows wrote other records than the serial one"
                    )
                runs[mode].append(result)
                shutil.rmtree(state_dir, ignore_errors=True)
        rows.append({mode: _median(r) for mode, r in runs.items()})
        print(f"  done: {count} flows", file=sys.stderr)
    if args.smoke:
        (row,) = rows
        print(
            f"smoke ok: {counts[0]} flows, serial and parallel ({row['parallel']['workers']} workers) "
            "wrote the same records"
        )
        return
    _print(rows)


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    row = dict(runs[0])
    for field in ("refresh_s", "wall_s", "cpu_s"):
        row[field] = statistics.median(r[field] for r in runs)
    return row


def _print(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'flows':>5} | {'serial refresh':>14} {'wall':>6} {'cpu':>6} {'ms/flow':>7} | "
        f"{'parallel refresh':>16} {'wall':>6} {'cpu':>6} {'ms/flow':>7} {'workers':>7} | {'ratio':>5}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        serial, parallel = row["serial"], row["parallel"]
        count = serial["count"]
        print(
            f"{count:>5} | {serial['refresh_s']:12.2f} s {serial['wall_s']:6.2f} {serial['cpu_s']:6.2f} "
            f"{serial['refresh_s'] / count * 1000:7.1f} | {parallel['refresh_s']:14.2f} s "
            f"{parallel['wall_s']:6.2f} {parallel['cpu_s']:6.2f} {parallel['refresh_s'] / count * 1000:7.1f} "
            f"{parallel['workers']:>7} | {serial['refresh_s'] / parallel['refresh_s']:4.2f}x"
        )


if __name__ == "__main__":
    main()
