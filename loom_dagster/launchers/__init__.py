"""Launchers run a flow's Bytewax job somewhere and report on it: local processes by default, or a
StatefulSet per flow on Kubernetes; the ``Launcher`` interface leaves room for any other place a
long-running job can live.

``LocalProcessLauncher`` is imported on first use (``loom_dagster.launchers.local`` imports this
package back), so importing the interface never loads the local launcher.

A deployment record names its launcher; tools that rebuild it from the record (the ``loom-dagster``
CLI) build only the built-in launchers and those registered under the entry point group
``loom_dagster.launchers`` (``register_launcher`` in one process): a record is data, never code.
"""

from typing import TYPE_CHECKING, Any

from loom_dagster.launchers.base import (
    LAUNCHER_ENTRY_POINT_GROUP,
    LOCAL_LAUNCHER,
    JobProcess,
    JobReport,
    JobState,
    LaunchedJob,
    Launcher,
    LauncherRef,
    LaunchRequest,
    RuntimeProcess,
    UnregisteredLauncherWarning,
    launcher_from_record,
    load_launcher,
    register_launcher,
    registered_launchers,
)

if TYPE_CHECKING:
    from loom_dagster.launchers.kubernetes.launcher import KubernetesLauncher
    from loom_dagster.launchers.local import LocalProcessLauncher

__all__ = [
    "LAUNCHER_ENTRY_POINT_GROUP",
    "LOCAL_LAUNCHER",
    "JobProcess",
    "JobReport",
    "JobState",
    "KubernetesLauncher",
    "LaunchRequest",
    "LaunchedJob",
    "Launcher",
    "LauncherRef",
    "LocalProcessLauncher",
    "RuntimeProcess",
    "UnregisteredLauncherWarning",
    "launcher_from_record",
    "load_launcher",
    "register_launcher",
    "registered_launchers",
]


def __getattr__(name: str) -> Any:
    if name == "LocalProcessLauncher":
        from loom_dagster.launchers.local import LocalProcessLauncher

        return LocalProcessLauncher
    if name == "KubernetesLauncher":
        from loom_dagster.launchers.kubernetes.launcher import KubernetesLauncher

        return KubernetesLauncher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
