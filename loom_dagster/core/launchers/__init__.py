"""Launchers run a flow's Bytewax job somewhere and report on it: local processes by default, or a
StatefulSet per flow on Kubernetes; the ``Launcher`` interface leaves room for any other place a
long-running job can live.

This package's names are the launcher API a custom launcher needs (the interface, its records, the
registry); ``LocalProcessLauncher`` and ``KubernetesLauncher`` are imported on first use, so importing
the interface loads neither.

A deployment record names its launcher; tools that rebuild it from the record (the ``loom-dagster``
CLI) build only the built-in launchers and those registered under the entry point group
``loom_dagster.launchers`` (``register_launcher`` in one process): a record is data, never code.
"""

from typing import TYPE_CHECKING, Any

from loom_dagster.core.deploy.launch_records import (
    LOCAL_LAUNCHER,
    JobProcess,
    JobReport,
    JobState,
    LaunchedJob,
    LauncherRef,
    LaunchRequest,
    RuntimeProcess,
)
from loom_dagster.core.launchers.base import Launcher
from loom_dagster.core.launchers.registry import (
    LAUNCHER_ENTRY_POINT_GROUP,
    UnregisteredLauncherWarning,
    launcher_from_record,
    load_launcher,
    register_launcher,
    registered_launchers,
)

if TYPE_CHECKING:
    from loom_dagster.core.launchers.kubernetes.launcher import KubernetesLauncher
    from loom_dagster.core.launchers.local import LocalProcessLauncher

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
        from loom_dagster.core.launchers.local import LocalProcessLauncher

        return LocalProcessLauncher
    if name == "KubernetesLauncher":
        from loom_dagster.core.launchers.kubernetes.launcher import KubernetesLauncher

        return KubernetesLauncher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
