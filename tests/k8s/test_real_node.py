"""Flows on a REAL Kubernetes node (kubelet, containerd, runc, CNI bridge, CoreDNS; ``RealNode``), from the
job image built from ``docs/kubernetes/Dockerfile``, in a namespace enforcing the ``restricted`` Pod
Security level, under a service account bound to exactly the shipped Role. Nothing here is patched into
the API: every status is the kubelet's.

- end to end: real messages into Delta, a SIGKILL of the container's process restarted by the kubelet
  (``restartCount`` 1), a redeploy preflighted in a pod of the new template, 0 lost and 0 duplicated;
  the CLI's ``logs`` and ``stop``;
- the preflight pod refuses, before anything is drained, a missing image, a version that cannot start,
  an unschedulable template and a pod the namespace's Pod Security refuses; the running pod keeps its uid;
- health from the kubelet: bad input (exit 2 with its termination message), OOMKilled under a memory
  limit, ErrImageNeverPull;
- a two-process flow: two pods finding each other by the headless Service's DNS names, every partition
  consumed between them, one killed mid-stream, nothing lost;
- brokers this host reaches but a pod does not (loopback): every check on the Dagster side passes, the
  preflight pod refuses the deploy before anything runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from loom_dagster.core.flows.spec import LoomFlowSpec
from loom_dagster.dev.kafka import KafkaBroker
from tests.k8s.test_launcher import names, pods, ready_pods
from tests.support.deploy_env import TICKS
from tests.support.helpers import run_cli, step_failure_message, wait_for
from tests.support.k8s.cluster import KubeCluster
from tests.support.k8s.env import KubeEnv
from tests.support.k8s.job_image import JobImage
from tests.support.k8s.node import RealNode
from tests.support.k8s.real_env import ENFORCE, real_node_bench, real_node_config, wait_quiet

pytestmark = [pytest.mark.k8s, pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture(scope="module")
def node_kafka(k8s_node: RealNode) -> Iterator[KafkaBroker]:
    """A broker the pods reach: listening and advertised on the node's bridge address."""
    with KafkaBroker(host=k8s_node.host_ip, bootstrap=None) as broker:
        yield broker


@pytest.fixture(scope="module")
def image(k8s_node: RealNode, job_image: JobImage) -> JobImage:
    k8s_node.import_image(job_image.tarball)
    return job_image


@pytest.fixture()
def real_env(
    kube_cluster: KubeCluster, node_kafka: KafkaBroker, tmp_path: Path, topic_prefix: str
) -> Iterator[KubeEnv]:
    with real_node_bench(kube_cluster, node_kafka, tmp_path, topic_prefix) as env:
        yield env


def _resource(env: KubeEnv, image: JobImage, pod: dict[str, Any] | None = None, **overrides: Any) -> Any:
    config = real_node_config(env, image, **(pod or {}))
    overrides.setdefault("health_timeout_s", 120)
    return env.resource(preflight=True, launcher_config=config, **overrides)


def _container_id(pod: Any) -> str:
    (status,) = pod.status.container_statuses
    return str(status.container_id).split("://", 1)[1]


def _restarts(pod: Any) -> int:
    return sum(c.restart_count or 0 for c in pod.status.container_statuses or ())


def _log_lines(instance: dg.DagsterInstance, result: Any) -> list[str]:
    return [entry.user_message for entry in instance.all_logs(result.run_id) if entry.user_message]


def _uids(env: KubeEnv) -> set[str]:
    return {p.metadata.uid for p in pods(env)}


def _preflight_pods(env: KubeEnv) -> list[Any]:
    _, core = env.admin()
    selector = "app.kubernetes.io/name=loom-preflight"
    return list(core.list_namespaced_pod(env.namespace, label_selector=selector).items)


