"""The records a launcher and the deployer exchange: what to launch, what was launched, what it reports,
and which launcher ran it.

Frozen ``msgspec`` structs: a deployment record is their JSON form (``msgspec.json.encode``), and
records written before they were structs load unchanged. They sit below the launchers and the
deployment store, so both use them without importing each other. A ``LauncherRef`` is data: only
:func:`loom_dagster.core.launchers.registry.launcher_from_ref` builds a launcher from one, from an
allow-list.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgspec

from loom_dagster.core.errors import DeploymentError

LOCAL_LAUNCHER = "local"
"""The local launcher's registered name (a ``LauncherRef``'s default)."""


class LaunchRequest(msgspec.Struct, frozen=True):
    """Everything needed to start one flow's job; no secrets in its argv (those come from env or
    config files).

    ``env`` is the flow's extra environment (``LoomFlowSpec.env``, where secrets may go). A stored
    record never holds its values: ``env_ref`` then says where they are kept (``file:env/<id>.json``
    under the flow's directory of the local store, read back with the record; ``Secret/<name>``, a
    Kubernetes Secret the pods reference) and ``env`` keeps the names with empty values. The repr shows
    names only.
    """

    flow_name: str
    import_path: str
    config_files: tuple[str, ...]
    environment: str
    plan_hash: str
    config_hash: str
    processes: int = 1
    workers_per_process: int = 1
    sys_path: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    run_id: str | None = None
    cwd: str | None = None
    env_ref: str = ""

    def __repr__(self) -> str:
        fields = {name: getattr(self, name) for name in self.__struct_fields__}
        fields["env"] = tuple((key, "***") for key, _ in self.env)
        return f"LaunchRequest({', '.join(f'{k}={v!r}' for k, v in fields.items())})"

    def job_env(self) -> dict[str, str]:
        """The env values to start the job with; ``DeploymentError`` when they are kept elsewhere
        (``env_ref``) and were not read back (the file or Secret is gone)."""
        if self.env_ref:
            raise DeploymentError(
                f"the env values of flow {self.flow_name!r} ({', '.join(k for k, _ in self.env)}) are kept "
                f"in {self.env_ref!r}, which could not be read back here; nothing was started. Materialize "
                "the flow to deploy it again with its env."
            )
        return dict(self.env)


class JobProcess(msgspec.Struct, frozen=True):
    """One process of a job: PID plus start time (so a reused PID is never mistaken for it).

    ``host`` is set where a process has a host of its own (a Kubernetes pod: its name, with ``pid`` 0,
    unknown from outside); empty means the job's host."""

    pid: int
    start_ticks: int
    process_id: int = 0
    status_path: str = ""
    argv: tuple[str, ...] = ()
    host: str = ""


class LaunchedJob(msgspec.Struct, frozen=True):
    """A job the launcher started: where it runs, how to find its processes, logs and status."""

    flow_name: str
    launcher: str
    host: str
    processes: tuple[JobProcess, ...]
    log_path: str
    started_at: float
    request: LaunchRequest
    extra: dict[str, Any] = {}

    @property
    def processes_text(self) -> str:
        """``pids 12, 13``, or ``pods orders-0, orders-1`` where processes are known by host."""
        if self.processes and all(p.host and not p.pid for p in self.processes):
            return "pods " + ", ".join(p.host for p in self.processes)
        return "pids " + ", ".join(str(p.pid) for p in self.processes)


class JobState(StrEnum):
    """What a launcher can say about a job."""

    STARTING = "starting"
    HEALTHY = "healthy"
    DEAD = "dead"
    HUNG = "hung"
    UNKNOWN = "unknown"


class JobReport(msgspec.Struct, frozen=True):
    """A launcher's view of a job: its state, why, and the job's own status record(s)."""

    state: JobState
    reason: str
    alive_processes: int
    statuses: tuple[dict[str, Any], ...] = ()
    self_healing: bool = False
    """The platform restarts the job's crashed processes itself (Kubernetes): the health sensor reports
    a failure but relaunches nothing."""


class RuntimeProcess(msgspec.Struct, frozen=True):
    """A running ``python -m loom_dagster.runtime`` process a launcher can see (orphan detection)."""

    pid: int
    start_ticks: int
    flow_name: str | None
    status_file: str | None
    run_id: str | None
    host: str = ""


class LauncherRef(msgspec.Struct, frozen=True):
    """Which launcher ran a job, recorded with the deployment so a tool without the Dagster resource
    (the ``loom-dagster`` CLI) builds the same launcher again.

    ``path`` is the launcher's registered name (``local``, ``kubernetes``, an entry point's name) or,
    in records of launchers that were not registered, ``package.module:Class``; ``config`` its JSON-safe
    keyword arguments. ``sys_path`` is read from older records and ignored: a record never decides
    what is imported (:func:`launcher_from_record`).

    Example:
        >>> LauncherRef().path
        'local'
    """

    path: str = LOCAL_LAUNCHER
    config: dict[str, Any] = {}
    sys_path: tuple[str, ...] = ()
