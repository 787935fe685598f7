"""The ``Launcher`` interface and the records it exchanges with the deployer.

The records are frozen ``msgspec`` structs: a deployment record is their JSON form
(``msgspec.json.encode``), and records written before they were structs load unchanged.

A record is data, never code: the launcher a record names (:class:`LauncherRef`) is built only from
an allow-list, the built-in launchers (``local``, ``kubernetes``) and those registered under the
Python entry point group :data:`LAUNCHER_ENTRY_POINT_GROUP` (or, in one process, with
:func:`register_launcher`). A record naming anything else is refused; no module named by a record is
ever imported and its ``sys_path`` is never put on ``sys.path``.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import importlib.metadata
import warnings
from collections.abc import Iterator, Mapping
from enum import StrEnum
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
LAUNCHER_ENTRY_POINT_GROUP = "loom_dagster.launchers"
"""The entry point group of the launchers a deployment record (and the CLI) may name: ``name =
"package.module:Class"``."""


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
        >>> LauncherRef().build().name
        'local'
    """

    path: str = LOCAL_LAUNCHER
    config: dict[str, Any] = {}
    sys_path: tuple[str, ...] = ()

    def build(self) -> Launcher:
        """The launcher, constructed with ``config``, if ``path`` names an allowed launcher
        (:func:`launcher_from_record`); ``DeploymentError`` otherwise."""
        return launcher_from_record(self.path, self.config)

    def same_class(self, launcher: Launcher) -> bool:
        """True when *launcher* is an instance of the class this reference names."""
        cls = type(launcher)
        if canonical_path(self.path) == class_path(cls):
            return True
        if ":" in self.path or self.path in _ALIASES:  # another class, or another built-in
            return False
        return registered_name(cls) == self.path


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
    def preflight(self, request: LaunchRequest, timeout_s: float) -> str | None:
        """Check, without touching a running job, that the new version imports and compiles where it
        will run. Raises ``DeploymentError`` with the reason; returns what ran, for the deploy log."""

    def relaunch(self, job: LaunchedJob, log_dir: str) -> LaunchedJob:
        """Start a recorded job again as it was (restart, rollback). Default: ``launch`` its request; a
        launcher whose job depends on more than the request (a pod template) starts that again too."""
        return self.launch(job.request, log_dir)

    def verify_record(self, job: LaunchedJob) -> None:
        """Refuse (``DeploymentError``, nothing started) a recorded *job* whose ``relaunch`` would start
        something no deploy from here produced: a record edited where others can write it. Default:
        nothing to check (the local records live in a private state directory; see ``local``)."""
        return None

    def config(self) -> dict[str, Any]:
        """The JSON-safe keyword arguments that build this launcher again (default: none)."""
        return {}

    def ref(self) -> LauncherRef:
        """How a deployment record names this launcher."""
        cls = type(self)
        return LauncherRef(registered_name(cls) or class_path(cls), self.config())

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


class UnregisteredLauncherWarning(UserWarning):
    """A launcher built from code is not registered: tools that rebuild it from a deployment record
    (the ``loom-dagster`` CLI) will refuse its records."""


_registered: dict[str, type[Launcher]] = {}
_names: dict[type, str] = {}  # registered_name's answers found so far (entry points: a scan is ~10 ms)


def register_launcher(cls: type[Launcher], name: str | None = None) -> str:
    """Allow deployment records naming *cls* (by *name*, default ``cls.name``, or by its
    ``module:Class`` path) to build it in this process; returns the name records will use.

    For every process (the ``loom-dagster`` CLI, the Dagster daemon, run workers), register it instead
    as an entry point of your package, which needs no code to run first::

        [project.entry-points."loom_dagster.launchers"]
        my_launcher = "my_pkg.launchers:MyLauncher"

    Example:
        >>> class Mine(Launcher):  # doctest: +SKIP
        ...     name = "mine"
        >>> register_launcher(Mine)  # doctest: +SKIP
        'mine'
    """
    if not (isinstance(cls, type) and issubclass(cls, Launcher)):
        raise DeploymentError(f"register_launcher: {cls!r} is not a Launcher subclass")
    name = name or cls.name
    if not name or ":" in name:
        raise DeploymentError(f"register_launcher: {name!r} is not a launcher name (no ':' allowed)")
    if name in _ALIASES and _ALIASES[name] != class_path(cls):
        raise DeploymentError(f"register_launcher: {name!r} is a built-in launcher")
    _registered[name] = cls
    _names.pop(cls, None)
    return name


def registered_launchers() -> dict[str, str]:
    """Every launcher a record may name here, ``name -> "module:Class"``: the built-ins, the entry
    points of :data:`LAUNCHER_ENTRY_POINT_GROUP` and :func:`register_launcher`'s (nothing is imported)."""
    found = {ep.name: ep.value for ep in _entry_points() if ep.name not in _ALIASES}
    found.update({name: class_path(cls) for name, cls in _registered.items()})
    return {**found, **_ALIASES}


