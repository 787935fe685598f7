"""Import a StreamFlow by its import path and load its loom config, with errors a user can act on."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loom_dagster.errors import FlowLoadError

if TYPE_CHECKING:
    from loom.core.config import ConfigContext
    from loom.streaming import StreamFlow

ENVIRONMENT_VARIABLE = "LOOM_ENV"


def import_flow(import_path: str) -> StreamFlow[Any, Any]:
    """Import ``"package.module:attr"`` and check that it is a loom ``StreamFlow``.

    ``attr`` may be a dotted attribute path, or a zero-argument callable returning the flow.

    Example:
        >>> flow = import_flow("definitions.flows.orders:orders_flow")  # doctest: +SKIP
    """
    from loom.streaming import StreamFlow

    module_name, sep, attr_path = import_path.partition(":")
    if not sep or not module_name or not attr_path:
        raise FlowLoadError(
            f"flow import path {import_path!r} must look like 'package.module:attribute' "
            "(a module path, a colon, then the StreamFlow's name in that module)"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        hint = _import_hint(module_name, exc)
        raise FlowLoadError(
            f"cannot import module {module_name!r} of flow {import_path!r}: {exc}. {hint}"
        ) from exc
    except Exception as exc:
        raise FlowLoadError(
            f"importing module {module_name!r} of flow {import_path!r} raised "
            f"{type(exc).__name__}: {exc}. Fix the module so that it imports cleanly."
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise FlowLoadError(
                f"module {module_name!r} has no attribute {attr_path!r} (flow {import_path!r}); "
                f"names it defines: {', '.join(sorted(n for n in dir(module) if not n.startswith('_'))[:20])}"
            )
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, StreamFlow) and not isinstance(obj, type):
        obj = obj()
    if not isinstance(obj, StreamFlow):
        raise FlowLoadError(
            f"{import_path!r} is a {type(obj).__module__}.{type(obj).__qualname__}, not a loom StreamFlow; "
            "point the import path at a StreamFlow instance (or a function returning one)"
        )
    return obj


def _import_hint(module_name: str, exc: ModuleNotFoundError) -> str:
    if exc.name and module_name.startswith(exc.name):
        return (
            "Check the spelling, and that the package is installed or its directory is on sys.path "
            f"(working directory: {os.getcwd()})."
        )
    return f"The module exists but imports {exc.name!r}, which is not installed."


def resolve_environment_name(environment: str | None) -> str:
    """Return the loom environment: the explicit one, else ``LOOM_ENV``, else ``production``."""
    from loom.core.environment import resolve_environment

    try:
        return resolve_environment(environment).value
    except Exception as exc:
        raise FlowLoadError(f"invalid loom environment: {exc}") from exc


def config_files(sources: Sequence[str | os.PathLike[str]], environment: str | None) -> tuple[str, ...]:
    """Expand config sources (files, or directories with ``base.yaml`` + ``<env>.yaml``) into files."""
    from loom.core.environment import Environment, config_source_paths

    env = Environment(resolve_environment_name(environment))
    files: list[str] = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise FlowLoadError(f"loom config {str(path)!r} does not exist")
        try:
            files.extend(config_source_paths(path, env))
        except Exception as exc:
            raise FlowLoadError(f"loom config {str(path)!r}: {exc}") from exc
    if not files:
        raise FlowLoadError("no loom config given: pass at least one YAML file or config directory")
    return tuple(files)


def load_config(sources: Sequence[str | os.PathLike[str]], environment: str | None) -> ConfigContext:
    """Load and merge a flow's loom config the way loom applications do (overlays, ``LOOM__*``)."""
    from loom.core.config.overrides import load_application_config

    files = config_files(sources, environment)
    try:
        return load_application_config(*files, environment=resolve_environment_name(environment))
    except Exception as exc:
        raise FlowLoadError(f"cannot load loom config {', '.join(files)}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 2000 else text[:2000] + "..."


def ensure_on_path(directory: str | os.PathLike[str] | None) -> None:
    """Put a code location's root on ``sys.path`` so flow import paths resolve in any process."""
    if directory is None:
        return
    root = str(Path(directory).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
