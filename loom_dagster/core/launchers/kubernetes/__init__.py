"""The Kubernetes launcher: a StatefulSet per flow, state in the cluster (see ``launcher``).

``KubernetesLauncher`` and ``KubernetesSettings`` are imported on first use: the official client is a
large import that a location on the local launcher never needs.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loom_dagster.core.launchers.kubernetes.launcher import KubernetesLauncher
    from loom_dagster.core.launchers.kubernetes.settings import KubernetesSettings, PodSettings

__all__ = ["KubernetesLauncher", "KubernetesSettings", "PodSettings"]


def __getattr__(name: str) -> Any:
    if name == "KubernetesLauncher":
        from loom_dagster.core.launchers.kubernetes.launcher import KubernetesLauncher

        return KubernetesLauncher
    if name in ("KubernetesSettings", "PodSettings"):
        from loom_dagster.core.launchers.kubernetes import settings

        return getattr(settings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
