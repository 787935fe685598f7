"""A namespace of the test control plane set up as a user would: the launcher's service account bound to
exactly the shipped Role (``loom_dagster/core/launchers/kubernetes/rbac.yaml``), a kubeconfig with its token,
and the deploy resource on the ``kubernetes`` launcher."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loom_dagster.cli.manifests import rbac_role
from loom_dagster.core.launchers.kubernetes.launcher import KubernetesLauncher
from loom_dagster.resource import LoomDeployResource
from tests.support.deploy_env import DeployBench, bench_fixture
from tests.support.k8s.cluster import REPO_ROOT, KubeCluster

SERVICE_ACCOUNT = "loom-launcher"


@dataclass
class KubeEnv:
    """One test's namespace, its launcher credentials and the settings of its launcher."""

    cluster: KubeCluster
    namespace: str
    kubeconfig: Path
    bench: DeployBench | None = None

    def launcher_config(self, **overrides: Any) -> dict[str, Any]:
        """The launcher's settings: this namespace, the Role-bound kubeconfig, the repo as the image's code."""
        config: dict[str, Any] = {
            "namespace": self.namespace,
            "kubeconfig": str(self.kubeconfig),
            "python": "python",
            "working_dir": str(REPO_ROOT),
            "python_path": str(REPO_ROOT),
            "drain_timeout_s": 20,
            "pod": {"image": "loom-dagster-job:test", "node_selector": {"loom-test": self.namespace}},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        return config

    def resource(self, **overrides: Any) -> LoomDeployResource:
        """The deploy resource on the kubernetes launcher (health gate *health_timeout_s*, default 60 s).

        ``preflight`` defaults to off here: a KWOK node never runs (so never ends) the preflight pod.
        The tests on the real node (``test_k8s_real_node.py``) preflight for real.
        """
        overrides.setdefault("preflight", False)
        launcher_config = self.launcher_config(**overrides.pop("launcher_config", {}))
        assert self.bench is not None, "a KubeEnv made without a deploy bench"
        return self.bench.resource(launcher="kubernetes", launcher_config=launcher_config, **overrides)

    def launcher(self, **overrides: Any) -> KubernetesLauncher:
        """A launcher built as the resource builds it."""
        return KubernetesLauncher(**self.launcher_config(**overrides))

    def in_cluster_cli(
        self, state_dir: Path, *args: str, timeout_s: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``loom-dagster *args`` as a pod would: the service account's token and CA mounted at
        ``/var/run/secrets/kubernetes.io/serviceaccount`` (a tmpfs over ``/run`` in a mount namespace of
        its own, invisible to this host), ``KUBERNETES_SERVICE_HOST``/``PORT`` set, no kubeconfig."""
        account = state_dir / "serviceaccount"
        account.mkdir(parents=True, exist_ok=True)
        user = yaml.safe_load(self.kubeconfig.read_text())["users"][0]["user"]
        (account / "token").write_text(user["token"])
        (account / "ca.crt").write_bytes(self.cluster.ca_path.read_bytes())
        (account / "namespace").write_text(self.namespace)
        mounted = "/var/run/secrets/kubernetes.io/serviceaccount"
        script = f'mount -t tmpfs tmpfs /run && mkdir -p {mounted} && cp "$0"/* {mounted}/ && exec "$@"'
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "HOME")}
        env.update(
            KUBERNETES_SERVICE_HOST="127.0.0.1",
            KUBERNETES_SERVICE_PORT=str(self.cluster.ports["apiserver"]),
            HOME=str(state_dir),  # no ~/.kube/config to fall back on
        )
        exe = str(Path(sys.executable).with_name("loom-dagster"))
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(account)]
        return subprocess.run(
            [*argv, exe, "--state-dir", str(state_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=REPO_ROOT,
            env=env,
        )

    def admin(self) -> Any:
        """Admin ``AppsV1Api`` and ``CoreV1Api`` (for assertions and out-of-band changes)."""
        from kubernetes import client

        api = self.cluster.api_client()
        return client.AppsV1Api(api), client.CoreV1Api(api)


def role_manifest(drop: tuple[str, str] | None = None) -> dict[str, Any]:
    """The shipped Role; *drop* = (resource, verb) removes one verb (to show the error without it)."""
    role = copy.deepcopy(yaml.safe_load(rbac_role()))
    if drop is not None:
        resource, verb = drop
        for rule in role["rules"]:
            if resource in rule["resources"] and verb in rule["verbs"]:
                rule["verbs"] = [v for v in rule["verbs"] if v != verb]
    return role


def make_env(
    cluster: KubeCluster, bench: DeployBench | None, directory: Path, drop: tuple[str, str] | None = None
) -> KubeEnv:
    """A fresh namespace, a service account bound to the shipped Role (minus *drop*), its kubeconfig."""
    from kubernetes import client

    namespace = cluster.create_namespace(f"t-{uuid.uuid4().hex[:10]}")
    rbac = client.RbacAuthorizationV1Api(cluster.api_client())
    role = role_manifest(drop)
    rbac.create_namespaced_role(namespace, role)
    token = cluster.token_for(namespace, SERVICE_ACCOUNT)
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "loom-launcher"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": role["metadata"]["name"],
            },
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}],
        },
    )
    kubeconfig = cluster.kubeconfig_for_token(token, directory / f"{namespace}.kubeconfig", namespace)
    return KubeEnv(cluster, namespace, kubeconfig, bench)


@contextmanager
def kube_bench(
    cluster: KubeCluster, kafka: Any, directory: Path, prefix: str, drop: tuple[str, str] | None = None
) -> Iterator[KubeEnv]:
    """A deploy bench (topics, config) in a fresh namespace of *cluster*; stops what it launched after."""
    for bench in bench_fixture(kafka, directory, prefix):
        yield make_env(cluster, bench, directory, drop)


@contextmanager
def kwok_bench(cluster: KubeCluster, kafka: Any, directory: Path, prefix: str) -> Iterator[KubeEnv]:
    """:func:`kube_bench` with a KWOK node of the namespace's own (``loom-test=<namespace>``, where the
    launcher config pins pods): API-only tests, where no pod must run."""
    with kube_bench(cluster, kafka, directory, prefix) as env:
        cluster.add_fake_node(f"kwok-{env.namespace}", labels={"loom-test": env.namespace})
        yield env
