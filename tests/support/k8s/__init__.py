"""A real Kubernetes cluster for tests: a control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler) with KWOK fake nodes for API-only tests, and a real node (kubelet, containerd, runc, a CNI
bridge, CoreDNS) where pods must run; all built from source by ``scripts/k8s-build`` and run as local
processes."""

from tests.support.k8s.cluster import KubeCluster, build_binaries
from tests.support.k8s.node import RealNode

__all__ = ["KubeCluster", "RealNode", "build_binaries"]
