"""The pods the launcher makes pass the ``restricted`` Pod Security level, as the real API server's admission
judges them (a server-side dry run in a namespace labelled ``enforce=restricted``): the job's pod template
and the preflight pod. The real node runs them (``test_k8s_real_node.py``); this asks only the admission."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from loom_dagster.core.launchers.kubernetes.manifests import preflight_pod_manifest, statefulset_manifest
from loom_dagster.core.launchers.kubernetes.settings import KubernetesSettings
from tests.core.launchers.test_kubernetes_manifests import request
from tests.support.k8s import KubeCluster

ENFORCE = "pod-security.kubernetes.io/enforce"


@pytest.fixture()
def restricted_namespace(kube_cluster: KubeCluster, k8s_namespace: str) -> Iterator[str]:
    kube_cluster.core().patch_namespace(
        k8s_namespace, {"metadata": {"labels": {ENFORCE: "restricted", f"{ENFORCE}-version": "latest"}}}
    )
    yield k8s_namespace


def _admit(kube_cluster: KubeCluster, namespace: str, pod: dict[str, Any]) -> None:
    """Create *pod* as a server-side dry run: every admission plugin judges it, nothing is stored."""
    kube_cluster.core().create_namespaced_pod(namespace, pod, dry_run="All")


def _template_pod(settings: KubernetesSettings, name: str) -> dict[str, Any]:
    template = statefulset_manifest(settings, request(processes=2))["spec"]["template"]
    metadata = {**template["metadata"], "name": name}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def test_job_and_preflight_pods_are_admitted_by_a_restricted_namespace(
    kube_cluster: KubeCluster, restricted_namespace: str
) -> None:
    settings = KubernetesSettings.from_config(
        {"namespace": restricted_namespace, "pod": {"image": "flows:1"}}
    )
    _admit(kube_cluster, restricted_namespace, _template_pod(settings, "job-0"))
    _admit(
        kube_cluster,
        restricted_namespace,
        preflight_pod_manifest(settings, request(processes=2), "pre", 60, 10),
    )


def test_an_override_that_weakens_the_pod_is_refused_by_the_namespace_naming_the_rule(
    kube_cluster: KubeCluster, restricted_namespace: str
) -> None:
    """The check is real: the same namespace refuses a pod whose override allows privilege escalation."""
    from kubernetes.client.exceptions import ApiException

    settings = KubernetesSettings.from_config(
        {
            "namespace": restricted_namespace,
            "pod": {"image": "flows:1", "container_security_context": {"allowPrivilegeEscalation": True}},
        }
    )
    with pytest.raises(ApiException) as refused:
        _admit(kube_cluster, restricted_namespace, _template_pod(settings, "job-0"))
    assert refused.value.status == 403
    assert "violates PodSecurity" in refused.value.body and "allowPrivilegeEscalation" in refused.value.body
