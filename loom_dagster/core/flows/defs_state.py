"""State-backed definitions: the secret-free records of every flow, written by a refresh, read at load.

Loading a code location then imports no flow, loads no config and compiles nothing: each flow's
``LoomFlow`` records (what the translator, the edges and the sensors' declarations need) come from a
small msgspec JSON file per flow under ``<directory>/<key>.json``, where *key* hashes the flow's
import path, its config sources and the loom environment it was asked for. The compiled plan (which
carries credentials) is compiled lazily, on first use, in the process that needs it (a sensor tick,
a run), and kept there; it is never written.

An entry is *fresh* while nothing it derives from changed, checked at load without importing loom:
the config files and the flow's source files (size + mtime, then content hash if those moved), the
listing of each config directory (a new ``<env>.yaml`` overlay), the ``LOOM_*`` variables and the
variables the config reads (as a salted digest, never their values), and the versions of loom and of
this package's describing code. A stale or missing entry is refreshed at load (``refresh="auto"``, the
default: ``dagster dev`` needs no extra step), or loaded as it is and reported (``refresh="never"``:
a warning and ``loom/defs_state`` metadata on the flow). Either way a deploy compiles for real and
checks the fresh plan against the graph's lineage, so a stale state never deploys the wrong thing.

Source files are those of the flow's module, of the modules, classes and functions it imports at top
level, and of every class and function reachable from the ``StreamFlow`` object (loom's own files
are covered by its version). A change elsewhere is still caught when the plan compiles (its hash is
compared with the records', the entry dropped and a warning logged) and by the deploy's lineage check.

A refresh of many flows (the first load of a location, ``loom-dagster refresh``) compiles them in a
pool of worker processes, one per CPU (``LOOM_DAGSTER_REFRESH_WORKERS``, ``DefsState(workers=)``; ``1``
compiles in this process, as does a refresh of a few flows): ``loom_dagster.core.flows.refresh_pool``. The
workers send back the entries (secret-free) and this process writes them; a flow refreshed so
compiles its plan on first use, as one read from the state does.

Entries are written 0600 in a 0700 directory, fsynced; a directory others may write to is not read.
An entry records which installation key made its config hash (a keyed digest): one written with
another key (another machine, an image built elsewhere) is stale.

``LOOM_DAGSTER_DEFS_STATE``: unset or ``on`` -> ``<state dir>/defs-state`` (``$LOOM_DAGSTER_STATE_DIR``,
else ``$DAGSTER_HOME/loom``, else ``~/.loom-dagster``); ``off`` -> no state (compile at every load);
anything else is the directory.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import secrets
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

import msgspec

from loom_dagster.core.deploy.store import (
    HASH_KEY_VARIABLE,
    StateDirectoryError,
    check_private_dir,
    default_state_dir,
    installation_key_id,
    private_dir,
    write_private_file,
)
from loom_dagster.core.errors import FlowLoadError
from loom_dagster.core.flows.catalog import (
    CompiledFlow,
    _compile_loaded,
    code_version,
    default_compile_cache,
    from_records,
)
from loom_dagster.core.flows.describe import attribute_names
from loom_dagster.core.flows.loading import ENVIRONMENT_VARIABLE, snapshot_config_files
from loom_dagster.core.flows.records import LoomFlow
from loom_dagster.core.flows.refresh_pool import configured_workers, parallel_spec, pool_size, refresh_in_pool
from loom_dagster.core.flows.spec import LoomFlowSpec

if TYPE_CHECKING:
    from loom.streaming import StreamFlow

_log = logging.getLogger(__name__)

STATE_VARIABLE = "LOOM_DAGSTER_DEFS_STATE"
STALE_METADATA_KEY = "loom/defs_state"
_FORMAT = 2
"""Version of the entries' layout: 2 added payload contracts to the flow records (an entry of another
format is refreshed)."""
_DISABLED = frozenset({"0", "off", "false", "no", "none", "disabled"})
_ENABLED = frozenset({"1", "on", "true", "yes"})
Refresh = Literal["auto", "never", "always"]
T = TypeVar("T")


class SourceFile(msgspec.Struct, frozen=True):
    """A file a flow's records derive from, as it was at the refresh."""

    path: str
    size: int
    mtime_ns: int
    sha256: str


