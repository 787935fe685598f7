"""A flow materialized onto Kubernetes really runs: the kubelet stand-in of the test harness runs the pod's
command (``python -m loom_dagster.runtime`` with the mounted config snapshot, env and probes), so real
messages move from the real broker into Delta; the job survives a SIGKILL (Kubernetes restarts the
container, seen through the API) and a redeploy with nothing lost; logs and stop work from the CLI."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import dagster as dg
import pytest

from loom_dagster.dev.kafka import KafkaBroker
from tests.support.helpers import run_cli, wait_for
from tests.support.k8s.cluster import KubeCluster, free_port
from tests.support.k8s.env import kube_bench
from tests.support.k8s.kubelet import KubeletStandIn
from tests.test_k8s_launcher import names, pods, ready_pods

pytestmark = [pytest.mark.k8s, pytest.mark.kafka, pytest.mark.slow]


def restarts(pod: object) -> int:
    return sum(c.restart_count or 0 for c in pod.status.container_statuses or ())  # type: ignore[attr-defined]


def test_flow_on_kubernetes_moves_messages_survives_kill_and_redeploy(
    kube_cluster: KubeCluster,
    kafka: KafkaBroker,
    tmp_path: Path,
    topic_prefix: str,
    kubelet_standin: KubeletStandIn,
) -> None:
    with kube_bench(kube_cluster, kafka, tmp_path, topic_prefix) as env:
        bench = env.bench
        node = {"kubernetes.io/hostname": kubelet_standin.node_name}
        resource = env.resource(
            health_timeout_s=120, launcher_config={"http_port": free_port(), "pod": {"node_selector": node}}
        )
        bench.produce(0, 300)
        with dg.instance_for_test() as instance:
            assert bench.materialize(instance, resource=resource, LOOM_TEST_VERSION="1").success
            bench.wait_for_delta(set(bench.produced))
            (pod,) = ready_pods(env)
            pod_name = pod.metadata.name

            # SIGKILL the job's process: Kubernetes (the stand-in) restarts the container, seen in the API
            pid = kubelet_standin.pid(pod_name, env.namespace)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            bench.produce(300, 300)  # written while it is down
            wait_for(lambda: restarts(pods(env)[0]) >= 1, 60, "the restart count through the API")
            wait_for(lambda: ready_pods(env), 120, "the restarted container ready")
            bench.wait_for_delta(set(bench.produced))

            # redeploy: the new version takes over from the committed offsets
            assert bench.materialize(instance, resource=resource, LOOM_TEST_VERSION="2").success
            bench.produce(600, 300)
            ids = bench.wait_for_delta(set(bench.produced))
        lost = set(bench.produced) - set(ids)
        assert not lost, f"{len(lost)} lost"

        cli_args = ["--launcher", "kubernetes", "--launcher-config", json.dumps(env.launcher_config())]
        logs = run_cli(bench.state_dir, *cli_args, "logs", "ticks", "-n", "20", timeout_s=60)
        assert logs.returncode == 0 and f"--- {names(env)[0]}-0" in logs.stdout, logs.stderr
        stopped = run_cli(bench.state_dir, *cli_args, "stop", "ticks", timeout_s=90)
        assert stopped.returncode == 0 and "ticks: stopped (pods" in stopped.stdout, stopped.stderr
        wait_for(lambda: not pods(env), 60, "the pod gone after stop")
