"""Import a StreamFlow by its import path and load its loom config, with errors a user can act on.

Every failure is a ``FlowLoadError`` whose text and chained exceptions are redacted
(:mod:`loom_dagster.core.errors`): a flow module that raises at import with a DSN in its message shows
``postgresql://app:***@db/shop`` wherever the error goes (a definitions load, a ``dg.Failure``, the CLI).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from loom_dagster.core.errors import FlowLoadError, LoomDagsterError

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
        try:
            obj = obj()
        except LoomDagsterError:
            raise
        except Exception as exc:
            raise FlowLoadError(
                f"calling {attr_path!r} of flow {import_path!r} (a function returning the flow) raised "
                f"{type(exc).__name__}: {exc}. Fix the function so that it returns the StreamFlow."
            ) from exc
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
    """Load and merge a flow's loom config the way loom applications do (overlays, ``LOOM__*``).

    Within a process the result is reused while nothing it derives from changed: the files' bytes,
    the environment, the ``LOOM__*`` variables and the variables the files read through
    ``${oc.env:...}``. Flows sharing a config directory therefore parse it once, and a materialization
    in a run worker reuses the load of its definitions. Treat the returned context as read-only.
    Configs with ``includes`` or with resolvers other than ``oc.*`` (``${ssm:}``, ``${secrets:}``,
    whose values OmegaConf caches on the config object) are loaded fresh every time.
    """
    files = config_files(sources, environment)
    env = resolve_environment_name(environment)
    snapshot = snapshot_config_files(files)
    key = snapshot.cache_key(env, snapshot.referenced_environment()) if snapshot is not None else None
    if key is not None:
        with _CONFIG_LOCK:
            cached = _CONFIG_CACHE.get(key)
            if cached is not None:
                _CONFIG_CACHE.move_to_end(key)
                return cached
    config = _load_application_config(files, env)
    if key is not None:
        with _CONFIG_LOCK:
            _CONFIG_CACHE[key] = config
            while len(_CONFIG_CACHE) > _CONFIG_CACHE_SIZE:
                _CONFIG_CACHE.popitem(last=False)
    return config


def _load_application_config(files: tuple[str, ...], environment: str) -> ConfigContext:
    from loom.core.config.overrides import load_application_config

    try:
        return load_application_config(*files, environment=environment)
    except Exception as exc:
        raise FlowLoadError(f"cannot load loom config {', '.join(files)}: {_first_line(exc)}") from exc


def clear_config_cache() -> None:
    """Forget every config ``load_config`` kept in this process."""
    with _CONFIG_LOCK:
        _CONFIG_CACHE.clear()


_CONFIG_CACHE: OrderedDict[str, ConfigContext] = OrderedDict()
_CONFIG_CACHE_SIZE = 256
_CONFIG_LOCK = threading.Lock()

_RESOLVER = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*:")
_ENV_REFERENCE = re.compile(r"oc\.env\s*:\s*([^,}\s]*)")
_ENV_NAME = re.compile(r"[A-Za-z_]\w*")
_INCLUDES = re.compile(r"^includes\s*:", re.MULTILINE)
_SAFE_RESOLVERS = frozenset(
    {"oc.env", "oc.decode", "oc.create", "oc.deprecated", "oc.select", "oc.dict.keys", "oc.dict.values"}
)
_OVERRIDE_PREFIX = "LOOM__"


class ConfigSnapshot(msgspec.Struct, frozen=True):
    """The bytes of a config's files, taken once: what a cached load or compile is keyed on.

    ``env_names`` are the variables the files read through ``${oc.env:NAME}``.
    """

    files: tuple[str, ...]
    digests: tuple[str, ...]
    env_names: tuple[str, ...]

    def cache_key(self, environment: str, extra: Mapping[str, str] | None = None) -> str:
        """Hash of the files, the environment, the ``LOOM__*`` variables and *extra* values."""
        digest = hashlib.sha256()
        for part in (environment, *self.files, *self.digests):
            digest.update(part.encode())
            digest.update(b"\0")
        overrides = sorted((k, v) for k, v in os.environ.items() if k.startswith(_OVERRIDE_PREFIX))
        for name, value in [*overrides, *sorted((extra or {}).items())]:
            digest.update(f"{name}={value}".encode())
            digest.update(b"\0")
        return digest.hexdigest()

    def referenced_environment(self) -> dict[str, str]:
        """Current values of the variables the files read (``<unset>`` for a missing one)."""
        return {name: os.environ.get(name, "\0<unset>") for name in self.env_names}


def snapshot_config_files(files: Sequence[str]) -> ConfigSnapshot | None:
    """Read and hash *files*; ``None`` when their content alone does not determine the config.

    That is: a remote file, an ``includes`` list, a resolver other than OmegaConf's own ``oc.*``, or
    an ``oc.env`` whose variable name is not written out plainly.
    """
    digests: list[str] = []
    env_names: set[str] = set()
    for file in files:
        if "://" in file:
            return None
        try:
            data = Path(file).read_bytes()
        except OSError:
            return None
        text = data.decode("utf-8", errors="replace")
        if _INCLUDES.search(text) or any(r not in _SAFE_RESOLVERS for r in _RESOLVER.findall(text)):
            return None
        names = _ENV_REFERENCE.findall(text)
        if not all(_ENV_NAME.fullmatch(n) for n in names):  # a computed or quoted name: not tracked
            return None
        env_names.update(names)
        digests.append(hashlib.sha256(data).hexdigest())
    return ConfigSnapshot(tuple(files), tuple(digests), tuple(sorted(env_names)))


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
