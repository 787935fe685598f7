"""The ``Launcher`` interface and the records it exchanges with the deployer.

The records are frozen ``msgspec`` structs: a deployment record is their JSON form
(``msgspec.json.encode``), and records written before they were structs load unchanged.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import sys
from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from loom_dagster.errors import DeploymentError

if TYPE_CHECKING:
    from loom_dagster.deployments import DeploymentStore

LOCAL_LAUNCHER = "local"
"""Alias of :data:`LOCAL_LAUNCHER_PATH` in a resource's ``launcher`` field and in records."""
LOCAL_LAUNCHER_PATH = "loom_dagster.launchers.local:LocalProcessLauncher"
KUBERNETES_LAUNCHER = "kubernetes"
"""Alias of :data:`KUBERNETES_LAUNCHER_PATH`."""
KUBERNETES_LAUNCHER_PATH = "loom_dagster.launchers.kubernetes.launcher:KubernetesLauncher"
_ALIASES = {LOCAL_LAUNCHER: LOCAL_LAUNCHER_PATH, KUBERNETES_LAUNCHER: KUBERNETES_LAUNCHER_PATH}


class LaunchRequest(msgspec.Struct, frozen=True):
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

    ``path`` is ``local`` or ``package.module:Class``; ``config`` its JSON-safe keyword arguments;
    ``sys_path`` the directory the class was imported from (tried when it does not import as is).

    Example:
        >>> LauncherRef().build().name
        'local'
    """

    path: str = LOCAL_LAUNCHER
    config: dict[str, Any] = {}
    sys_path: tuple[str, ...] = ()

    def build(self) -> Launcher:
        """The launcher, constructed with ``config``; ``DeploymentError`` when it cannot be."""
        return load_launcher(self.path, self.config, self.sys_path)

    def same_class(self, launcher: Launcher) -> bool:
        """True when *launcher* is an instance of the class this reference names."""
        return canonical_path(self.path) == class_path(type(launcher))


class Launcher(abc.ABC):
    """Starts, inspects and stops a flow's long-running job.

    A launcher owns *where* a job runs and every fact about that place (process table, host name,
    log files). Deploy/redeploy/rollback logic lives in the deployer and is the same for every
    launcher. A launcher is built from JSON-safe keyword arguments (``config()`` returns them), so a
    deployment record can name it (``ref()``) and the CLI can build it again.
    """

    name: str = "launcher"

    @abc.abstractmethod
    def launch(self, request: LaunchRequest, log_dir: str) -> LaunchedJob:
        """Start the job detached from the caller and return how to find it."""

    @abc.abstractmethod
    def report(self, job: LaunchedJob) -> JobReport:
        """Current state of a launched job."""

    @contextlib.contextmanager
    def observation(self) -> Iterator[None]:
        """Within it, ``report`` and ``uptime`` may share one read of where the jobs run, as a health
        tick reports every flow at once (default: nothing to share)."""
        yield

    @abc.abstractmethod
    def stop(self, job: LaunchedJob, timeout_s: float) -> float:
        """Drain the job gracefully; kill it after *timeout_s*. Returns the seconds it took."""

    @abc.abstractmethod
    def preflight(self, request: LaunchRequest, timeout_s: float) -> None:
        """Check, without touching a running job, that the new version imports and compiles where it
        will run. Raises ``DeploymentError`` with the reason."""

    def relaunch(self, job: LaunchedJob, log_dir: str) -> LaunchedJob:
        """Start a recorded job again as it was (restart, rollback). Default: ``launch`` its request; a
        launcher whose job depends on more than the request (a pod template) starts that again too."""
        return self.launch(job.request, log_dir)

    def config(self) -> dict[str, Any]:
        """The JSON-safe keyword arguments that build this launcher again (default: none)."""
        return {}

    def ref(self) -> LauncherRef:
        """How a deployment record names this launcher."""
        cls = type(self)
        return LauncherRef(class_path(cls), self.config(), _module_root(cls.__module__))

    def deployment_store(self, state_dir: str | None = None) -> DeploymentStore:
        """Where deployments run by this launcher are recorded (default: files under *state_dir*)."""
        from loom_dagster.deployments import DeploymentStore

        return DeploymentStore(state_dir)

    def owns(self, job: LaunchedJob) -> bool:
        """Whether this launcher, from where it runs, can inspect and stop *job* (default: yes)."""
        return True

    def location(self) -> str:
        """Where this launcher runs jobs, for messages (default: its name)."""
        return self.name

    def uptime(self, job: LaunchedJob) -> float | None:
        """Seconds the job's youngest live process has run; ``None`` when none runs or unknown."""
        return None

    def logs(self, job: LaunchedJob, lines: int = 40) -> str:
        """The last *lines* lines of the job's log, secrets redacted (default: none)."""
        return ""

    def follow_logs(self, job: LaunchedJob) -> Iterator[str]:
        """The lines appended to the job's log from now on, redacted, until interrupted."""
        raise DeploymentError(f"the {self.name!r} launcher cannot follow a job's log")

    def runtime_processes(self) -> list[RuntimeProcess]:
        """Every running loom runtime process this launcher can see, recorded or not (orphan
        detection; default: none, so orphans are found from the consumer-group fence only)."""
        return []


def class_path(cls: type) -> str:
    """``module:QualifiedName`` of a class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def canonical_path(path: str) -> str:
    """*path* with the ``local`` / ``kubernetes`` alias expanded."""
    return _ALIASES.get(path, path)


def load_launcher(
    path: str, config: Mapping[str, Any] | None = None, sys_path: tuple[str, ...] = ()
) -> Launcher:
    """Build the launcher ``path`` names (``local`` or ``package.module:Class``) with *config* as
    keyword arguments; *sys_path* entries are tried when the module does not import as is.

    Example:
        >>> load_launcher("local", {"heartbeat_timeout_s": 5}).heartbeat_timeout_s
        5
    """
    module_name, _, attribute = canonical_path(path).partition(":")
    if not module_name or not attribute:
        raise DeploymentError(f"launcher {path!r}: expected 'local', 'kubernetes' or 'package.module:Class'")
    cls = getattr(_import(module_name, sys_path, path), attribute, None)
    if not isinstance(cls, type) or not issubclass(cls, Launcher):
        raise DeploymentError(f"launcher {path!r} is not a Launcher subclass")
    try:
        return cls(**dict(config or {}))
    except TypeError as exc:
        raise DeploymentError(f"launcher {path!r} does not take this config: {exc}") from exc


def _import(module_name: str, sys_path: tuple[str, ...], path: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as first:
        missing = [entry for entry in sys_path if entry not in sys.path]
        if not missing:
            raise DeploymentError(f"launcher {path!r} does not import: {first}") from first
        sys.path[:0] = missing
        try:
            return importlib.import_module(module_name)
        except ImportError as exc:
            raise DeploymentError(f"launcher {path!r} does not import: {exc}") from exc


def _module_root(module_name: str) -> tuple[str, ...]:
    """The sys.path entry *module_name* was imported from (empty when unknown)."""
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return ()
    path = Path(file).resolve().parent
    for _ in range(module_name.count(".") + (1 if Path(file).name == "__init__.py" else 0)):
        path = path.parent
    return (str(path),)
