"""Which launchers a deployment record may name, and building one from a record.

A record is data, never code: the launcher a record names (``LauncherRef``) is built only from an
allow-list, the built-in launchers (``local``, ``kubernetes``) and those registered under the Python
entry point group :data:`LAUNCHER_ENTRY_POINT_GROUP` (or, in one process, with
:func:`register_launcher`). A record naming anything else is refused; no module named by a record is
ever imported and its ``sys_path`` is never put on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import warnings
from collections.abc import Mapping
from typing import Any

from loom_dagster.core.deploy.launch_records import LOCAL_LAUNCHER, LauncherRef
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.launchers.base import Launcher

LOCAL_LAUNCHER_PATH = "loom_dagster.core.launchers.local:LocalProcessLauncher"
KUBERNETES_LAUNCHER = "kubernetes"
"""Alias of :data:`KUBERNETES_LAUNCHER_PATH`."""
KUBERNETES_LAUNCHER_PATH = "loom_dagster.core.launchers.kubernetes.launcher:KubernetesLauncher"
_ALIASES = {LOCAL_LAUNCHER: LOCAL_LAUNCHER_PATH, KUBERNETES_LAUNCHER: KUBERNETES_LAUNCHER_PATH}
LAUNCHER_ENTRY_POINT_GROUP = "loom_dagster.launchers"
"""The entry point group of the launchers a deployment record (and the CLI) may name: ``name =
"package.module:Class"``."""


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
            f"(or call loom_dagster.core.launchers.register_launcher(MyLauncher) in the process first)"
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


def launcher_ref(launcher: Launcher) -> LauncherRef:
    """How a deployment record names *launcher*: its registered name (or ``module:Class``) and config."""
    cls = type(launcher)
    return LauncherRef(registered_name(cls) or class_path(cls), launcher.config())


def launcher_from_ref(ref: LauncherRef) -> Launcher:
    """The launcher *ref* names, constructed with its config, if that is an allowed launcher
    (:func:`launcher_from_record`); ``DeploymentError`` otherwise.

    Example:
        >>> launcher_from_ref(LauncherRef()).name
        'local'
    """
    return launcher_from_record(ref.path, ref.config)


def is_launcher_of(ref: LauncherRef, launcher: Launcher) -> bool:
    """True when *launcher* is an instance of the class *ref* names."""
    cls = type(launcher)
    if canonical_path(ref.path) == class_path(cls):
        return True
    if ":" in ref.path or ref.path in _ALIASES:  # another class, or another built-in
        return False
    return registered_name(cls) == ref.path