class FlowState(msgspec.Struct, frozen=True):
    """One flow's entry: its secret-free records and what they derive from (never a secret)."""

    format: int
    key: str
    import_path: str
    environment: str
    code_version: str
    files: tuple[SourceFile, ...]
    config_dirs: tuple[tuple[str, str], ...]
    env_names: tuple[str, ...]
    env_salt: str
    env_digest: str
    verifiable: bool
    flow: LoomFlow
    compile_seconds: float
    refreshed_at: float
    hash_key: str = ""
    """Id of the installation key its config hash was made with (``deployments.installation_key_id``)."""


class FlowLoad(msgspec.Struct, frozen=True):
    """How one flow's records were obtained at load: ``fresh`` (from the state), ``refreshed``
    (compiled now and written) or ``stale`` (from an outdated state, ``refresh="never"``)."""

    import_path: str
    flow_name: str
    status: Literal["fresh", "refreshed", "stale"]
    reason: str | None = None
    seconds: float = 0.0


class StateLoad(msgspec.Struct):
    """The compiled flows of a load, in spec order, and how each was obtained."""

    compiled: list[CompiledFlow]
    flows: list[FlowLoad] = msgspec.field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        """How many flows have *status*."""
        return sum(1 for f in self.flows if f.status == status)

    def stale_reason(self, flow_name: str) -> str | None:
        """Why *flow_name*'s records are stale, or ``None`` when they are current."""
        return next((f.reason for f in self.flows if f.flow_name == flow_name and f.status == "stale"), None)

    def summary(self) -> str:
        """One line: counts by status and the time taken."""
        return (
            f"{len(self.flows)} flow(s): {self.count('fresh')} from the state, {self.count('refreshed')} "
            f"refreshed, {self.count('stale')} stale; {self.seconds:.2f} s"
        )


