"""Load, compile and describe every flow of a code location once, with errors that name the flow.

Definitions load (``compile_specs``) can reuse the records of an earlier compile from a cache on disk,
keyed by everything they derive from: the flow object (structure, class and function sources, payload
columns), the config files' bytes, the loom environment, the ``LOOM_*`` variables and the variables
the files read, and the versions of loom, msgspec, Python and this package's describing code. A code
server reload or a run worker then skips loom's config load and compile when nothing changed. The
cache holds only the secret-free records; the compiled plan (which carries credentials) is compiled
again on first use. ``compile_spec`` (used by the deploy's lineage check) always compiles fresh.

``LOOM_DAGSTER_COMPILE_CACHE`` (opt-in): unset or ``off`` disables it; ``on`` uses the default directory
(``$LOOM_DAGSTER_STATE_DIR/cache``, else ``$XDG_CACHE_HOME/loom-dagster`` or ``~/.cache/loom-dagster``,
then ``/compile``); any other value is the directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from loom_dagster.core.deploy.store import installation_key_id, private_dir, write_private_file
from loom_dagster.core.errors import FlowCompileError, FlowLoadError
from loom_dagster.core.flows.compile import compile_plan
from loom_dagster.core.flows.describe import config_hash, describe_plan, flow_fingerprint, plan_hash
from loom_dagster.core.flows.loading import snapshot_config_files
from loom_dagster.core.flows.records import LoomFlow
from loom_dagster.core.flows.spec import LoomFlowSpec

if TYPE_CHECKING:
    from loom.streaming import StreamFlow
    from loom.streaming.compiler import CompiledPlan

_log = logging.getLogger(__name__)

CACHE_VARIABLE = "LOOM_DAGSTER_COMPILE_CACHE"
_DISABLED = frozenset({"0", "off", "false", "no", "none", "disabled"})
_ENABLED = frozenset({"1", "on", "true", "yes"})


class CompiledFlow:
    """A spec, the records derived from its compiled plan, and the plan itself.

    When the records come from the compile cache (``from_cache``), ``plan`` is compiled on first
    access (with the same errors as ``compile_spec``); nothing else needs it at definitions load.
    """

    __slots__ = ("spec", "flow", "compile_seconds", "from_cache", "_plan", "_lock", "_on_stale")

    spec: LoomFlowSpec
    flow: LoomFlow
    compile_seconds: float
    from_cache: bool
    _plan: CompiledPlan | None
    _lock: threading.Lock
    _on_stale: Callable[[], None] | None

    def __init__(
        self,
        spec: LoomFlowSpec,
        flow: LoomFlow,
        plan: CompiledPlan | None = None,
        compile_seconds: float = 0.0,
        *,
        from_cache: bool = False,
        on_stale: Callable[[], None] | None = None,
    ) -> None:
        if plan is None and not from_cache:
            raise ValueError("a CompiledFlow needs its plan unless its records come from the cache")
        for name, value in (
            ("spec", spec),
            ("flow", flow),
            ("compile_seconds", compile_seconds),
            ("from_cache", from_cache),
            ("_plan", plan),
            ("_lock", threading.Lock()),
            ("_on_stale", on_stale),
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"CompiledFlow is immutable (cannot set {name!r})")

    @property
    def plan(self) -> CompiledPlan:
        """The compiled plan; compiled now if the records came from the cache."""
        plan = self._plan
        if plan is not None:
            return plan
        with self._lock:
            plan = self._plan
            if plan is None:
                plan = self._compile_plan()
                object.__setattr__(self, "_plan", plan)
            return plan

    def _compile_plan(self) -> CompiledPlan:
        """Compile the plan the cached records stand for; drop the cache entry if they are stale."""
        try:
            stream_flow = self.spec.load_flow()
            config = self.spec.load_config(self.flow.environment)
            plan = compile_plan(stream_flow, config)
        except (FlowLoadError, FlowCompileError) as exc:
            raise type(exc)(f"[{self.spec.import_path}] {exc}") from exc
        fresh = plan_hash(plan)
        if fresh != self.flow.plan_hash:
            _log.warning(
                "loom flow %r: cached records (plan %s) are stale, the flow compiles to plan %s now; its "
                "cache entry is dropped: reload the code location to refresh the asset graph",
                self.flow.name,
                self.flow.plan_hash,
                fresh,
            )
            if self._on_stale is not None:
                self._on_stale()
        return plan

    def __repr__(self) -> str:
        return (
            f"CompiledFlow(flow={self.flow.name!r}, plan_hash={self.flow.plan_hash!r}, "
            f"compile_seconds={self.compile_seconds:.4f}, from_cache={self.from_cache})"
        )


def from_records(
    spec: LoomFlowSpec, flow: LoomFlow, compile_seconds: float, on_stale: Callable[[], None]
) -> CompiledFlow:
    """A compiled flow from stored records (cache or defs state): its plan compiles on first use, and
    *on_stale* runs if that plan no longer matches the records."""
    return CompiledFlow(
        spec, _presented(spec, flow), None, compile_seconds, from_cache=True, on_stale=on_stale
    )


def compile_spec(spec: LoomFlowSpec, environment: str | None = None, *, as_job: bool = False) -> CompiledFlow:
    """Import, configure and compile one flow; describe it as records (never from the cache).

    ``as_job``: with the config as the job will load it (the spec's ``env=`` applied: ``LoomFlowSpec.
    load_job_config``), for the checks that connect before a launch. Raises ``FlowLoadError`` /
    ``FlowCompileError`` whose message starts with the import path.
    """
    try:
        stream_flow = spec.load_flow()
        env = spec.resolved_environment(environment)
    except FlowLoadError as exc:
        raise FlowLoadError(f"[{spec.import_path}] {exc}") from exc
    return _compile_loaded(spec, stream_flow, env, as_job)


def _compile_loaded(
    spec: LoomFlowSpec, stream_flow: StreamFlow[Any, Any], env: str, as_job: bool = False
) -> CompiledFlow:
    try:
        config = spec.load_job_config(env) if as_job else spec.load_config(env)
        started = time.perf_counter()
        plan = compile_plan(stream_flow, config)
        elapsed = time.perf_counter() - started
        described = describe_plan(
            stream_flow, plan, import_path=spec.import_path, environment=env, config_hash=_config_hash(config)
        )
    except (FlowLoadError, FlowCompileError) as exc:
        raise type(exc)(f"[{spec.import_path}] {exc}") from exc
    return CompiledFlow(spec=spec, flow=_presented(spec, described), plan=plan, compile_seconds=elapsed)


_CONFIG_HASHES: OrderedDict[tuple[int, str], tuple[Any, str]] = OrderedDict()
_CONFIG_HASHES_LOCK = threading.Lock()


def _config_hash(config: Any) -> str:
    """``describe.config_hash`` (the one config hash) memoized per config object and installation key:
    flows sharing a config directory get it from ``load_config``'s cache as one object, and hashing a
    big shared config per flow is quadratic.

    Safe because ``load_config`` hands out a cached object only while its files, the ``LOOM__*``
    variables and the variables the files read are unchanged. The entry holds the object, so its
    ``id`` cannot be reused while it is remembered.
    """
    memo = (id(config), installation_key_id())
    with _CONFIG_HASHES_LOCK:
        known = _CONFIG_HASHES.get(memo)
        if known is not None and known[0] is config:
            _CONFIG_HASHES.move_to_end(memo)
            return known[1]
    digest = config_hash(config)
    with _CONFIG_HASHES_LOCK:
        _CONFIG_HASHES[memo] = (config, digest)
        while len(_CONFIG_HASHES) > 256:
            _CONFIG_HASHES.popitem(last=False)
    return digest


def _presented(spec: LoomFlowSpec, described: LoomFlow) -> LoomFlow:
    """The records with the spec's presentation (group, description, owners, tags)."""
    return msgspec.structs.replace(
        described,
        group_name=spec.group_name,
        description=spec.description,
        owners=tuple(spec.owners),
        tags=tuple(sorted(spec.tags.items())),
    )


