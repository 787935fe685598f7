"""Deploy bench: a materialization (compile, lineage check, preflight, launch, health gate) next to the
same flow run by hand with loom's StreamingRunner, and steady-state throughput into Delta of both.

    .venv/bin/python bench/deploy.py [--messages 60000] [--rounds 2]
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
import sys
from loom.streaming.bytewax import StreamingRunner
from loom_dagster.loading import import_flow, load_config
flow = import_flow("tests.flows.delta_only:ticks_flow")
StreamingRunner.from_context(flow, config=load_config([sys.argv[1]], "test"), environment="test").run()
"""


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


def run_bare(bootstrap: str, root: Path, messages: int) -> dict[str, float]:
    """The same flow started by hand with loom's runner: spawn -> first commit, and throughput."""
    config, group, topic = _setup(bootstrap, root, "bare", messages)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    log = open(root / "bare.log", "ab")  # the launched job logs to a file too: same I/O on both sides
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE, str(config / "base.yaml")],
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
        return result
    finally:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


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
        return figures
    finally:  # whatever failed, leave no job running (nothing to stop if it never deployed)
        resource.deployer().undeploy("ticks", by="bench")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each; medians are shown")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the bench still runs")
    args = parser.parse_args()
    if args.smoke:
        args.messages, args.rounds = SMOKE_MESSAGES, 1
        WAIT_S.update(first=60.0, throughput=60.0)
    bare_runs: list[dict[str, float]] = []
    deployed_runs: list[dict[str, float]] = []
    with KafkaBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bootstrap = broker.bootstrap_servers
        if not args.smoke:
            run_bare(bootstrap, root / "warmup", 2000)  # warm the page cache and the broker
        for n in range(args.rounds):  # alternate, so drift in machine load hits both alike
            bare_runs.append(run_bare(bootstrap, root / f"b{n}", args.messages))
            deployed_runs.append(run_deployed(bootstrap, root / f"d{n}", args.messages))
    bare = {k: statistics.median(r[k] for r in bare_runs) for k in bare_runs[0]}
    deployed = {k: statistics.median(r[k] for r in deployed_runs) for k in deployed_runs[0]}
    print(
        f"\nflow: Kafka ({PARTITIONS} partitions) -> Delta + output topic, {args.messages} messages, 1 worker; "
        f"median of {args.rounds} alternating rounds"
    )
    print(f"{'':34}{'by hand (loom runner)':>24}{'deployed (materialize)':>26}")
    print(
        f"{'start -> first commit (s)':34}{bare['start_to_first_commit_s']:>24.2f}"
        f"{deployed['materialize_to_first_commit_s']:>26.2f}"
    )
    print(f"{'deploy -> healthy (s)':34}{'-':>24}{deployed['deploy_to_healthy_s']:>26.2f}")
    print(f"{'  of which health gate (s)':34}{'-':>24}{deployed['gate_s']:>26.2f}")
    print(f"{'steady throughput (msgs/s)':34}{bare['msgs_per_s']:>24.0f}{deployed['msgs_per_s']:>26.0f}")
    print(
        f"per round (msgs/s): by hand {[round(r['msgs_per_s']) for r in bare_runs]}, "
        f"deployed {[round(r['msgs_per_s']) for r in deployed_runs]}"
    )
    ratio = f"{deployed['msgs_per_s'] / bare['msgs_per_s']:.3f}" if bare["msgs_per_s"] else "n/a"
    print(f"throughput ratio deployed/by hand: {ratio} (target >= 0.95)")


if __name__ == "__main__":
    main()