class DefsState:
    """Where a code location's flow records are kept, and when they are refreshed.

    Args:
        directory: the state directory (default: ``LOOM_DAGSTER_DEFS_STATE``, see the module docstring).
        refresh: ``auto`` compiles and rewrites missing or stale entries at load; ``never`` loads a
            stale entry as it is (reported; a missing one is still compiled); ``always`` compiles
            every flow and rewrites its entry (what ``loom-dagster refresh`` does).

    Example:
        >>> state = DefsState(tempfile.mkdtemp())  # doctest: +SKIP
        >>> load = state.load([LoomFlowSpec("definitions.flows.orders:orders_flow",  # doctest: +SKIP
        ...     config="definitions/config/orders", environment="development")])
        >>> load.summary()  # doctest: +SKIP
        '1 flow(s): 0 from the state, 1 refreshed, 0 stale; 0.84 s'
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        refresh: Refresh = "auto",
        workers: int | None = None,
    ) -> None:
        if refresh not in ("auto", "never", "always"):
            raise ValueError(f"refresh must be 'auto', 'never' or 'always', not {refresh!r}")
        self.directory = Path(directory) if directory is not None else default_state_directory()
        self.refresh_mode: Refresh = refresh
        self.workers = None if workers is None else configured_workers(workers)
        self._checked = False

    def __repr__(self) -> str:
        return f"DefsState({str(self.directory)!r}, refresh={self.refresh_mode!r})"

    # -- load -------------------------------------------------------------------------------------

    def load(self, specs: Sequence[LoomFlowSpec], *, progress: RefreshProgress | None = None) -> StateLoad:
        """The compiled flows of *specs*: records from fresh entries, the others per ``refresh``.

        The flows to compile are compiled in worker processes when there are enough of them
        (``loom_dagster.core.flows.refresh_pool``; ``workers``, else ``LOOM_DAGSTER_REFRESH_WORKERS``), else here.
        *progress* (or the one ``forced_refresh`` was given) hears of each flow as it is done.
        One failing flow fails the load with its own message (``FlowLoadError``/``FlowCompileError``).
        """
        started = time.perf_counter()
        checker = _FileChecker()
        forced = _FORCED.get()
        mode = "always" if forced is not None else self.refresh_mode
        report = progress or (forced.progress if forced is not None else None)
        compiled: list[CompiledFlow | None] = [None] * len(specs)
        flows: list[FlowLoad | None] = [None] * len(specs)
        if report is not None:
            report.begin(self, len(specs))
        done: StateLoad | None = None
        try:
            todo: list[tuple[int, str, str | None]] = []
            for index, spec in enumerate(specs):
                flow_started = time.perf_counter()
                key = state_key(spec)
                entry = self.read(key)
                reason = "no state yet" if entry is None else staleness(entry, spec, checker)
                if mode == "always":
                    reason = "refresh requested"
                if entry is not None and (reason is None or mode == "never"):
                    compiled[index] = self._from_entry(spec, entry)
                    status: Literal["fresh", "stale"] = "fresh" if reason is None else "stale"
                    loaded = FlowLoad(
                        spec.import_path, entry.flow.name, status, reason, time.perf_counter() - flow_started
                    )
                    flows[index] = loaded
                    if report is not None:
                        report.advance(index, loaded)
                else:
                    todo.append((index, key, reason))
            workers = self.workers if forced is None or forced.workers is None else forced.workers
            self._refresh_all(specs, todo, compiled, flows, report, workers)
            done = StateLoad(
                compiled=[c for c in compiled if c is not None],
                flows=[f for f in flows if f is not None],
                seconds=time.perf_counter() - started,
            )
        finally:
            if report is not None:
                report.end(self, done)
        assert done is not None
        _report(done, self)
        if forced is not None:
            forced.loads.append((self, done))
        return done

    def refresh(self, specs: Sequence[LoomFlowSpec], *, progress: RefreshProgress | None = None) -> StateLoad:
        """Compile every flow of *specs* now and rewrite its entry (``loom-dagster refresh``)."""
        state = DefsState(self.directory, refresh="always", workers=self.workers)
        return state.load(specs, progress=progress)

    def _refresh_all(
        self,
        specs: Sequence[LoomFlowSpec],
        todo: Sequence[tuple[int, str, str | None]],
        compiled: list[CompiledFlow | None],
        flows: list[FlowLoad | None],
        report: RefreshProgress | None,
        workers: int | None,
    ) -> None:
        """Compile the flows *todo* (``(index, key, reason)``), in a pool of worker processes when they
        are enough to pay for it (``refresh_pool.pool_size``), else here in spec order."""

        def done(index: int, flow: CompiledFlow, reason: str | None, seconds: float) -> None:
            compiled[index] = flow
            loaded = FlowLoad(specs[index].import_path, flow.flow.name, "refreshed", reason, seconds)
            flows[index] = loaded
            if report is not None:
                report.advance(index, loaded)

        def here(index: int, key: str, reason: str | None) -> None:
            flow_started = time.perf_counter()
            flow = self._refresh_one(specs[index], key)
            done(index, flow, reason, time.perf_counter() - flow_started)

        if not todo:
            return
        pooled = [(t, parallel_spec(specs[t[0]])) for t in todo]
        parallel = [(t, s) for t, s in pooled if s is not None]
        size = pool_size(len(parallel), configured_workers(workers))
        if size < 2:
            for index, key, reason in todo:
                here(index, key, reason)
            return

        def written(position: int, data: bytes, seconds: float) -> None:
            (index, key, reason), _ = parallel[position]
            entry = msgspec.json.decode(data, type=FlowState)
            self.write(entry)
            done(index, self._from_entry(specs[index], entry), reason, seconds)

        _log.info(
            "loom defs state %s: compiling %d flow(s) in %d worker processes",
            self.directory,
            len(parallel),
            size,
        )
        broken, failure = refresh_in_pool([(s, t[1]) for t, s in parallel], size, written)
        failed_at = parallel[failure[0]][0][0] if failure is not None else len(specs)
        missing = {parallel[p][0][0] for p in broken} | {t[0] for t, s in pooled if s is None}
        for index, key, reason in todo:  # in spec order, up to the failure, as the serial refresh
            if index in missing and index < failed_at:
                here(index, key, reason)
        if failure is not None:
            raise failure[1]

    def _from_entry(self, spec: LoomFlowSpec, entry: FlowState) -> CompiledFlow:
        return from_records(spec, entry.flow, entry.compile_seconds, lambda: self.discard(entry.key))

    def _refresh_one(self, spec: LoomFlowSpec, key: str) -> CompiledFlow:
        compiled, entry = refresh_entry(spec, key)
        self.write(entry)
        return compiled

    # -- entries ----------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """File of the entry *key*."""
        return self.directory / f"{key}.json"

    def read(self, key: str) -> FlowState | None:
        """The entry *key*, or ``None`` (missing, unreadable, or of another format). A directory others
        may write to is not read (``StateDirectoryError``): anyone could plant records there."""
        if not self._checked and self.directory.is_dir():
            check_private_dir(self.directory, owned=False, what="defs state directory")
            self._checked = True
        try:
            data = self.path(key).read_bytes()
        except PermissionError as exc:
            _log.warning("loom defs state %s cannot be read (%s): it is refreshed", self.path(key), exc)
            return None
        except OSError:
            return None
        try:
            entry = msgspec.json.decode(data, type=FlowState)
        except (msgspec.DecodeError, msgspec.ValidationError):
            _log.warning("loom defs state %s is unreadable: it is refreshed", self.path(key))
            return None
        return entry if entry.format == _FORMAT else None

    def write(self, entry: FlowState) -> None:
        """Store *entry* atomically and durably, 0600 in a 0700 directory (a failure to write is logged:
        the next load compiles again)."""
        path = self.path(entry.key)
        try:
            if path.parent.is_dir():
                check_private_dir(path.parent, what="defs state directory")
            else:
                private_dir(path.parent)
            write_private_file(path, msgspec.json.encode(entry))
        except (OSError, StateDirectoryError) as exc:
            _log.warning("loom defs state: cannot write %s: %s", path, exc)

    def discard(self, key: str) -> None:
        """Remove the entry *key* (its records turned out stale): the next load refreshes it."""
        try:
            self.path(key).unlink()
        except OSError:
            pass


class RefreshProgress(Protocol):
    """Hears of a load's flows as each is done (``loom-dagster refresh`` prints a bar or lines)."""

    def begin(self, state: DefsState, total: int) -> None:
        """A load of *total* flows starts."""

    def advance(self, index: int, flow: FlowLoad) -> None:
        """The flow *index* (spec order) is done; with a pool, flows finish in any order."""

    def end(self, state: DefsState, load: StateLoad | None) -> None:
        """The load is over (*load* ``None``: it failed)."""