def compile_specs(
    specs: Sequence[LoomFlowSpec], cache: CompileCache | None | bool = True
) -> list[CompiledFlow]:
    """Compile every spec, reusing cached records when nothing they derive from changed.

    *cache*: ``True`` for the default cache (``LOOM_DAGSTER_COMPILE_CACHE``), ``False``/``None`` for
    none, or a ``CompileCache``. One failing flow fails the load with its own message; failures are
    never cached.
    """
    store = default_compile_cache() if cache is True else (cache or None)
    if store is None:
        return [compile_spec(spec) for spec in specs]
    return [store.compile(spec) for spec in specs]


def config_section(compiled: CompiledFlow) -> dict[str, Any]:
    """Small, secret-free summary of a compiled flow for metadata."""
    return {
        "plan_hash": compiled.flow.plan_hash,
        "config_hash": compiled.flow.config_hash,
        "environment": compiled.flow.environment,
        "compile_ms": round(compiled.compile_seconds * 1000, 1),
    }


# --------------------------------------------------------------------------------------------------
# Compile cache
# --------------------------------------------------------------------------------------------------

_FORMAT = 1
_MAX_ENTRIES = 5000
_DESCRIBING_MODULES = ("catalog", "compile", "describe", "records", "redact", "schema", "loading")


class _Entry(msgspec.Struct):
    format: int
    flow: LoomFlow
    compile_seconds: float


