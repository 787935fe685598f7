"""The ``Launcher`` interface and the records it exchanges with the deployer."""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


@dataclass(frozen=True)
class LaunchRequest:
    """Everything needed to start one flow's job; no secrets (those come from env or config files)."""

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

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form, for deployment records."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LaunchRequest:
        """Inverse of ``to_json``."""
        data = dict(data)
        for key in ("config_files", "sys_path"):
            data[key] = tuple(data.get(key) or ())
        data["env"] = tuple(tuple(pair) for pair in data.get("env") or ())
        return cls(**data)


@dataclass(frozen=True)
class JobProcess:
    """One process of a job: PID plus start time (so a reused PID is never mistaken for it)."""

    pid: int
    start_ticks: int
    process_id: int = 0
    status_path: str = ""
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class LaunchedJob:
    """A job the launcher started: where it runs, how to find its processes, logs and status."""

    flow_name: str
    launcher: str
    host: str
    processes: tuple[JobProcess, ...]
    log_path: str
    started_at: float
    request: LaunchRequest
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form, for deployment records."""
        data = asdict(self)
        data["request"] = self.request.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LaunchedJob:
        """Inverse of ``to_json``."""
        procs = tuple(
            JobProcess(**{**p, "argv": tuple(p.get("argv") or ())}) for p in data.get("processes") or ()
        )
        return cls(
            flow_name=data["flow_name"],
            launcher=data["launcher"],
            host=data["host"],
            processes=procs,
            log_path=data["log_path"],
            started_at=float(data["started_at"]),
            request=LaunchRequest.from_json(data["request"]),
            extra=dict(data.get("extra") or {}),
        )


class JobState(StrEnum):
    """What a launcher can say about a job."""

    STARTING = "starting"
    HEALTHY = "healthy"
    DEAD = "dead"
    HUNG = "hung"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class JobReport:
    """A launcher's view of a job: its state, why, and the job's own status record(s)."""

    state: JobState
    reason: str
    alive_processes: int
    statuses: tuple[dict[str, Any], ...] = ()


class Launcher(abc.ABC):
    """Starts, inspects and stops a flow's long-running job.

    A launcher owns *where* a job runs. Deploy/redeploy/rollback logic lives in the deployer and is
    the same for every launcher.
    """

    name: str = "launcher"

    @abc.abstractmethod
    def launch(self, request: LaunchRequest, log_dir: str) -> LaunchedJob:
        """Start the job detached from the caller and return how to find it."""

    @abc.abstractmethod
    def report(self, job: LaunchedJob) -> JobReport:
        """Current state of a launched job."""

    @abc.abstractmethod
    def stop(self, job: LaunchedJob, timeout_s: float) -> float:
        """Drain the job gracefully; kill it after *timeout_s*. Returns the seconds it took."""

    @abc.abstractmethod
    def preflight(self, request: LaunchRequest, timeout_s: float) -> None:
        """Check, without touching a running job, that the new version imports and compiles where it
        will run. Raises ``DeploymentError`` with the reason."""
