"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
KWOK, built from source by ``scripts/k8s-build`` and run as local processes; plus a kubelet stand-in that runs
pod commands as local processes."""

from tests.support.k8s.cluster import KubeCluster, build_binaries
from tests.support.k8s.kubelet import KubeletStandIn

__all__ = ["KubeCluster", "KubeletStandIn", "build_binaries"]
