"""The Kubernetes test harness itself: a real control plane, KWOK fake nodes and the kubelet stand-in."""

from __future__ import annotations

import os
import signal
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.k8s import KubeCluster, KubeletStandIn
from tests.support.k8s.cluster import K8S_VERSION, free_port

pytestmark = pytest.mark.k8s


def wait_for(
    check: Callable[[], Any], timeout: float = 30.0, what: str = "condition", kubelet: KubeletStandIn | None = None
) -> Any:
    """Poll ``check`` until it returns something truthy; return it (on timeout, describe the stand-in)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            details = f"\n{kubelet.describe()}" if kubelet else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{details}")
        time.sleep(0.1)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def statefulset(name: str, node: str, replicas: int, container: dict[str, Any], volumes: list[Any]) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "serviceName": name,
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    "terminationGracePeriodSeconds": 5,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def pod_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def read_pod(core: Any, name: str, ns: str) -> Any:
    """The pod, or None while it does not exist."""
    from kubernetes.client.exceptions import ApiException

    try:
        return core.read_namespaced_pod(name, ns)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def test_cluster_serves_version_and_rbac(kube_cluster: KubeCluster, tmp_path: Path) -> None:
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    assert kube_cluster.start_seconds is not None and kube_cluster.start_seconds < 30
    api = kube_cluster.api_client()
    assert client.VersionApi(api).get_code().git_version == K8S_VERSION

    ns = kube_cluster.create_namespace(unique("rbac"))
    token = kube_cluster.token_for(ns, "reader")
    reader = client.CoreV1Api(config.new_client_from_config(str(kube_cluster.kubeconfig_for_token(token, tmp_path / "kc"))))
    with pytest.raises(ApiException) as denied:
        reader.list_namespaced_pod(ns)
    assert denied.value.status == 403

    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(ns, {"metadata": {"name": "pod-reader"}, "rules": [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]})
    rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": "pod-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
    })

    def allowed() -> bool:
        try:
            return reader.list_namespaced_pod(ns).items == []
        except ApiException as e:
            if e.status == 403:  # the RBAC authorizer's cache has not seen the binding yet
                return False
            raise

    wait_for(allowed, 10, "RBAC grant")


def test_statefulset_ready_on_kwok_node(kube_cluster: KubeCluster, k8s_namespace: str) -> None:
    ns, node = k8s_namespace, unique("kwok")
    kube_cluster.add_fake_node(node)
    try:
        statefulset_on_kwok_node(kube_cluster, ns, node)
    finally:
        kube_cluster.delete_node(node)


def statefulset_on_kwok_node(kube_cluster: KubeCluster, ns: str, node: str) -> None:
    from kubernetes import client

    api = kube_cluster.api_client()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    core.create_namespaced_service(ns, {"metadata": {"name": "web"}, "spec": {
        "clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 80}]}})
    container = {"name": "web", "image": "example.invalid/web:1", "command": ["python", "-m", "http.server"]}
    apps.create_namespaced_stateful_set(ns, statefulset("web", node, 2, container, []))

    wait_for(lambda: apps.read_namespaced_stateful_set("web", ns).status.ready_replicas == 2, 30,
             "2 ready replicas")
    pods = core.list_namespaced_pod(ns).items
    assert sorted(p.metadata.name for p in pods) == ["web-0", "web-1"]
    assert {p.spec.node_name for p in pods} == {node}


POD_SCRIPT = textwrap.dedent("""
    import http.server, os, pathlib, signal, sys

    greeting = pathlib.Path("/etc/loom/greeting").read_text()
    pathlib.Path("/data/out.txt").write_text(f"{greeting}:{os.environ['TOKEN']}:{os.environ['POD_NAME']}")

    def on_term(*_):
        pathlib.Path("/data/sigterm").write_text(str(os.getpid()))
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Ok)
    print("serving on", os.environ["PORT"], flush=True)
    server.serve_forever()
