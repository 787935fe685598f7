"""Pytest fixtures for the local Kubernetes control plane.

Import them into ``tests/conftest.py``::

    from tests.support.k8s.fixtures import k8s_namespace, kube_cluster, kubelet_standin  # noqa: E402, F401

The cluster is shared by the session: pin pods to your own node (nodeSelector ``kubernetes.io/hostname``) and
use ``k8s_namespace`` so nothing a test leaves behind lands on a later test's node.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.support.k8s.cluster import REPO_ROOT, KubeCluster, build_binaries
from tests.support.k8s.kubelet import KubeletStandIn


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    """A real control plane (etcd, apiserver, controller-manager, scheduler, KWOK) for the session.

    Builds the binaries first if they are not cached (``scripts/k8s-build``: 8 min cold on an idle 2-core
    machine, 25 min on a busy one, which is more than pytest's 600 s timeout: run the script before pytest in
    CI). A failed build fails the test with the build log's tail; it never skips.
    """
    try:
        bin_dir = build_binaries(tmp_path_factory.mktemp("k8s-build") / "k8s-build.log")
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    with KubeCluster(bin_dir=bin_dir, workdir=tmp_path_factory.mktemp("k8s-cluster")) as cluster:
        yield cluster


@pytest.fixture()
def kubelet_standin(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeletStandIn]:
    """A fresh stand-in node (``standin-<hex>``) running pods with this venv's python and the repo on PYTHONPATH."""
    node = f"standin-{uuid.uuid4().hex[:8]}"
    kubelet = KubeletStandIn(
        kube_cluster.api_client(),
        node,
        tmp_path_factory.mktemp(node),
        python=sys.executable,
        extra_env={"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"},
        probe_period_cap=1.0,
    )
    with kubelet:
        yield kubelet


@pytest.fixture()
def k8s_namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    """A fresh namespace (``t-<hex>``), deleted (without waiting) after the test."""
    name = kube_cluster.create_namespace(f"t-{uuid.uuid4().hex[:8]}")
    yield name
    kube_cluster.delete_namespace(name)
