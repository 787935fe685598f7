"""Deploy bench: a materialization (compile, lineage check, preflight, launch, health gate) next to the
same flow run by hand with loom's StreamingRunner, and steady-state throughput into Delta of both.

The flow is run by hand twice: with the logging the job runtime applies (``configure_loom_logging``, the
call ``python -m loom_dagster.runtime`` makes), the baseline of the deployed/by-hand ratio, so that it
measures what loom-dagster adds; and with loom's default logging (structlog left unconfigured), to
show what the runtime's logging saves. ``--breakdown`` also runs loom's default logging with one
setting changed at a time (events below INFO / WARNING dropped; output to /dev/null), to show which
setting costs it.

    .venv/bin/python bench/deploy.py [--messages 60000] [--rounds 2] [--breakdown]
    .venv/bin/python bench/deploy.py --smoke      # 4,000 messages, one round, no warm-up; no figures

Prints figures measured side by side in this one run (no thresholds asserted here).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import dagster as dg
from _common import ROOT, wait_committed

from loom_dagster import DeploymentStore, LoomDeployResource, LoomFlowSpec, build_loom_defs
from loom_dagster.dev.kafka import KafkaBroker, create_topics
from loom_dagster.dev.produce import produce
from tests.conftest import ticks_config
from tests.flows.delta_only import Tick

PARTITIONS = 3
BUFFER = 500
WAIT_S = {"first": 120.0, "throughput": 600.0}  # commit waits; --smoke shortens them (and still cleans up)
SMOKE_MESSAGES = 4000  # enough for several buffer flushes between the 10% and the last-buffer marks
BARE = """
import logging, os, sys
mode = sys.argv[2]
if mode == "runtime":  # the job runtime's own call, made before it compiles the flow
    from loom_dagster.runtime.loom_logging import configure_loom_logging
    configure_loom_logging(sys.stderr)
elif mode != "default":  # loom's default logging (structlog unconfigured) with one setting changed
    import structlog
    if mode == "devnull":
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(open(os.devnull, "w")))
    else:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, mode.upper())))
