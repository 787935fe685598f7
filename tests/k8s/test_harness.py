"""The Kubernetes test harness itself: a real control plane and KWOK fake nodes (the real node: ``test_k8s_node.py``)."""

from __future__ import annotations

import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.k8s import KubeCluster
from tests.support.k8s.cluster import K8S_VERSION

pytestmark = pytest.mark.k8s


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def statefulset(
    name: str, node: str, replicas: int, container: dict[str, Any], volumes: list[Any]
) -> dict[str, Any]:
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
    reader = client.CoreV1Api(
        config.new_client_from_config(str(kube_cluster.kubeconfig_for_token(token, tmp_path / "kc")))
    )
    with pytest.raises(ApiException) as denied:
        reader.list_namespaced_pod(ns)
    assert denied.value.status == 403

    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(
        ns,
        {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "pod-reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns}],
        },
    )

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
    core.create_namespaced_service(
        ns,
        {
            "metadata": {"name": "web"},
            "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 80}]},
        },
    )
    container = {"name": "web", "image": "example.invalid/web:1", "command": ["python", "-m", "http.server"]}
    apps.create_namespaced_stateful_set(ns, statefulset("web", node, 2, container, []))

    wait_for(
        lambda: apps.read_namespaced_stateful_set("web", ns).status.ready_replicas == 2,
        30,
        "2 ready replicas",
    )
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
