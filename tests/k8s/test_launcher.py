"""The Kubernetes launcher against a real control plane (etcd, kube-apiserver, controller-manager,
scheduler built from the Go module proxy; KWOK for fake nodes), under a service account bound to exactly
the shipped Role: deploy, redeploy (never two versions at once), a failed health gate rolled back to the
previous template, undeploy; a StatefulSet deleted out of band redeployed by the sensor; the error without a
verb the launcher needs; the CLI against the cluster. These are the API's side of the launcher: no process
runs on a KWOK node, so no status here is a container's. ``test_k8s_real_node.py`` runs the flows in real
containers on a real node (crash loop, OOM, image errors and the preflight pod among them)."""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from kubernetes.client import rest

from loom_dagster import build_loom_asset_graph, build_loom_defs
from loom_dagster.asset_check_names import RESTART_TAG
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.launchers.kubernetes.manifests import selector_labels, workload_name
from loom_dagster.core.launchers.kubernetes.settings import KubernetesSettings
from loom_dagster.core.redact import redact_text
from loom_dagster.core.sensor_settings import JobHealthSettings
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.sensors.health import build_job_health_sensor
from tests.support.helpers import Poller, run_cli, wait_for
from tests.support.helpers import step_failure_message as _failure
from tests.support.k8s.cluster import KubeCluster
from tests.support.k8s.env import KubeEnv, kube_bench, kwok_bench

pytestmark = [pytest.mark.k8s, pytest.mark.kafka, pytest.mark.slow]
FLOW_KEY = dg.AssetKey(["loom", "ticks"])


@pytest.fixture()
def kube_env(
    kube_cluster: KubeCluster, kafka: KafkaBroker, tmp_path: Path, topic_prefix: str
) -> Iterator[KubeEnv]:
    with kwok_bench(kube_cluster, kafka, tmp_path, topic_prefix) as env:
        yield env


def names(env: KubeEnv) -> tuple[str, str]:
    settings = KubernetesSettings(namespace=env.namespace)
    return workload_name(settings, "ticks"), ",".join(
        f"{k}={v}" for k, v in selector_labels(settings, "ticks").items()
    )


def pods(env: KubeEnv) -> list[Any]:
    _, core = env.admin()
    return list(core.list_namespaced_pod(env.namespace, label_selector=names(env)[1]).items)


def ready_pods(env: KubeEnv) -> list[Any]:
    return [
        p
        for p in pods(env)
        if not p.metadata.deletion_timestamp
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or ())
    ]


class RevisionWatcher(Poller):
    """Watches the flow's pods; remembers the most template revisions that ever had a live pod at once."""

    period_s = 0.05

    def __init__(self, env: KubeEnv) -> None:
        super().__init__()
        self.env = env
        self.most_at_once = 0
        self.seen: set[str] = set()

    def poll(self) -> None:
        live = {
            p.metadata.labels.get("controller-revision-hash", "?")
            for p in pods(self.env)
            if p.status.phase in ("Pending", "Running")
        }
        self.seen |= live
        self.most_at_once = max(self.most_at_once, len(live))


def no_secret_anywhere(env: KubeEnv) -> None:
    """Every ConfigMap, annotation and argument of the namespace's loom objects is free of secrets."""
    apps, core = env.admin()
    texts: list[str] = []
    for cm in core.list_namespaced_config_map(env.namespace).items:
        texts += list((cm.data or {}).values()) + list((cm.metadata.annotations or {}).values())
    for sts in apps.list_namespaced_stateful_set(env.namespace).items:
        texts += list((sts.metadata.annotations or {}).values())
        for container in sts.spec.template.spec.containers:
            texts += list(container.args or []) + [e.value or "" for e in container.env or []]
    assert texts
    for text in texts:
        assert redact_text(text) == text, text