from loom.streaming.bytewax import StreamingRunner
from loom_dagster.core.flows.loading import import_flow, load_config
flow = import_flow("tests.flows.delta_only:ticks_flow")
StreamingRunner.from_context(flow, config=load_config([sys.argv[1]], "test"), environment="test").run()
"""
# How the flow run by hand logs: the runtime's logging (the baseline), loom's default, and (--breakdown)
# loom's default with one setting changed. Labels are printed as they are.
BARE_LOGGING = {
    "runtime": "runtime's logging",
    "default": "loom's default logging",
}
BREAKDOWN = {
    "info": "default, structlog level INFO (DEBUG events dropped)",
    "warning": "default, structlog level WARNING (DEBUG and INFO dropped)",
    "devnull": "default, every event rendered, written to /dev/null",
}


def _setup(bootstrap: str, root: Path, name: str, messages: int) -> tuple[Path, str, str]:
    prefix = f"{name}{uuid.uuid4().hex[:6]}"
    create_topics(bootstrap, [f"{prefix}.ticks", f"{prefix}.ticks.out", f"{prefix}.ticks.dlq"], PARTITIONS)
    config = ticks_config(
        root / name / "config",
        brokers=bootstrap,
        prefix=prefix,
        delta_uri=str(root / name / "delta"),
        buffer_max_records=BUFFER,
        buffer_max_age_s=1.0,
    )
    if messages:
        produce(
            bootstrap,
            f"{prefix}.ticks",
            (Tick(id=f"i{i}", seq=i) for i in range(messages)),
            key=lambda t: t.id,
        )
    return config, f"{prefix}-ticks", f"{prefix}.ticks"


def _throughput(bootstrap: str, group: str, topic: str, messages: int, started: float) -> dict[str, float]:
    """Committed-offset rate between 10% and the last full buffer (loom flushes a table buffer only
    when more data arrives, so the final partial buffer of a finite input is never committed)."""
    wait = WAIT_S["throughput"]
    t10, c10 = wait_committed(bootstrap, group, topic, PARTITIONS, messages // 10, wait)
    t_end, c_end = wait_committed(bootstrap, group, topic, PARTITIONS, messages - BUFFER, wait)
    return {"msgs_per_s": (c_end - c10) / max(t_end - t10, 1e-9), "measured_msgs": c_end - c10}


def _lines(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        with path.open("rb") as file:
            total += sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))
    return total


def run_bare(bootstrap: str, root: Path, messages: int, logging_mode: str = "runtime") -> dict[str, float]:
    """The same flow started by hand with loom's runner (logging set up as *logging_mode* says):
    spawn -> first commit, throughput, and log lines per message."""
    config, group, topic = _setup(bootstrap, root, f"bare{logging_mode}", messages)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    log_path = root / f"bare-{logging_mode}.log"
    log = open(log_path, "ab")  # the launched job logs to a file too: same I/O on both sides
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE, str(config / "base.yaml"), logging_mode],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        first, _ = wait_committed(bootstrap, group, topic, PARTITIONS, 1, WAIT_S["first"])
        result = _throughput(bootstrap, group, topic, messages, started)
        result["start_to_first_commit_s"] = first - started
    finally:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    result["log_lines_per_msg"] = _lines([log_path]) / messages
    return result


def run_deployed(bootstrap: str, root: Path, messages: int) -> dict[str, float]:
    """The flow deployed by materializing its asset: deploy-to-healthy and the launched job's throughput."""
    config, group, topic = _setup(bootstrap, root, "deployed", messages)
    state = root / "deployed" / "state"
    defs = build_loom_defs(
        [LoomFlowSpec("tests.flows.delta_only:ticks_flow", config=config, environment="test")]
    )
    resource = LoomDeployResource(state_dir=str(state))
    try:
        with dg.instance_for_test() as instance:
            started = time.monotonic()
            result = dg.materialize(
                list(defs.assets or []),
                selection=[dg.AssetKey(["loom", "ticks"])],
                resources={"loom": resource},
                instance=instance,
            )
            healthy = time.monotonic()
        if not result.success:
            raise RuntimeError("the materialization of loom/ticks failed")
        (mat,) = result.asset_materializations_for_node("loom_deploy")
        if DeploymentStore(state).current("ticks") is None:
            raise RuntimeError("the materialization recorded no deployment of 'ticks'")
        first, _ = wait_committed(bootstrap, group, topic, PARTITIONS, 1, WAIT_S["first"])
        figures = _throughput(bootstrap, group, topic, messages, started)
        figures.update(
            deploy_to_healthy_s=healthy - started,
            gate_s=float(mat.metadata["loom/gate_s"].value),  # type: ignore[arg-type]
            materialize_to_first_commit_s=first - started,
        )
    finally:  # whatever failed, leave no job running (nothing to stop if it never deployed)
        resource.deployer().undeploy("ticks", by="bench")
    figures["log_lines_per_msg"] = _lines(sorted(state.rglob("job.log*"))) / messages
    return figures


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of every variant (order rotated per round); medians are shown",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the bench still runs")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also loom's default logging with one setting changed at a time",
    )
    args = parser.parse_args()
    if args.smoke:
        args.messages, args.rounds = SMOKE_MESSAGES, 1
        WAIT_S.update(first=60.0, throughput=60.0)
    modes = [*BARE_LOGGING, *(BREAKDOWN if args.breakdown else ())]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in [*modes, "deployed"]}
    with KafkaBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bootstrap = broker.bootstrap_servers
        if not args.smoke:
            run_bare(bootstrap, root / "warmup", 2000)  # warm the page cache and the broker
        for n in range(args.rounds):  # each round runs every variant, in an order rotated per round,
            order = [*modes, "deployed"]  # so drift in machine load hits all alike
            order = order[n % len(order) :] + order[: n % len(order)]
            for name in order:
                where = root / f"r{n}-{name}"
                if name == "deployed":
                    runs[name].append(run_deployed(bootstrap, where, args.messages))
                else:
                    runs[name].append(run_bare(bootstrap, where, args.messages, name))
    bare, default, deployed = _median(runs["runtime"]), _median(runs["default"]), _median(runs["deployed"])
    print(
        f"\nflow: Kafka ({PARTITIONS} partitions) -> Delta + output topic, {args.messages} messages, 1 worker; "
        f"median of {args.rounds} rounds (order rotated per round)"
    )
    width = 28
    print(
        f"{'':30}{'by hand, runtime logging':>{width}}{'by hand, loom default':>{width}}{'deployed':>{width}}"
    )
    print(
        f"{'start -> first commit (s)':30}{bare['start_to_first_commit_s']:>{width}.2f}"
        f"{default['start_to_first_commit_s']:>{width}.2f}{deployed['materialize_to_first_commit_s']:>{width}.2f}"
    )
    print(
        f"{'deploy -> healthy (s)':30}{'-':>{width}}{'-':>{width}}{deployed['deploy_to_healthy_s']:>{width}.2f}"
    )
    print(f"{'  of which health gate (s)':30}{'-':>{width}}{'-':>{width}}{deployed['gate_s']:>{width}.2f}")
    print(
        f"{'steady throughput (msgs/s)':30}{bare['msgs_per_s']:>{width}.0f}"
        f"{default['msgs_per_s']:>{width}.0f}{deployed['msgs_per_s']:>{width}.0f}"
    )
    print(
        f"{'log lines per message':30}{bare['log_lines_per_msg']:>{width}.2f}"
        f"{default['log_lines_per_msg']:>{width}.2f}{deployed['log_lines_per_msg']:>{width}.2f}"
    )
    print(
        "per round (msgs/s): "
        + ", ".join(f"{name} {[round(r['msgs_per_s']) for r in runs[name]]}" for name in runs)
    )
    pairs = zip(runs["deployed"], runs["runtime"], strict=True)
    paired = ", ".join(_ratio(d["msgs_per_s"], b["msgs_per_s"]) for d, b in pairs)
    print(
        f"throughput ratio deployed / by hand with the runtime's logging: "
        f"{_ratio(deployed['msgs_per_s'], bare['msgs_per_s'])} (target >= 0.95); per round [{paired}]"
    )
    print(
        f"what the runtime's logging saves: by hand, runtime logging / loom default logging = "
        f"{_ratio(bare['msgs_per_s'], default['msgs_per_s'])}; "
        f"deployed / by hand with loom's default logging = {_ratio(deployed['msgs_per_s'], default['msgs_per_s'])}"
    )
    if args.breakdown:
        print(
            "\nloom's default logging, one setting changed at a time (by hand; median msgs/s, vs loom's default):"
        )
        for name in ["default", *BREAKDOWN, "runtime"]:
            figures = _median(runs[name])
            label = BREAKDOWN.get(name) or BARE_LOGGING[name]
            print(
                f"  {label:62}{figures['msgs_per_s']:>8.0f} msgs/s  x{_ratio(figures['msgs_per_s'], default['msgs_per_s'])}"
                f"  {figures['log_lines_per_msg']:6.2f} log lines/msg"
            )


if __name__ == "__main__":
    main()