@dataclass
class _Forced:
    loads: list[tuple[DefsState, StateLoad]]
    workers: int | None = None
    progress: RefreshProgress | None = None


_FORCED: ContextVar[_Forced | None] = ContextVar("loom_defs_refresh", default=None)


@contextmanager
def forced_refresh(
    *, workers: int | None = None, progress: RefreshProgress | None = None
) -> Iterator[list[tuple[DefsState, StateLoad]]]:
    """Within this block every ``DefsState.load`` compiles every flow and rewrites its entry; the
    yielded list collects each load (what ``loom-dagster refresh`` does around importing a location).

    *workers*: the worker processes of each load (``None``: the state's, else
    ``LOOM_DAGSTER_REFRESH_WORKERS``); *progress*: told of every flow of every load.

    Example:
        >>> with forced_refresh() as loads:
        ...     pass  # import the code location here
        >>> loads
        []
    """
    forced = _Forced([], None if workers is None else configured_workers(workers), progress)
    token = _FORCED.set(forced)
    try:
        yield forced.loads
    finally:
        _FORCED.reset(token)


def default_state_directory() -> Path:
    """``LOOM_DAGSTER_DEFS_STATE`` as a directory, else ``<default state dir>/defs-state``."""
    setting = os.environ.get(STATE_VARIABLE, "").strip()
    if setting and setting.lower() not in _ENABLED and setting.lower() not in _DISABLED:
        return Path(setting).expanduser()
    return default_state_dir() / "defs-state"