def test_deploy_redeploy_rollback_and_undeploy(kube_env: KubeEnv) -> None:
    env = kube_env
    apps, _ = env.admin()
    name, _ = names(env)
    store = env.launcher().deployment_store()
    resource = env.resource(health_timeout_s=30)
    with dg.instance_for_test() as instance:
        assert env.bench.materialize(instance, resource=resource, LOOM_TEST_VERSION="1").success
        sts = apps.read_namespaced_stateful_set(name, env.namespace)
        record = store.current("ticks")
        assert record is not None and record.job.launcher == "kubernetes"
        assert sts.spec.replicas == 1 and len(ready_pods(env)) == 1
        annotations = sts.spec.template.metadata.annotations
        assert annotations["loom-dagster.io/plan-hash"] == record.plan_hash
        assert annotations["loom-dagster.io/config-hash"] == record.config_hash
        assert record.job.request.config_files[0].startswith("/etc/loom/config/")
        no_secret_anywhere(env)

        # redeploy: the old pod is gone before the new template's pod exists
        with RevisionWatcher(env) as watcher:
            assert env.bench.materialize(instance, resource=resource, LOOM_TEST_VERSION="2").success
        assert len(watcher.seen) >= 2 and watcher.most_at_once == 1
        assert _version(apps, env) == "2" and len(ready_pods(env)) == 1

        # a version whose pods never become ready is rolled back to the previous template
        unschedulable = env.resource(
            health_timeout_s=8,
            launcher_config={"flows": {"ticks": {"node_selector": {"loom-test": "nowhere"}}}},
        )
        failed = env.bench.materialize(instance, resource=unschedulable, LOOM_TEST_VERSION="3")
        assert not failed.success
        message = _failure(failed)
        assert "failed its health gate" in message and "not scheduled" in message, message
        assert "The previous deployment" in message and "runs again" in message, message
        assert _version(apps, env) == "2"
        wait_for(lambda: len(ready_pods(env)) == 1, 30, "the previous template's pod ready again")
        rolled_back = store.current("ticks")
        assert rolled_back is not None and rolled_back.restarts == record.restarts + 1

        # the CLI, in its own process, reads the same truth from the cluster
        cli_args = ["--launcher", "kubernetes", "--launcher-config", json.dumps(env.launcher_config())]
        status = run_cli(env.bench.state_dir, *cli_args, "status", "--json", "--no-lag", timeout_s=60)
        assert status.returncode == 0, status.stderr
        (row,) = json.loads(status.stdout)
        assert row["flow"] == "ticks" and row["health"] == "healthy", row
        # and from inside the cluster: the mounted service-account token and CA, no kubeconfig
        in_cluster = env.in_cluster_cli(
            env.bench.state_dir,
            *["--launcher", "kubernetes", "--launcher-config", json.dumps({"namespace": env.namespace})],
            *["status", "--json", "--no-lag"],
        )
        assert in_cluster.returncode == 0, in_cluster.stderr
        (seen,) = json.loads(in_cluster.stdout)
        assert (seen["flow"], seen["health"], seen["pids"]) == (row["flow"], row["health"], row["pids"]), seen

        undeploy = build_loom_defs([env.bench.spec()]).resolve_job_def("loom_undeploy")
        done = undeploy.execute_in_process(
            run_config={"ops": {"undeploy_loom_flows": {"config": {"flows": ["ticks"]}}}},
            resources={"loom": resource},
            instance=instance,
        )
        assert done.success
    assert apps.read_namespaced_stateful_set(name, env.namespace).spec.replicas == 0
    wait_for(lambda: not pods(env), 30, "no pod left after the undeploy")
    stopped = store.current("ticks")
    assert stopped is not None and stopped.stopped_on_purpose


