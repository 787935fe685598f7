"""Kubernetes deploy bench: deploy-to-healthy of one flow on the Kubernetes launcher (a real control plane
from the test harness, the kubelet stand-in running the pod's command) next to the local process launcher,
in one run. Each round is a fresh materialization (first deploy) then a redeploy of a new version.

    .venv/bin/python bench/k8s_deploy.py [--rounds 3]
    .venv/bin/python bench/k8s_deploy.py --smoke     # one round; no figures asserted

Columns: ``deploy`` = the whole materialization (compile, checks, snapshot, launch, health gate, record),
``gate`` = launch -> healthy (the job connected: the runtime's /readyz through the kubelet's probe on
Kubernetes), ``drain`` = stop of the previous version on a redeploy. Medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
from _common import ROOT

from loom_dagster import LoomDeployResource, LoomFlowSpec, build_loom_defs
from loom_dagster.dev.kafka import KafkaBroker, create_topics
from tests.conftest import ticks_config
from tests.support.k8s.cluster import REPO_ROOT, KubeCluster, build_binaries, free_port
from tests.support.k8s.env import make_env
from tests.support.k8s.kubelet import KubeletStandIn

TICKS = "tests.flows.delta_only:ticks_flow"


def materialize(
    defs: dg.Definitions, resource: LoomDeployResource, instance: dg.DagsterInstance
) -> dict[str, Any]:
    """One materialization of the ticks flow; its wall time and the gate/drain times it logged."""
    started = time.perf_counter()
    result = dg.materialize(
        list(defs.assets or []),
        selection=[dg.AssetKey(["loom", "ticks"])],
        resources={"loom": resource},
        instance=instance,
        raise_on_error=False,
    )
    wall = time.perf_counter() - started
    if not result.success:
        failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        raise SystemExit(f"deploy failed: {failure[0].step_failure_data.error.message if failure else '?'}")
    (materialization,) = result.asset_materializations_for_node(result.all_node_events[0].node_name)
    metadata = materialization.metadata
    gate = metadata.get("loom/gate_s")
    drain = metadata.get("loom/drain_s")
    return {
        "deploy_s": wall,
        "gate_s": float(gate.value) if gate is not None else float("nan"),
        "drain_s": float(drain.value) if drain is not None else float("nan"),
    }


def run_rounds(
    name: str, rounds: int, root: Path, bootstrap: str, resource_for: Any, instance: dg.DagsterInstance
) -> list[dict[str, Any]]:
    rows = []
    for index in range(rounds):
        prefix = f"k{uuid.uuid4().hex[:6]}"
        create_topics(bootstrap, [f"{prefix}.ticks", f"{prefix}.ticks.out", f"{prefix}.ticks.dlq"], 3)
        directory = root / f"{name}-{index}"
        config = ticks_config(
            directory / "config", brokers=bootstrap, prefix=prefix, delta_uri=str(directory / "delta")
        )
        resource, stop = resource_for(directory)
        try:
            for kind, version in (("deploy", "1"), ("redeploy", "2")):
                spec = LoomFlowSpec(
                    TICKS, config=config, environment="test", env={"LOOM_TEST_VERSION": version}
                )
                row = materialize(build_loom_defs([spec], state=False), resource, instance)
                rows.append({"launcher": name, "kind": kind, **row})
        finally:
            stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    rounds = 1 if args.smoke else args.rounds
    os.environ.setdefault("LOOM_DAGSTER_COMPILE_CACHE", "off")
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="k8s-bench-") as tmp, KafkaBroker() as kafka:
        root = Path(tmp)
        bin_dir = build_binaries(root / "k8s-build.log")
        with (
            KubeCluster(bin_dir=bin_dir, workdir=root / "cluster") as cluster,
            dg.instance_for_test() as instance,
        ):
            node = f"standin-{uuid.uuid4().hex[:6]}"
            with KubeletStandIn(
                cluster.api_client(),
                node,
                root / node,
                python=sys.executable,
                extra_env={"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"},
                probe_period_cap=0.5,
            ):

                def kubernetes(directory: Path) -> tuple[LoomDeployResource, Any]:
                    env = make_env(cluster, None, directory)
                    config = env.launcher_config(
                        http_port=free_port(), pod={"node_selector": {"kubernetes.io/hostname": node}}
                    )
                    resource = LoomDeployResource(
                        state_dir=str(directory / "state"), launcher="kubernetes", launcher_config=config
                    )
                    return resource, lambda: resource.deployer().undeploy("ticks", by="bench")

                def local(directory: Path) -> tuple[LoomDeployResource, Any]:
                    resource = LoomDeployResource(state_dir=str(directory / "state"))
                    return resource, lambda: resource.deployer().undeploy("ticks", by="bench")

                rows = run_rounds("local", rounds, root, kafka.bootstrap_servers, local, instance)
                rows += run_rounds("kubernetes", rounds, root, kafka.bootstrap_servers, kubernetes, instance)
    print_table(rows, smoke=args.smoke)


def print_table(rows: list[dict[str, Any]], smoke: bool) -> None:
    print(
        f"{'launcher':<11} {'kind':<9} {'deploy s':>9} {'gate s':>8} {'drain s':>8}  (medians, n={len(rows) // 4})"
    )
    medians: dict[tuple[str, str], dict[str, float]] = {}
    for launcher in ("local", "kubernetes"):
        for kind in ("deploy", "redeploy"):
            picked = [r for r in rows if r["launcher"] == launcher and r["kind"] == kind]
            med = {k: statistics.median(r[k] for r in picked) for k in ("deploy_s", "gate_s", "drain_s")}
            medians[(launcher, kind)] = med
            print(
                f"{launcher:<11} {kind:<9} {med['deploy_s']:9.2f} {med['gate_s']:8.2f} {med['drain_s']:8.2f}"
            )
    for kind in ("deploy", "redeploy"):
        local, k8s = medians[("local", kind)], medians[("kubernetes", kind)]
        print(f"kubernetes / local, {kind}: {k8s['deploy_s'] / local['deploy_s']:.2f}x deploy")
    if smoke:
        print("(smoke run: one round, figures not meaningful)")


if __name__ == "__main__":
    main()
