"""Launchers run a flow's Bytewax job somewhere and report on it: local processes today; the
``Launcher`` interface leaves room for Kubernetes or any other place a long-running job can live."""

from loom_dagster.launchers.base import (
    JobProcess,
    JobState,
    LaunchedJob,
    Launcher,
    LaunchRequest,
)
from loom_dagster.launchers.local import LocalProcessLauncher

__all__ = ["JobProcess", "JobState", "LaunchRequest", "LaunchedJob", "Launcher", "LocalProcessLauncher"]