class CompileCache:
    """Secret-free records of compiled flows on disk, one JSON file per key.

    Example:
        >>> import tempfile
        >>> cache = CompileCache(Path(tempfile.mkdtemp()))
        >>> compiled = cache.compile(spec)  # doctest: +SKIP
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._writes = 0

    def compile(self, spec: LoomFlowSpec) -> CompiledFlow:
        """The spec's records from the cache, else compiled (and stored)."""
        try:
            stream_flow = spec.load_flow()
            env = spec.resolved_environment(None)
        except FlowLoadError as exc:
            raise FlowLoadError(f"[{spec.import_path}] {exc}") from exc
        key = self.key(spec, stream_flow, env)
        if key is not None:
            entry = self.get(key)
            if entry is not None:
                return from_records(spec, entry.flow, entry.compile_seconds, lambda: self.discard(key))
        compiled = _compile_loaded(spec, stream_flow, env)
        if key is not None:
            described = msgspec.structs.replace(
                compiled.flow, group_name=None, description=None, owners=(), tags=()
            )
            self.put(key, described, compiled.compile_seconds)
        return compiled

    def key(self, spec: LoomFlowSpec, stream_flow: StreamFlow[Any, Any], environment: str) -> str | None:
        """Cache key of a flow compiled with its config in *environment*; ``None`` if not cacheable."""
        try:
            files = spec.config_files(environment)
        except FlowLoadError:
            return None  # the compile reports it
        snapshot = snapshot_config_files(files)
        if snapshot is None:
            return None
        variables = {
            k: v for k, v in os.environ.items() if k.startswith("LOOM_") and not k.startswith("LOOM_DAGSTER_")
        }
        try:
            fingerprint = flow_fingerprint(stream_flow)
        except Exception as exc:  # an object the fingerprint cannot walk: compile instead
            _log.debug("loom flow %s: not cacheable: %s", spec.import_path, exc)
            return None
        extra = {
            **{f"env:{k}": v for k, v in {**variables, **snapshot.referenced_environment()}.items()},
            "import_path": spec.import_path,
            "flow": fingerprint,
            "code": code_version(),
            "hash_key": installation_key_id(),  # the records' config hash is keyed
        }
        return snapshot.cache_key(environment, extra)

    def path(self, key: str) -> Path:
        """File of *key*."""
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> _Entry | None:
        """The entry of *key*, or ``None`` (missing, unreadable or of another format)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        try:
            entry = msgspec.json.decode(data, type=_Entry)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.discard(key)
            return None
        return entry if entry.format == _FORMAT else None

    def put(self, key: str, flow: LoomFlow, compile_seconds: float) -> None:
        """Store *flow* under *key* (atomically; a failure to write is only logged)."""
        path = self.path(key)
        try:
            private_dir(path.parent)
            write_private_file(
                path, msgspec.json.encode(_Entry(_FORMAT, flow, compile_seconds)), durable=False
            )
        except OSError as exc:
            _log.debug("loom-dagster compile cache: cannot write %s: %s", path, exc)
            return
        self._writes += 1
        if self._writes % 500 == 1:
            self.prune()

    def discard(self, key: str) -> None:
        """Remove the entry of *key*, if any."""
        try:
            self.path(key).unlink()
        except OSError:
            pass

    def prune(self, keep: int = _MAX_ENTRIES) -> None:
        """Keep only the *keep* newest entries."""
        try:
            entries = [(p.stat().st_mtime, p) for p in self.directory.glob("*/*.json")]
        except OSError:
            return
        if len(entries) <= keep:
            return
        for _, stale in sorted(entries, reverse=True)[keep:]:
            try:
                stale.unlink()
            except OSError:
                pass


def default_compile_cache() -> CompileCache | None:
    """The cache ``LOOM_DAGSTER_COMPILE_CACHE`` selects (see the module docstring), or ``None``."""
    setting = os.environ.get(CACHE_VARIABLE, "").strip()
    if not setting or setting.lower() in _DISABLED:
        return None
    if setting.lower() not in _ENABLED:
        return CompileCache(Path(setting).expanduser())
    state = os.environ.get("LOOM_DAGSTER_STATE_DIR")
    if state:
        return CompileCache(Path(state) / "cache" / "compile")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return CompileCache(Path(base) / "loom-dagster" / "compile")


_CODE_VERSION: str | None = None


def code_version() -> str:
    """Versions of what turns a flow and its config into records: loom, msgspec, Python and its
    environment (``sys.prefix``), and a hash of this package's describing modules (so an edited
    checkout never reads its own stale entries)."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        digest = hashlib.sha256()
        for dist in ("loom-kernel", "msgspec", "loom-dagster"):
            try:
                digest.update(f"{dist}={importlib.metadata.version(dist)};".encode())
            except importlib.metadata.PackageNotFoundError:
                digest.update(f"{dist}=?;".encode())
        digest.update(f"py={sys.version_info[:2]};prefix={sys.prefix};format={_FORMAT};".encode())
        package = Path(__file__).parent
        for name in _DESCRIBING_MODULES:
            try:
                digest.update((package / f"{name}.py").read_bytes())
            except OSError:
                digest.update(name.encode())
        _CODE_VERSION = digest.hexdigest()[:16]
    return _CODE_VERSION