def test_statefulset_deleted_out_of_band_is_redeployed_by_the_sensor(kube_env: KubeEnv) -> None:
    env = kube_env
    apps, _ = env.admin()
    name, _ = names(env)
    resource = env.resource(health_timeout_s=30)
    with dg.instance_for_test() as instance:
        assert env.bench.materialize(instance, resource=resource).success
        template = apps.read_namespaced_stateful_set(name, env.namespace).spec.template.metadata.annotations
        apps.delete_namespaced_stateful_set(name, env.namespace)
        wait_for(lambda: not pods(env), 30, "the pods gone with their StatefulSet")
        result, check = _tick(env, instance, resource, None)
        assert not check.passed and "deleted out of band" in (check.description or "")
        (request,) = result.run_requests or []
        assert request.tags[RESTART_TAG] == "true"
        defs = build_loom_defs([env.bench.spec()])
        restarted = dg.materialize(  # what the daemon does with the request
            list(defs.assets or []),
            selection=[FLOW_KEY],
            resources={"loom": resource},
            instance=instance,
            tags=dict(request.tags),
        )
        assert restarted.success
        again = apps.read_namespaced_stateful_set(name, env.namespace)
        assert again.spec.template.metadata.annotations == template  # the same deployment, relaunched
        wait_for(lambda: len(ready_pods(env)) == 1, 30, "the relaunched pod ready")
        with api_requests() as seen:
            _, check = _tick(env, instance, resource, result.cursor)
        assert check.passed, check.description
        # one tick reads the namespace's StatefulSets, pods, Leases and records once each, not per flow
        ours = [
            (method, path.split("?")[0]) for method, path in seen if f"/namespaces/{env.namespace}/" in path
        ]
        assert sorted(ours) == sorted(
            [
                ("GET", f"/apis/apps/v1/namespaces/{env.namespace}/statefulsets"),
                ("GET", f"/api/v1/namespaces/{env.namespace}/pods"),
                ("GET", f"/apis/coordination.k8s.io/v1/namespaces/{env.namespace}/leases"),
                ("GET", f"/api/v1/namespaces/{env.namespace}/configmaps"),
            ]
        ), ours


def test_a_role_without_a_needed_verb_fails_clearly(
    kube_cluster: KubeCluster, kafka: KafkaBroker, tmp_path: Path, topic_prefix: str
) -> None:
    with kube_bench(kube_cluster, kafka, tmp_path, topic_prefix, drop=("statefulsets", "create")) as env:
        with dg.instance_for_test() as instance:
            failed = env.bench.materialize(instance, resource=env.resource(health_timeout_s=10))
        assert not failed.success
        message = _failure(failed)
        assert "403" in message and "statefulsets" in message and "create" in message, message
        assert "rbac.yaml" in message


def _version(apps: Any, env: KubeEnv) -> str | None:
    """The flow's LOOM_TEST_VERSION as its pods get it: from the flow's env Secret, never a value."""
    sts = apps.read_namespaced_stateful_set(names(env)[0], env.namespace)
    (container,) = sts.spec.template.spec.containers
    item = next((e for e in container.env or [] if e.name == "LOOM_TEST_VERSION"), None)
    if item is None:
        return None
    assert item.value is None, "an env value in the pod template"
    ref = item.value_from.secret_key_ref
    _, core = env.admin()
    data = core.read_namespaced_secret(ref.name, env.namespace).data or {}
    return base64.b64decode(data[ref.key]).decode()


@contextlib.contextmanager
def api_requests() -> Iterator[list[tuple[str, str]]]:
    """Every request the Kubernetes client sends meanwhile, as (method, path?query), still sent."""
    seen: list[tuple[str, str]] = []
    send = rest.RESTClientObject.request

    def counted(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        parsed = urllib.parse.urlsplit(url)
        seen.append((method, f"{parsed.path}?{parsed.query}"))
        return send(self, method, url, *args, **kwargs)

    rest.RESTClientObject.request = counted  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        rest.RESTClientObject.request = send  # type: ignore[method-assign]


def _tick(
    env: KubeEnv, instance: dg.DagsterInstance, resource: Any, cursor: str | None
) -> tuple[dg.SensorResult, dg.AssetCheckEvaluation]:
    sensor = build_job_health_sensor(build_loom_asset_graph([env.bench.spec()]), JobHealthSettings())
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"loom": resource})
    result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    (check,) = [e for e in result.asset_events or [] if isinstance(e, dg.AssetCheckEvaluation)]
    return result, check


def test_deploy_lock_is_a_lease_that_names_its_holder(kube_env: KubeEnv) -> None:
    env_stores = [kube_env.launcher().deployment_store() for _ in range(2)]
    first, second = env_stores
    assert not first.lock_held("ticks")
    with first.lock("ticks", holder="run A"):
        assert all(store.lock_held("ticks") for store in env_stores)
        with pytest.raises(DeploymentError, match="being deployed or stopped by run A"):
            with second.lock("ticks", holder="run B"):
                pass
    assert not second.lock_held("ticks")
    with second.lock("ticks", holder="run B"):  # released: free to take
        pass