""")


def test_standin_runs_pod_with_mounts_probes_restart_and_sigterm(
    kube_cluster: KubeCluster, k8s_namespace: str, kubelet_standin: KubeletStandIn
) -> None:
    from kubernetes import client

    ns = k8s_namespace
    api = kube_cluster.api_client()
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "cfg"}, "data": {"greeting": "hello"}})
    core.create_namespaced_secret(ns, {"metadata": {"name": "sec"}, "stringData": {"token": "s3cret"}})
    port = free_port()
    container = {
        "name": "main",
        "image": "example.invalid/loom:1",
        "command": ["python", "-c", POD_SCRIPT],
        "env": [
            {"name": "PORT", "value": str(port)},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "token"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/loom"}, {"name": "data", "mountPath": "/data"}],
        "readinessProbe": {"httpGet": {"path": "/", "port": port}, "periodSeconds": 1},
    }
    volumes = [{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "data", "emptyDir": {}}]
    apps.create_namespaced_stateful_set(ns, statefulset("app", kubelet_standin.node_name, 1, container, volumes))

    pod = wait_for(lambda: (p := read_pod(core, "app-0", ns)) and pod_ready(p) and p, 30, "app-0 Ready", kubelet_standin)
    assert pod.spec.node_name == kubelet_standin.node_name
    wait_for(lambda: apps.read_namespaced_stateful_set("app", ns).status.ready_replicas == 1, 10, "sts ready", kubelet_standin)
    data = kubelet_standin.pod_dir("app-0", ns) / "volumes" / "data"
    assert (data / "out.txt").read_text() == "hello:s3cret:app-0"
    assert "serving on" in kubelet_standin.logs("app-0", ns)
    assert "serving on" in core.read_namespaced_pod_log("app-0", ns)  # through the apiserver

    first_pid = kubelet_standin.pid("app-0", ns)
    assert first_pid is not None
    os.kill(first_pid, signal.SIGKILL)

    def restarted() -> Any:
        p = read_pod(core, "app-0", ns)
        status = (p.status.container_statuses or [None])[0]
        return status and status.restart_count == 1 and pod_ready(p) and status

    status = wait_for(restarted, 30, "restartCount 1 and Ready again", kubelet_standin)
    assert status.last_state.terminated.exit_code == 128 + signal.SIGKILL
    second_pid = kubelet_standin.pid("app-0", ns)
    assert second_pid not in (None, first_pid)
    old_uid = pod.metadata.uid

    core.delete_namespaced_pod("app-0", ns)
    sigterm = data / "sigterm"
    handled = wait_for(lambda: sigterm.exists() and sigterm.read_text(), 15, "SIGTERM handled", kubelet_standin)
    assert handled == str(second_pid)
    # The stand-in finalized the pod, so the StatefulSet controller recreates it.
    wait_for(lambda: (p := read_pod(core, "app-0", ns)) and p.metadata.uid != old_uid and pod_ready(p),
             30, "app-0 recreated and Ready", kubelet_standin)


def test_standin_reports_failed_and_completed_pods(
    kube_cluster: KubeCluster, k8s_namespace: str, kubelet_standin: KubeletStandIn
) -> None:
    from kubernetes import client

    ns = k8s_namespace
    core = client.CoreV1Api(kube_cluster.api_client())

    def pod(name: str, code: int) -> dict[str, Any]:
        script = f"print('exiting {code}'); raise SystemExit({code})"
        return {"metadata": {"name": name}, "spec": {
            "nodeName": kubelet_standin.node_name, "restartPolicy": "Never",
            "containers": [{"name": "c", "image": "x", "command": ["python3", "-c", script]}]}}

    core.create_namespaced_pod(ns, pod("ok", 0))
    core.create_namespaced_pod(ns, pod("bad", 3))
    ok = wait_for(lambda: (p := read_pod(core, "ok", ns)) and p.status.phase == "Succeeded" and p, 20, "ok", kubelet_standin)
    bad = wait_for(lambda: (p := read_pod(core, "bad", ns)) and p.status.phase == "Failed" and p, 20, "bad", kubelet_standin)
    assert ok.status.container_statuses[0].state.terminated.reason == "Completed"
    terminated = bad.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    assert kubelet_standin.logs("bad", ns).strip() == "exiting 3"


LIVENESS_SCRIPT = textwrap.dedent("""
    import http.server, os, pathlib

    sick = pathlib.Path("/state/sick")
    sick.unlink(missing_ok=True)
    token = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    print("greeting", os.environ["CFG_greeting"], os.environ["MESSAGE"], flush=True)
    print("token", token.read_text().count(".") == 2, flush=True)

    class Live(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(500 if sick.exists() else 200)
            self.end_headers()

        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Live).serve_forever()
""")


def test_standin_liveness_restart_envfrom_token_and_logs(
    kube_cluster: KubeCluster, k8s_namespace: str, kubelet_standin: KubeletStandIn
) -> None:
    from kubernetes import client

    ns = k8s_namespace
    core = client.CoreV1Api(kube_cluster.api_client())
    core.create_namespaced_config_map(ns, {"metadata": {"name": "cfg"}, "data": {"greeting": "hi"}})
    port = free_port()
    core.create_namespaced_pod(ns, {"metadata": {"name": "live"}, "spec": {
        "nodeName": kubelet_standin.node_name,
        "terminationGracePeriodSeconds": 2,
        "containers": [{
            "name": "c", "image": "x", "command": ["python", "-c", LIVENESS_SCRIPT],
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
            "env": [{"name": "PORT", "value": str(port)}, {"name": "MESSAGE", "value": "$(CFG_greeting)-there"}],
            "volumeMounts": [{"name": "state", "mountPath": "/state"}],
            "livenessProbe": {"httpGet": {"path": "/", "port": port}, "initialDelaySeconds": 1, "periodSeconds": 1,
                              "failureThreshold": 2},
        }],
        "volumes": [{"name": "state", "emptyDir": {}}],
    }})
    wait_for(lambda: (p := read_pod(core, "live", ns)) and pod_ready(p), 30, "live Ready", kubelet_standin)
    wait_for(lambda: "token True" in kubelet_standin.logs("live", ns), 10, "first log lines", kubelet_standin)
    assert core.read_namespaced_pod_log("live", ns, tail_lines=1).strip() == "token True"
    assert kubelet_standin.logs("live", ns).startswith("greeting hi hi-there\n")

    state = kubelet_standin.pod_dir("live", ns) / "volumes" / "state"
    (state / "sick").write_text("1")

    def restarted() -> Any:
        p = read_pod(core, "live", ns)
        return p.status.container_statuses[0].restart_count == 1 and pod_ready(p) and p

    pod = wait_for(restarted, 30, "liveness restart", kubelet_standin)
    wait_for(lambda: not (state / "sick").exists(), 10, "the restarted process to heal", kubelet_standin)
    assert pod.status.container_statuses[0].last_state.terminated is not None
    assert "greeting hi" in core.read_namespaced_pod_log("live", ns, previous=True)
