"""The Kubernetes API clients of the launcher and its store (the official ``kubernetes`` package).

Each launcher gets its own ``Configuration`` (never the module-global default): a code location may
talk to two clusters, and tests build several clients side by side.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.launchers.kubernetes.settings import KubernetesSettings


@dataclass
class KubeApi:
    """Core, apps and coordination APIs over one ``ApiClient``.

    Example:
        >>> KubeApi.connect(KubernetesSettings(kubeconfig="/nonexistent"))  # doctest: +SKIP
    """

    client: Any

    @classmethod
    def connect(cls, settings: KubernetesSettings) -> KubeApi:
        """A client for the cluster *settings* name: in-cluster config, else the kubeconfig file."""
        from kubernetes import client, config

        configuration = client.Configuration()
        in_cluster = settings.in_cluster
        if in_cluster is None:
            in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not settings.kubeconfig
        try:
            if in_cluster:
                config.load_incluster_config(client_configuration=configuration)
            else:
                config.load_kube_config(
                    config_file=settings.kubeconfig,
                    context=settings.context,
                    client_configuration=configuration,
                )
        except Exception as exc:  # ConfigException, FileNotFoundError, YAML errors
            where = (
                "the in-cluster service account"
                if in_cluster
                else (settings.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config")
            )
            raise DeploymentError(
                f"cannot configure a Kubernetes client from {where}: {exc}. Set the launcher's "
                "'kubeconfig' (and 'context'), or run inside the cluster."
            ) from exc
        return cls(client.ApiClient(configuration))

    @cached_property
    def core(self) -> Any:
        """``CoreV1Api``: pods, ConfigMaps, Services."""
        from kubernetes import client

        return client.CoreV1Api(self.client)

    @cached_property
    def apps(self) -> Any:
        """``AppsV1Api``: StatefulSets."""
        from kubernetes import client

        return client.AppsV1Api(self.client)

    @cached_property
    def coordination(self) -> Any:
        """``CoordinationV1Api``: the deploy lock's Lease."""
        from kubernetes import client

        return client.CoordinationV1Api(self.client)

    @cached_property
    def networking(self) -> Any:
        """``NetworkingV1Api``: a flow's NetworkPolicy."""
        from kubernetes import client

        return client.NetworkingV1Api(self.client)

    @property
    def server(self) -> str:
        """The API server's URL."""
        return str(self.client.configuration.host)


def api_error(exc: Exception, doing: str) -> DeploymentError:
    """A clear error for a failed API call: the verb and resource it needed when it is a 403."""
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", "") or type(exc).__name__
    body = getattr(exc, "body", None)
    message = ""
    if body:
        try:
            import json

            message = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            message = str(body)[:500]
    text = f"Kubernetes API refused to {doing}: {status} {reason}" + (f": {message}" if message else "")
    if status == 403:
        text += (
            ". The launcher's service account lacks a permission: grant the Role shipped as "
            "loom_dagster/core/launchers/kubernetes/rbac.yaml (`loom-dagster manifests --rbac`)."
        )
    elif status is None:
        text = f"cannot reach the Kubernetes API to {doing}: {exc}"
    return DeploymentError(text)


def is_not_found(exc: Exception) -> bool:
    """True for a 404 from the API."""
    return getattr(exc, "status", None) == 404


def is_conflict(exc: Exception) -> bool:
    """True for a 409 (already exists / resourceVersion changed)."""
    return getattr(exc, "status", None) == 409