def default_defs_state() -> DefsState | None:
    """The state ``LOOM_DAGSTER_DEFS_STATE`` selects, or ``None`` when it is ``off``."""
    setting = os.environ.get(STATE_VARIABLE, "").strip().lower()
    return None if setting in _DISABLED else DefsState()


def _report(load: StateLoad, state: DefsState) -> None:
    """One warning per reason (an upgrade makes every flow stale for the same one), naming the flows."""
    for reason, flows in _by_reason(f for f in load.flows if f.status == "stale").items():
        _log.warning(
            "loom flow(s) %s: their records in the defs state are stale (%s) and were loaded as they are "
            "(refresh='never'); the asset graph may not match the flows: run `loom-dagster refresh` "
            "and reload the code location. A deploy compiles the flow anew and checks its lineage.",
            _flow_names(flows),
            reason,
        )
    automatic = (
        f
        for f in load.flows
        if f.status == "refreshed" and f.reason not in ("no state yet", "refresh requested")
    )
    for reason, flows in _by_reason(automatic).items():
        _log.warning(
            "loom flow(s) %s: their defs state was stale (%s); refreshed at load (%.2f s)",
            _flow_names(flows),
            reason,
            sum(f.seconds for f in flows),
        )
    if load.count("refreshed"):
        _log.info("loom defs state %s: %s", state.directory, load.summary())


def _by_reason(flows: Iterable[FlowLoad]) -> dict[str, list[FlowLoad]]:
    grouped: dict[str, list[FlowLoad]] = {}
    for flow in flows:
        grouped.setdefault(flow.reason or "", []).append(flow)
    return grouped


def _flow_names(flows: Sequence[FlowLoad], shown: int = 20) -> str:
    """``'a', 'b'``; past *shown* names, how many more (the reason, not the list, is what to act on)."""
    names = ", ".join(repr(f.flow_name) for f in flows[:shown])
    return names if len(flows) <= shown else f"{names} and {len(flows) - shown} more"


# --------------------------------------------------------------------------------------------------
# Keys and freshness
# --------------------------------------------------------------------------------------------------


def _environment_input(spec: LoomFlowSpec) -> str:
    """What decides the loom environment, without importing loom: the spec's, else ``LOOM_ENV``."""
    return spec.environment or os.environ.get(ENVIRONMENT_VARIABLE, "") or ""