def registered_name(cls: type) -> str | None:
    """The name *cls* is registered under (``local`` for the local launcher), or ``None``."""
    path = class_path(cls)
    for name, target in _ALIASES.items():
        if target == path:
            return name
    for name, registered in _registered.items():
        if registered is cls:
            return name
    if cls in _names:
        return _names[cls]
    entries = [ep for ep in _entry_points() if ep.name not in _ALIASES]
    found = next((ep.name for ep in entries if _ep_target(ep) == path), None)
    for ep in entries if found is None else ():  # registered under a path that re-exports it
        with contextlib.suppress(Exception):
            if ep.load() is cls:
                found = ep.name
                break
    if found is not None:
        _names[cls] = found
    return found


def launcher_from_record(path: str, config: Mapping[str, Any] | None = None) -> Launcher:
    """Build the launcher a deployment record (or the CLI's ``--launcher``) names, only if it is a
    built-in, an entry point of :data:`LAUNCHER_ENTRY_POINT_GROUP` or registered in this process;
    anything else is refused with ``DeploymentError`` and nothing is imported.

    Example:
        >>> launcher_from_record("local").name
        'local'
    """
    cls = _allowed(path)
    if cls is None:
        known = ", ".join(sorted(registered_launchers()))
        raise DeploymentError(
            f"launcher {path!r} is not a registered launcher: a deployment record (or --launcher) may only "
            f"name one of: {known}. Nothing was imported. To use a custom launcher, register its class "
            f"as an entry point of the package that provides it, in its pyproject.toml: "
            f'[project.entry-points."{LAUNCHER_ENTRY_POINT_GROUP}"] my_launcher = '
            f'"my_pkg.launchers:MyLauncher", and reinstall that package where the records are read '
            f"(or call loom_dagster.launchers.register_launcher(MyLauncher) in the process first)"
        )
    return _construct(cls, path, config)


def load_launcher(path: str, config: Mapping[str, Any] | None = None) -> Launcher:
    """Build the launcher *code* names (a resource's ``launcher``): a registered name (``local``,
    ``kubernetes``, an entry point's name) or ``package.module:Class``, with *config* as keyword
    arguments. Never call it with a path read from a record: use :func:`launcher_from_record`.

    A class that is not registered still builds here, with an :class:`UnregisteredLauncherWarning`:
    the CLI will refuse the records of its jobs until it is registered.

    Example:
        >>> load_launcher("local", {"heartbeat_timeout_s": 5}).heartbeat_timeout_s
        5
    """
    cls = _allowed(path)
    if cls is None:
        module_name, _, attribute = path.partition(":")
        if not module_name or not attribute:
            raise DeploymentError(
                f"launcher {path!r}: expected 'local', 'kubernetes', a registered launcher's name or "
                "'package.module:Class'"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise DeploymentError(f"launcher {path!r} does not import: {exc}") from exc
        found = getattr(module, attribute, None)
        if not isinstance(found, type) or not issubclass(found, Launcher):
            raise DeploymentError(f"launcher {path!r} is not a Launcher subclass")
        cls = found
        if registered_name(cls) is None:
            warnings.warn(
                f"launcher {path!r} is not registered under the entry point group "
                f"{LAUNCHER_ENTRY_POINT_GROUP!r}: the loom-dagster CLI will refuse to build it from the "
                "records of its jobs (status, logs, stop); register it in the pyproject.toml of its package",
                UnregisteredLauncherWarning,
                stacklevel=2,
            )
    return _construct(cls, path, config)


def _construct(cls: type[Launcher], path: str, config: Mapping[str, Any] | None) -> Launcher:
    try:
        return cls(**dict(config or {}))
    except TypeError as exc:
        raise DeploymentError(f"launcher {path!r} does not take this config: {exc}") from exc


def _allowed(path: str) -> type[Launcher] | None:
    """The class of an allowed launcher named *path* (by name or ``module:Class``), or ``None``.

    Built-ins come first and cannot be shadowed; only modules named by this package or by installed
    entry points are imported."""
    path = path.strip()
    builtin = _ALIASES.get(path) or (path if path in _ALIASES.values() else None)
    if builtin is not None:
        module_name, _, attribute = builtin.partition(":")
        return _checked(getattr(importlib.import_module(module_name), attribute), path)
    for name, cls in _registered.items():
        if path in (name, class_path(cls)):
            return cls
    for ep in _entry_points():
        if ep.name not in _ALIASES and path in (ep.name, _ep_target(ep)):
            try:
                loaded = ep.load()
            except Exception as exc:
                raise DeploymentError(
                    f"launcher {path!r} (entry point {ep.name} = {ep.value!r}) does not import: {exc}"
                ) from exc
            return _checked(loaded, path)
    return None


def _checked(found: Any, path: str) -> type[Launcher]:
    if not isinstance(found, type) or not issubclass(found, Launcher):
        raise DeploymentError(f"launcher {path!r} is not a Launcher subclass")
    return found


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The entry points of :data:`LAUNCHER_ENTRY_POINT_GROUP` (installed metadata only; imports nothing)."""
    return list(importlib.metadata.entry_points(group=LAUNCHER_ENTRY_POINT_GROUP))


def _ep_target(ep: importlib.metadata.EntryPoint) -> str:
    """``module:attr`` of an entry point (its extras dropped)."""
    return ep.value.split("[", 1)[0].replace(" ", "")