def _kubectl(cluster: KubeCluster, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    kubectl = str(cluster.bin_dir / "kubectl")
    argv = [kubectl, f"--kubeconfig={cluster.kubeconfig_path}", "-n", namespace, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_flow_from_the_built_image_survives_a_kill_and_a_preflighted_redeploy(
    real_env: KubeEnv, image: JobImage, k8s_node: RealNode, kube_cluster: KubeCluster
) -> None:
    env, bench = real_env, real_env.bench
    assert bench is not None
    resource = _resource(env, image)
    _, core = env.admin()
    assert core.read_namespace(env.namespace).metadata.labels[ENFORCE] == "restricted"
    bench.produce(0, 300)
    with dg.instance_for_test() as instance:
        first = bench.materialize(instance, resource=resource, LOOM_TEST_VERSION="1")
        assert first.success, step_failure_message(first)
        bench.wait_for_delta(set(bench.produced))
        (pod,) = ready_pods(env)
        assert pod.spec.node_name == k8s_node.name and pod.spec.containers[0].image == image.ref
        assert pod.status.pod_ip and pod.status.pod_ip != k8s_node.node_ip  # its own address
        # the image's non-root user on a read-only root: what the restricted namespace admitted runs
        who = _kubectl(kube_cluster, env.namespace, "exec", pod.metadata.name, "--", "id", "-u")
        assert who.stdout.strip() == "10001", who.stderr
        write = _kubectl(kube_cluster, env.namespace, "exec", pod.metadata.name, "--", "touch", "/app/x")
        assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr

        # SIGKILL of the container's process, from the host: the kubelet restarts it
        wait_quiet(bench)
        os.kill(k8s_node.container_pid(_container_id(pod)), signal.SIGKILL)
        bench.produce(300, 300)  # written while it is down
        restarted = wait_for(
            lambda: (p := ready_pods(env)) and _restarts(p[0]) >= 1 and p[0], 90, "restarted and ready"
        )
        (status,) = restarted.status.container_statuses
        assert status.restart_count == 1 and status.last_state.terminated.exit_code == 137
        assert restarted.metadata.uid == pod.metadata.uid  # the same pod: a container restart
        bench.wait_for_delta(set(bench.produced))
        wait_quiet(bench)

        # a redeploy: the preflight pod of the new template runs first, then the new version takes over
        second = bench.materialize(instance, resource=resource, LOOM_TEST_VERSION="2")
        assert second.success, step_failure_message(second)
        ran = [line for line in _log_lines(instance, second) if line.startswith("preflight passed")]
        assert ran and "-preflight-" in ran[0] and image.ref in ran[0], ran
        assert not _preflight_pods(env) or wait_for(
            lambda: not _preflight_pods(env), 30, "preflight pod gone"
        )
        assert pod.metadata.uid not in _uids(env)
        bench.produce(600, 300)
        ids = bench.wait_for_delta(set(bench.produced))

    # the operator's CLI, in its own process: the pods' logs, then a stop that drains them
    config = json.dumps(env.launcher_config(**real_node_config(env, image)))
    cli = ["--launcher", "kubernetes", "--launcher-config", config]
    logs = run_cli(bench.state_dir, *cli, "logs", "ticks", "-n", "20", timeout_s=60)
    assert logs.returncode == 0 and f"--- {names(env)[0]}-0" in logs.stdout, logs.stderr
    stopped = run_cli(bench.state_dir, *cli, "stop", "ticks", timeout_s=90)
    assert stopped.returncode == 0 and "ticks: stopped (pods" in stopped.stdout, stopped.stderr
    wait_for(lambda: not pods(env), 60, "the pod gone after stop")
    counted = Counter({i: ids[i] for i in bench.produced})
    lost = [i for i in bench.produced if counted[i] == 0]
    duplicated = [i for i in bench.produced if counted[i] > 1]
    print(f"real node: {len(bench.produced)} produced, {len(lost)} lost, {len(duplicated)} duplicated")
    assert not lost and not duplicated, (lost[:5], duplicated[:5])


def test_preflight_pod_refuses_bad_versions_before_anything_is_drained(
    real_env: KubeEnv, image: JobImage
) -> None:
    env, bench = real_env, real_env.bench
    assert bench is not None
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance, resource=_resource(env, image), LOOM_TEST_VERSION="1").success
        running = _uids(env)
        assert len(running) == 1
        apps, _ = env.admin()
        generation = apps.read_namespaced_stateful_set(names(env)[0], env.namespace).metadata.generation

        def refused(why: str, pod: dict[str, Any] | None = None, **env_vars: str) -> str:
            resource = _resource(env, image, pod, preflight_timeout_s=20)
            result = bench.materialize(instance, resource=resource, LOOM_TEST_VERSION="2", **env_vars)
            assert not result.success, why
            message = step_failure_message(result)
            assert "nothing was stopped" in message.lower(), message
            assert _uids(env) == running, f"{why}: the running pod was touched"
            sts = apps.read_namespaced_stateful_set(names(env)[0], env.namespace)
            assert sts.metadata.generation == generation, f"{why}: the StatefulSet was changed"
            wait_for(lambda: not _preflight_pods(env), 30, f"{why}: the preflight pod deleted")
            return message

        missing = refused("missing image", {"image": "loom-dagster-job:absent"})
        assert "ErrImageNeverPull" in missing and "loom-dagster-job:absent" in missing, missing
        cannot_start = refused("cannot start", LOOM_TEST_FAIL_AT_START="1")
        assert "exit code 2" in cannot_start and "LOOM_TEST_FAIL_AT_START is set" in cannot_start, (
            cannot_start
        )
        nowhere = refused("unschedulable", {"node_selector": {"loom-test/node": "nowhere"}})
        assert "not scheduled" in nowhere and "preflight timeout" in nowhere, nowhere
        weakened = refused("weakened pod", {"container_security_context": {"allowPrivilegeEscalation": True}})
        assert "violates PodSecurity" in weakened and "allowPrivilegeEscalation" in weakened, weakened
        assert "Pod Security admission" in weakened and "lacks a permission" not in weakened, weakened
    bench.produce(0, 100)
    bench.wait_for_delta(set(bench.produced))  # the first version still runs


def test_health_from_the_kubelet_bad_input_oom_and_missing_image(real_env: KubeEnv, image: JobImage) -> None:
    """The job breaks after its deploy (its StatefulSet edited out of band, pod recreated): each state is
    the kubelet's own, read by a health-sensor tick; none is restarted by the sensor."""
    from tests.k8s.test_launcher import _tick

    env, bench = real_env, real_env.bench
    assert bench is not None
    resource = _resource(env, image)
    apps, core = env.admin()
    name = names(env)[0]

    def break_with(container: dict[str, Any]) -> None:
        patch = {"spec": {"template": {"spec": {"containers": [{"name": "job", **container}]}}}}
        apps.patch_namespaced_stateful_set(name, env.namespace, patch)
        core.delete_namespaced_pod(f"{name}-0", env.namespace, grace_period_seconds=0)

    def tick_until(words: str, cursor: str | None) -> tuple[Any, Any]:
        seen: list[str] = []

        def ticked() -> tuple[Any, Any] | None:
            result, check = _tick(env, instance, resource, cursor)
            seen.append(check.description or "")
            return (result, check) if words in (check.description or "") else None

        found = wait_for(ticked, 120, f"a health tick saying {words!r} (last: {seen[-1:]})")
        assert found is not None
        return found

    with dg.instance_for_test() as instance:
        assert bench.materialize(instance, resource=resource).success
        (container,) = apps.read_namespaced_stateful_set(name, env.namespace).spec.template.spec.containers
        args = list(container.args)
        args[args.index("--import-path") + 1] = "tests.flows.no_such_module:flow"
        break_with({"args": args})
        result, check = tick_until("bad input", None)
        assert not check.passed and not result.run_requests
        assert "restarting won't help" in check.description and "no_such_module" in check.description

        good_args = list(container.args)
        break_with(
            {"args": good_args, "resources": {"limits": {"memory": "40Mi"}, "requests": {"memory": "40Mi"}}}
        )
        result, check = tick_until("OOMKilled", result.cursor)
        assert not check.passed and not result.run_requests

        break_with(
            {
                "image": "loom-dagster-job:absent",
                "resources": {"limits": {"memory": "1Gi"}, "requests": {"memory": "256Mi"}},
            }
        )
        result, check = tick_until("ErrImageNeverPull", result.cursor)
        assert not check.passed and not result.run_requests


def test_two_process_flow_spreads_partitions_over_two_pods_and_loses_nothing_when_one_dies(
    kube_cluster: KubeCluster,
    node_kafka: KafkaBroker,
    tmp_path: Path,
    topic_prefix: str,
    image: JobImage,
    k8s_node: RealNode,
) -> None:
    with real_node_bench(kube_cluster, node_kafka, tmp_path, topic_prefix, partitions=6) as env:
        bench = env.bench
        assert bench is not None
        spec = LoomFlowSpec(TICKS, config=bench.config, environment="test", processes=2)
        resource = _resource(env, image)
        bench.produce(0, 600)
        with dg.instance_for_test() as instance:
            result = bench.materialize(instance, resource=resource, spec=spec)
            assert result.success, step_failure_message(result)
            bench.wait_for_delta(set(bench.produced))
            running = sorted(ready_pods(env), key=lambda p: p.metadata.name)
            assert len(running) == 2
            statuses = [_status(p) for p in running]
            assert sorted(s["process_id"] for s in statuses) == [0, 1], statuses
            # every partition is polled, split between the two processes, and both consumed rows
            assert [s["partitions"] for s in statuses] == [3, 3], statuses
            assert all(s["records_in"] > 0 for s in statuses), statuses
            os.kill(k8s_node.container_pid(_container_id(running[1])), signal.SIGKILL)
            bench.produce(600, 600)
            wait_for(lambda: len(ready_pods(env)) == 2, 120, "both pods ready again")
            ids = bench.wait_for_delta(set(bench.produced), timeout_s=180)
    lost = [i for i in bench.produced if ids[i] == 0]
    assert not lost, f"{len(lost)} lost, e.g. {lost[:5]}"


def _status(pod: Any) -> dict[str, Any]:
    """The runtime's ``/status`` of *pod*, from its own address (the host reaches pod IPs on the bridge)."""
    url = f"http://{pod.status.pod_ip}:8080/status"
    with urllib.request.urlopen(url, timeout=5) as response:
        return dict(json.loads(response.read()))


def test_brokers_reachable_here_but_not_from_a_pod_are_refused_by_the_preflight_pod(
    kube_cluster: KubeCluster, kafka: KafkaBroker, tmp_path: Path, topic_prefix: str, image: JobImage
) -> None:
    """The session's broker listens on 127.0.0.1: the deploy's own checks (topics, offsets, fence) reach it
    from this host and pass; a pod cannot, and the preflight pod (a two-process flow is preflighted even
    on its first deploy) says so before any StatefulSet exists."""
    with real_node_bench(kube_cluster, kafka, tmp_path, topic_prefix) as env:
        bench = env.bench
        assert bench is not None
        spec = LoomFlowSpec(TICKS, config=bench.config, environment="test", processes=2)
        with dg.instance_for_test() as instance:
            result = bench.materialize(
                instance, resource=_resource(env, image, preflight_timeout_s=60), spec=spec
            )
        assert not result.success
        message = step_failure_message(result)
        assert "Kafka is not reachable from where the job runs" in message, message
        assert kafka.bootstrap_servers in message and "nothing was stopped" in message.lower(), message
        apps, _ = env.admin()
        assert not apps.list_namespaced_stateful_set(env.namespace).items
        wait_for(lambda: not _preflight_pods(env), 30, "the preflight pod deleted")
