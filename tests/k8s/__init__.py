"""Kubernetes: a real control plane and a real node built by ``scripts/k8s-build`` (slow; one node per machine)."""
