"""Pytest fixtures for the local Kubernetes control plane.

Import them into ``tests/conftest.py``::

    from tests.support.k8s.fixtures import k8s_namespace, k8s_node, kube_cluster  # noqa: E402, F401

The cluster is shared by the session: pin pods to your own node (nodeSelector ``kubernetes.io/hostname``) and
use ``k8s_namespace`` so nothing a test leaves behind lands on a later test's node. ``k8s_node`` is the one real
node (kubelet + containerd) of the session: pin pods to it with the nodeSelector ``loom-test/node: real``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.k8s.cluster import KubeCluster, build_binaries
from tests.support.k8s.images import busybox_image
from tests.support.k8s.node import RealNode, build_node_binaries


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
def k8s_namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    """A fresh namespace (``t-<hex>``), deleted (without waiting) after the test."""
    name = kube_cluster.create_namespace(f"t-{uuid.uuid4().hex[:8]}")
    yield name
    kube_cluster.delete_namespace(name)


# The session's real node, shared even if this fixture is registered twice (conftest and a test module import it):
# only one kubelet can run on the machine, so a second registration gets the same node, and the last user closes it.
_NODE: dict[str, Any] = {"node": None, "users": 0}


@pytest.fixture(scope="session")
def k8s_node(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    """The session's real node: kubelet + containerd + runc + a CNI bridge + CoreDNS (``RealNode``), labelled
    ``loom-test/node=real``, with the busybox test image (``images.BUSYBOX_IMAGE``) imported.

    Builds what is missing first (``scripts/k8s-build``: the node's binaries take 6 to 14 min cold on 2 cores). A failed build or start
    fails the test with the build log's tail or the node's logs; it never skips. Its teardown verifies that
    nothing is left on the machine (``RealNode.close`` raises, which shows as an error of the last test).
    """
    if _NODE["node"] is not None and _NODE["node"].cluster is kube_cluster:
        _NODE["users"] += 1
        try:
            yield _NODE["node"]
        finally:
            _release_node()
        return
    try:
        build_node_binaries(tmp_path_factory.mktemp("k8s-node-build") / "k8s-build.log")
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    workdir = tmp_path_factory.mktemp("k8s-node")
    node = RealNode(kube_cluster, workdir)
    try:
        node.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        node.import_image(busybox_image(workdir / "busybox.tar"))
    except Exception as e:  # noqa: BLE001 - fail with the node's state, after tearing it down
        detail = node.describe()
        node.close()
        pytest.fail(f"importing the busybox image failed: {e}\n{detail}", pytrace=False)
    _NODE.update(node=node, users=1)
    try:
        yield node
    finally:
        _release_node()


def _release_node() -> None:
    """The last user of the session's node closes it (``close`` raises if anything is left)."""
    _NODE["users"] -= 1
    if _NODE["users"] == 0:
        node, _NODE["node"] = _NODE["node"], None
        node.close()