def state_key(spec: LoomFlowSpec) -> str:
    """Entry key of *spec*: its import path, absolute config sources and requested environment."""
    digest = hashlib.sha256()
    sources = [str(Path(s).absolute()) for s in spec.config_sources]
    for part in (spec.import_path, *sources, "env=" + _environment_input(spec)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _loom_variables() -> dict[str, str]:
    """The ``LOOM_*`` environment variables (not ``LOOM_DAGSTER_*``)."""
    return {
        k: v for k, v in os.environ.items() if k.startswith("LOOM_") and not k.startswith("LOOM_DAGSTER_")
    }


def _env_digest(salt: str, names: Sequence[str], loom_variables: Mapping[str, str] | None = None) -> str:
    """Salted digest of the ``LOOM_*`` variables (not ``LOOM_DAGSTER_*``) and of *names*."""
    values = dict(_loom_variables() if loom_variables is None else loom_variables)
    values.update({n: os.environ.get(n, "\0<unset>") for n in names})
    digest = hashlib.sha256(salt.encode())
    for name, value in sorted(values.items()):
        digest.update(f"{name}={value}\0".encode())
    return digest.hexdigest()


def _listing(directory: str) -> str:
    """Digest of the YAML file names in *directory* (an added overlay changes the config)."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith((".yaml", ".yml")))
    except OSError:
        return "<missing>"
    return hashlib.sha256("\0".join(names).encode()).hexdigest()[:16]


class _FileChecker:
    """Whether files still are as recorded, each file checked once per load."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, int, int, str], bool] = {}
        self._listings: dict[str, str] = {}
        self.loom_variables = _loom_variables()  # read once per load, not once per flow

    def unchanged(self, recorded: SourceFile) -> bool:
        key = (recorded.path, recorded.size, recorded.mtime_ns, recorded.sha256)
        known = self._known.get(key)
        if known is None:
            known = self._known[key] = _unchanged(recorded)
        return known

    def listing(self, directory: str) -> str:
        found = self._listings.get(directory)
        if found is None:
            found = self._listings[directory] = _listing(directory)
        return found


def _unchanged(recorded: SourceFile) -> bool:
    try:
        stat = os.stat(recorded.path)
    except OSError:
        return False
    if stat.st_size == recorded.size and stat.st_mtime_ns == recorded.mtime_ns:
        return True
    if stat.st_size != recorded.size:
        return False
    try:
        return hashlib.sha256(Path(recorded.path).read_bytes()).hexdigest() == recorded.sha256
    except OSError:
        return False


def staleness(entry: FlowState, spec: LoomFlowSpec, checker: _FileChecker | None = None) -> str | None:
    """Why *entry* no longer describes *spec* (``None``: it is fresh). Never imports loom."""
    check = checker or _FileChecker()
    refreshed = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.refreshed_at))
    if entry.import_path != spec.import_path:
        return f"written for {entry.import_path!r}"
    if entry.code_version != code_version():
        return "written by another version of loom, msgspec, Python or loom-dagster"
    if entry.hash_key != installation_key_id():
        return (
            "its config hash was made with another installation's key (set the same "
            f"${HASH_KEY_VARIABLE} where the state is written and where it is loaded)"
        )
    if not entry.verifiable:
        return "its config cannot be checked by its files (includes, a remote file or a non-oc resolver)"
    for directory, listing in entry.config_dirs:
        if check.listing(directory) != listing:
            return f"config directory {directory} has other YAML files than at the refresh ({refreshed})"
    for recorded in entry.files:
        if not check.unchanged(recorded):
            return f"{recorded.path} changed after the refresh ({refreshed})"
    if _env_digest(entry.env_salt, entry.env_names, check.loom_variables) != entry.env_digest:
        return f"LOOM_* variables or variables its config reads changed after the refresh ({refreshed})"
    return None


def refresh_entry(spec: LoomFlowSpec, key: str) -> tuple[CompiledFlow, FlowState]:
    """Import, configure and compile *spec* (through the compile cache if one is on) and describe its
    entry *key*: what a refresh does per flow, here or in a worker process (``refresh_pool``).
    Raises ``FlowLoadError`` / ``FlowCompileError`` whose message starts with the import path."""
    try:
        stream_flow = spec.load_flow()
        env = spec.resolved_environment(None)
    except FlowLoadError as exc:
        raise FlowLoadError(f"[{spec.import_path}] {exc}") from exc
    cache = default_compile_cache()
    compiled = cache.compile(spec) if cache is not None else _compile_loaded(spec, stream_flow, env)
    return compiled, describe_state(spec, stream_flow, compiled, key)


def describe_state(
    spec: LoomFlowSpec, stream_flow: StreamFlow[Any, Any], compiled: CompiledFlow, key: str | None = None
) -> FlowState:
    """The entry of a flow just compiled: its records (presentation stripped) and their inputs."""
    env = compiled.flow.environment
    paths: list[str] = []
    verifiable = True
    env_names: tuple[str, ...] = ()
    try:
        config_files = spec.config_files(env)
    except FlowLoadError:
        config_files, verifiable = (), False
    snapshot = snapshot_config_files(config_files) if config_files else None
    if snapshot is None:
        verifiable = False
    else:
        env_names = snapshot.env_names
    paths += config_files
    paths += flow_source_files(stream_flow, spec.import_path)
    dirs = [str(Path(s).resolve()) for s in spec.config_sources if Path(s).is_dir()]
    salt = secrets.token_hex(8)
    described = msgspec.structs.replace(compiled.flow, group_name=None, description=None, owners=(), tags=())
    return FlowState(
        format=_FORMAT,
        key=key or state_key(spec),
        import_path=spec.import_path,
        environment=env,
        code_version=code_version(),
        files=tuple(f for f in (_source_file(p) for p in dict.fromkeys(paths)) if f is not None),
        config_dirs=tuple((d, _listing(d)) for d in dirs),
        env_names=env_names,
        env_salt=salt,
        env_digest=_env_digest(salt, env_names),
        verifiable=verifiable,
        flow=described,
        compile_seconds=compiled.compile_seconds,
        refreshed_at=time.time(),
        hash_key=installation_key_id(),
    )


def _source_file(path: str) -> SourceFile | None:
    try:
        stat = os.stat(path)
        data = Path(path).read_bytes()
    except OSError:
        return None
    return SourceFile(path, stat.st_size, stat.st_mtime_ns, hashlib.sha256(data).hexdigest())


# --------------------------------------------------------------------------------------------------
# The source files of a flow
# --------------------------------------------------------------------------------------------------


def _untracked_roots() -> tuple[str, ...]:
    """Files under these are not tracked: the standard library, and loom and this package (whose
    versions and describing code are part of ``code_version``)."""
    roots = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}
    for name in ("loom", "loom_dagster", "msgspec"):
        module = sys.modules.get(name)
        location = getattr(module, "__file__", None)
        if location:
            roots.add(str(Path(location).parent))
    return tuple(sorted(os.path.join(r, "") for r in roots if r))


def flow_source_files(stream_flow: Any, import_path: str) -> list[str]:
    """Python files the flow's records can depend on: its module, what that module imports at top
    level, and the files of every class and function reachable from the flow object."""
    untracked = _untracked_roots()
    found: dict[str, None] = {}

    def add(obj: Any) -> None:
        try:
            path = inspect.getsourcefile(obj) or inspect.getfile(obj)
        except (TypeError, OSError):
            return
        if path and os.path.isfile(path) and not path.startswith(untracked):
            found.setdefault(os.path.realpath(path) if os.path.islink(path) else path, None)

    module = sys.modules.get(import_path.partition(":")[0])
    if module is not None:
        add(module)
        for value in list(vars(module).values()):
            if inspect.ismodule(value) or inspect.isclass(value) or inspect.isfunction(value):
                add(value)
    for obj in _reachable(stream_flow):
        add(obj)
    return list(found)


def _reachable(root: Any, limit: int = 20000) -> Iterator[Any]:
    """Classes (with their bases) and functions reachable from *root*'s attributes and containers."""
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack and len(seen) < limit:
        value, depth = stack.pop()
        if value is None or isinstance(value, bool | int | float | str | bytes) or id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, type):
            yield from (k for k in value.__mro__ if k is not object)
            continue
        if depth > 40:
            continue
        children: list[Any] = []
        if inspect.isfunction(value) or inspect.ismethod(value):
            function: Any = getattr(value, "__func__", value)
            yield function
            for cell in function.__closure__ or ():
                try:
                    children.append(cell.cell_contents)
                except ValueError:
                    pass
            children += [function.__defaults__, function.__kwdefaults__]
        elif isinstance(value, Mapping):
            children += [*value.keys(), *value.values()]
        elif isinstance(value, list | tuple | set | frozenset):
            children += list(value)
        elif callable(getattr(value, "func", None)) and hasattr(value, "args"):  # functools.partial
            children += [value.func, value.args, getattr(value, "keywords", None)]
        else:
            children.append(type(value))
            children += _attribute_values(value)
        stack.extend((c, depth + 1) for c in children)


def _attribute_values(value: Any) -> list[Any]:
    out = []
    for name in attribute_names(value):
        try:
            out.append(getattr(value, name))
        except Exception:  # a property or slot that cannot be read: nothing to track
            continue
    return out


# --------------------------------------------------------------------------------------------------
# Lazily resolved values (credentials at tick time)
# --------------------------------------------------------------------------------------------------


class Lazy(Generic[T]):
    """A value computed on first call, then kept for the process's lifetime (thread-safe).

    A failure is not kept: the next call tries again.

    Example:
        >>> targets = Lazy(lambda: [1, 2])
        >>> targets()
        [1, 2]
    """

    __slots__ = ("_factory", "_lock", "_value", "_done")

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._done = False
        self._value: T | None = None

    def __call__(self) -> T:
        if not self._done:
            with self._lock:
                if not self._done:
                    self._value = self._factory()
                    self._done = True
        return self._value  # type: ignore[return-value]
