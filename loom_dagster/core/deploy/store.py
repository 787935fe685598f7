"""Deployment records and the per-flow lock, under a private state directory on this host.

Layout: ``<state_dir>/flows/<flow>/deployment.json`` (the current deployment), ``history.jsonl``
(the last deployments, newest last), ``env/<id>.json`` (the env values of recorded deployments),
``lock`` (held around stop-previous -> launch -> record), ``snapshots/<time>-<hash>/`` (the config files
each deployment runs, copied at deploy time) and ``<time>/<n>/job.log`` / ``status-<n>.json`` (written
by the job). ``<state_dir>/config-hash.key`` is the installation's key for config hashes.

Everything is private: directories 0700 and files 0600 whatever the umask, and a state directory owned
by another user or writable by group or others is refused (it would let them read the secrets kept
there, or plant a record naming code to import). Records hold no secret value: a deployment's ``env``
values go to a 0600 file of their own, the record keeps the names and a reference, and a read puts the
values back (restart, rollback, rewind). Every record write is fsynced, file and directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from loom_dagster.core.deploy.launch_records import LaunchedJob, LauncherRef, LaunchRequest
from loom_dagster.core.errors import DeploymentError

_log = logging.getLogger(__name__)

STATE_DIR_VARIABLE = "LOOM_DAGSTER_STATE_DIR"
HASH_KEY_VARIABLE = "LOOM_DAGSTER_CONFIG_HASH_KEY"
"""The installation's config-hash key, for installations without one shared state directory (every
Dagster pod on Kubernetes gets it from one Secret); else ``<default state dir>/config-hash.key``."""
HASH_KEY_FILE = "config-hash.key"
KEPT_HISTORY = 50
"""History entries kept per flow (as the Kubernetes store keeps)."""
_KEPT_SNAPSHOTS = 10
_FILE_REF = "file:"
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def default_state_dir() -> Path:
    """``$LOOM_DAGSTER_STATE_DIR``, else ``$DAGSTER_HOME/loom``, else ``~/.loom-dagster``."""
    explicit = os.environ.get(STATE_DIR_VARIABLE)
    if explicit:
        return Path(explicit)
    home = os.environ.get("DAGSTER_HOME")
    return Path(home) / "loom" if home else Path.home() / ".loom-dagster"


# --------------------------------------------------------------------------------------------------
# Private files and directories
# --------------------------------------------------------------------------------------------------


class StateDirectoryError(DeploymentError):
    """A state directory another user could read or write: refused, nothing was read or written."""


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_private_dir(
    path: str | os.PathLike[str], *, owned: bool = True, what: str = "state directory"
) -> None:
    """Refuse *path* when another user owns it (with *owned*) or group or others may write to it; tighten
    one of ours that others may read to 0700. ``StateDirectoryError`` names the path, owner, mode, fix."""
    directory = Path(path)
    info = os.stat(directory)
    mode = stat.S_IMODE(info.st_mode)
    foreign = owned and info.st_uid != os.geteuid()
    if foreign or mode & 0o022:
        problem = "belongs to another user" if foreign else "is writable by group or others"
        raise StateDirectoryError(
            f"{what} {directory} (owner {_owner(info.st_uid)}, mode {mode:04o}) {problem}; it holds deployment "
            "records, config snapshots with secrets and the config-hash key, so loom-dagster refuses it. "
            f"Fix: `chown {os.geteuid()} {directory} && chmod 700 {directory}` (as its owner or root), or "
            f"point ${STATE_DIR_VARIABLE} (or the resource's state_dir) at a directory of your own."
        )
    if info.st_uid == os.geteuid() and mode & 0o077:
        os.chmod(directory, PRIVATE_DIR_MODE)


def private_dir(path: str | os.PathLike[str]) -> Path:
    """*path* as a directory of ours, mode 0700 whatever the umask (missing parents created 0700 too)."""
    directory = Path(path)
    missing = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for created in reversed(missing):
        try:
            os.mkdir(created, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(created, PRIVATE_DIR_MODE)  # the umask may have taken bits away
        fsync_dir(created.parent)
    if not missing:
        info = os.stat(directory)
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != PRIVATE_DIR_MODE:
            os.chmod(directory, PRIVATE_DIR_MODE)
    return directory


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (a file created or renamed in it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_private_file(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Replace *path* with *data* atomically, mode 0600 whatever the umask; *durable*: fsync the file
    before the rename and the directory after it, so a crash leaves the old content or the new one."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, target)
    if durable:
        fsync_dir(target.parent)


def open_private(path: str | os.PathLike[str], flags: int) -> int:
    """``os.open`` of a file created 0600 whatever the umask (an existing one of ours is tightened)."""
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        info = os.fstat(fd)
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


# --------------------------------------------------------------------------------------------------
# The installation's key (config hashes, env file names)
# --------------------------------------------------------------------------------------------------

_KEYS: dict[str, bytes] = {}
_KEYS_LOCK = threading.Lock()


def installation_key() -> bytes:
    """The installation's secret key: ``$LOOM_DAGSTER_CONFIG_HASH_KEY``, else the 0600 file
    ``config-hash.key`` of the default state directory, created with 32 random bytes on first use.

    Every process of one installation reads the same key (so a config hashes alike in the code server,
    the daemon and a run); another installation has another. Where the file cannot be written (a
    read-only home), a key of this process is used, with a warning: hashes then differ between processes.
    """
    explicit = os.environ.get(HASH_KEY_VARIABLE, "").strip()
    if explicit:
        if len(explicit) < 32:
            raise DeploymentError(
                f"${HASH_KEY_VARIABLE} is too short ({len(explicit)} characters): use at least 32 random "
                "characters, e.g. `openssl rand -hex 32`"
            )
        return explicit.encode()
    path = default_state_dir() / HASH_KEY_FILE
    source = str(path)
    with _KEYS_LOCK:
        known = _KEYS.get(source)
        if known is None:
            try:
                known = _read_or_create_key(path)
            except StateDirectoryError:
                raise
            except OSError as exc:
                _log.warning(
                    "loom-dagster: cannot keep the config-hash key in %s (%s); this process uses a key of "
                    "its own, so its config hashes differ from other processes'. Set $%s (the same value "
                    "everywhere) or make the state directory writable.",
                    path,
                    exc,
                    HASH_KEY_VARIABLE,
                )
                known = secrets.token_hex(32).encode()
            _KEYS[source] = known
        return known


def installation_key_id() -> str:
    """A short id of the installation's key that reveals nothing of it (which key made a hash)."""
    return hmac.new(installation_key(), b"loom-dagster key id", hashlib.sha256).hexdigest()[:16]


def keyed_digest(data: bytes, length: int = 32) -> str:
    """HMAC-SHA256 of *data* under the installation's key, *length* hex characters."""
    return hmac.new(installation_key(), data, hashlib.sha256).hexdigest()[:length]


def _read_or_create_key(path: Path) -> bytes:
    root = path.parent
    if root.exists():
        check_private_dir(root)
    else:
        private_dir(root)
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".config-hash.", suffix=".tmp")
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        os.write(fd, secrets.token_hex(32).encode() + b"\n")
        os.fsync(fd)
        os.close(fd)
        try:
            os.link(tmp, path)  # create-if-absent: two processes starting at once agree on one key
        except FileExistsError:
            pass
        fsync_dir(root)
    finally:
        os.unlink(tmp)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise StateDirectoryError(
                f"config-hash key {path} is owned by {_owner(info.st_uid)}, not by this user: refused. "
                f"Fix: remove it (a new key is made; config hashes change once) or `chown {os.geteuid()} {path}`."
            )
        if stat.S_IMODE(info.st_mode) != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
        key = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    if len(key) < 32:
        raise DeploymentError(f"config-hash key {path} is damaged (remove it: a new one is made)")
    return key


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


class Deployment(msgspec.Struct, frozen=True):
    """What is (or was) deployed for a flow, as recorded by the deployer.

    ``launcher`` names the launcher that ran the job (records older than the field: the local one).

    Example:
        >>> record = Deployment.decode(b'{"flow_name": "f", "plan_hash": "p", "config_hash": "c", '
        ...     b'"deployed_at": 1, "job": {"flow_name": "f", "launcher": "local", "host": "h", '
        ...     b'"processes": [{"pid": 7, "start_ticks": 1}], "log_path": "", "started_at": 1, '
        ...     b'"request": {"flow_name": "f", "import_path": "m:f", "config_files": [], '
        ...     b'"environment": "test", "plan_hash": "p", "config_hash": "c"}}}')
        >>> record.job.processes[0].pid, record.launcher.path
        (7, 'local')
    """

    flow_name: str
    job: LaunchedJob
    plan_hash: str
    config_hash: str
    deployed_at: float
    run_id: str | None = None
    previous_plan_hash: str | None = None
    stopped_at: float | None = None
    stopped_by: str | None = None
    restarts: int = 0
    extra: dict[str, Any] = {}
    launcher: LauncherRef = LauncherRef()

    @property
    def stopped_on_purpose(self) -> bool:
        """True after an undeploy: health sensors must not restart it."""
        return self.stopped_at is not None

    @property
    def host(self) -> str:
        """Host the job runs on; liveness can only be read there."""
        return self.job.host

    def runs_process(self, host: str, pid: int | None) -> bool:
        """Whether this deployment's job is the process *pid* on *host* (a process recorded with pid 0
        and a host of its own, a Kubernetes pod, is known by that host alone)."""
        if pid is None:
            return False
        return any((p.host or self.host) == host and p.pid in (pid, 0) for p in self.job.processes)

    def encode(self, indent: int = 0) -> bytes:
        """The record as JSON (keys sorted; *indent* > 0 pretty-prints)."""
        data = msgspec.json.encode(self, order="sorted")
        return msgspec.json.format(data, indent=indent) if indent else data

    @classmethod
    def decode(cls, data: bytes | str) -> Deployment:
        """A record from its JSON (also the layout written before the records were structs)."""
        return msgspec.json.decode(data, type=cls)

    def with_request(self, request: LaunchRequest) -> Deployment:
        """This record with its job's launch request replaced."""
        return msgspec.structs.replace(self, job=msgspec.structs.replace(self.job, request=request))


class UnreadableRecord(msgspec.Struct, frozen=True):
    """A deployment record that exists but cannot be read: the flow (its directory or ConfigMap name),
    where the record is, and why (``loom-dagster status`` shows it as such)."""

    flow: str
    location: str
    reason: str


ConfigFile = tuple[str, bytes]
"""One config file of a snapshot: its name in merge order (``00-base.yaml``) and its content."""


def read_config_files(files: Sequence[str]) -> list[ConfigFile]:
    """The config *files* (in merge order) as snapshot entries, read once."""
    return [
        (f"{index:02d}-{Path(source).name}", Path(source).read_bytes()) for index, source in enumerate(files)
    ]


@contextmanager
def scratch_copy(files: Sequence[ConfigFile]) -> Iterator[tuple[str, ...]]:
    """Snapshot entries written to a private scratch directory for the block; their paths, in order."""
    with tempfile.TemporaryDirectory(prefix="loom-snapshot-") as scratch:
        paths = []
        for name, data in files:
            path = Path(scratch) / name
            write_private_file(path, data, durable=False)
            paths.append(str(path))
        yield tuple(paths)


def flow_dir_name(flow_name: str) -> str:
    """Filesystem-safe directory name for a flow."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", flow_name)


_ENV_FILE = re.compile(r"env/[0-9a-f]{16,64}\.json")
_WARNED: set[str] = set()


def _decode_reason(data: bytes, exc: Exception) -> str:
    """Why a record does not decode, in words (a cut-off file says so)."""
    if not data.strip():
        return "the file is empty (a write cut short?)"
    return f"{exc} ({len(data)} bytes)"


def history_records(data: bytes | str, *, warn: bool, where: str = "history") -> list[Deployment]:
    """The readable records of a ``history.jsonl`` text, oldest first; a line that does not decode (a
    write cut short by a crash) is skipped, with a warning naming *where* when *warn*."""
    records = []
    lines = data.encode() if isinstance(data, str) else data
    for number, line in enumerate(lines.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(Deployment.decode(line))
        except ValueError as exc:
            if warn:
                _log.warning(
                    "deployment history %s: line %d is unreadable and skipped (%s)",
                    where,
                    number,
                    _decode_reason(line, exc),
                )
    return records


class DeploymentStore:
    """Reads and writes deployment records for the flows of one private state directory.

    Example:
        >>> import tempfile
        >>> store = DeploymentStore(tempfile.mkdtemp())
        >>> store.current("orders") is None
        True
    """

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(state_dir) if state_dir else default_state_dir()
        self._checked = False
        self._held: dict[str, DeployLock] = {}  # the deploy locks this store holds, by flow

    def _ready(self, create: bool = False) -> bool:
        """Whether the state directory exists, refused (``StateDirectoryError``) if another user could
        read or write it; created 0700 first with *create*."""
        if self._checked:
            return True
        if self.root.exists():
            check_private_dir(self.root)
        elif create:
            private_dir(self.root)
        else:
            return False
        self._checked = True
        return True

    def _directory(self, flow_name: str) -> Path:
        return self.root / "flows" / flow_dir_name(flow_name)

    def flow_dir(self, flow_name: str) -> Path:
        """Directory holding one flow's record, lock, logs and status files (created 0700)."""
        self._ready(create=True)
        private_dir(self.root / "flows")  # tightened too where an older version made it 0755
        return private_dir(self._directory(flow_name))

    def current(self, flow_name: str) -> Deployment | None:
        """The flow's current deployment record (its env values read back), or ``None``."""
        if not self._ready():
            return None
        directory = self._directory(flow_name)
        path = directory / "deployment.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            record = Deployment.decode(data)
        except ValueError as exc:  # msgspec.DecodeError / ValidationError
            raise DeploymentError(
                f"deployment record {path} is unreadable: {_decode_reason(data, exc)}"
            ) from exc
        return self._with_env(record, directory)

    def current_many(self, flow_names: Iterable[str]) -> dict[str, Deployment | None]:
        """The current record of each of *flow_names* (one read each here; a store that can read them
        all in one request, the cluster's, does)."""
        return {name: self.current(name) for name in flow_names}

    def all(self) -> list[Deployment]:
        """Every flow's current deployment in this state directory (unreadable ones: see ``scan``)."""
        return self.scan()[0]

    def scan(self) -> tuple[list[Deployment], list[UnreadableRecord]]:
        """Every flow's current record, and the records that exist but cannot be read (and why)."""
        flows = self.root / "flows"
        if not self._ready() or not flows.is_dir():
            return [], []
        records: list[Deployment] = []
        unreadable: list[UnreadableRecord] = []
        for child in sorted(flows.iterdir()):
            path = child / "deployment.json"
            if not child.is_dir():
                continue
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                unreadable.append(UnreadableRecord(child.name, str(path), f"{type(exc).__name__}: {exc}"))
                continue
            try:
                records.append(self._with_env(Deployment.decode(data), child))
            except ValueError as exc:
                unreadable.append(UnreadableRecord(child.name, str(path), _decode_reason(data, exc)))
        return records, unreadable

    def current_from_dir(self, directory: Path) -> Deployment | None:
        """Read the record in *directory* as written (env values not read back; unreadable: ``None``)."""
        try:
            return Deployment.decode((directory / "deployment.json").read_bytes())
        except (OSError, ValueError):
            return None

    def save(self, deployment: Deployment, *, history: bool = True) -> None:
        """Write the flow's current record atomically and durably (fsync of the file and the directory),
        and append it to its history (kept to the last ``KEPT_HISTORY``). The env values go to a 0600
        file of their own; the record keeps their names and a reference. Under the flow's lock, only
        while it is still held (:meth:`ensure_held`)."""
        self.ensure_held(deployment.flow_name, "record the deployment")
        directory = self.flow_dir(deployment.flow_name)
        stored = self._stored(deployment, directory)
        write_private_file(directory / "deployment.json", stored.encode(indent=2))
        if history:
            self._append_history(directory, stored)
        self._prune_env(directory)

    def mark_stopped(self, deployment: Deployment, by: str) -> Deployment:
        """Record that the flow was stopped on purpose (undeploy)."""
        stopped = msgspec.structs.replace(deployment, stopped_at=time.time(), stopped_by=by)
        self.save(stopped)
        return stopped

    def history(self, flow_name: str) -> list[Deployment]:
        """The flow's recorded deployments, oldest first (the last ``KEPT_HISTORY``); a line that cannot
        be read (a write cut short by a crash) is skipped with a warning."""
        directory = self._directory(flow_name)
        if not self._ready():
            return []
        return [self._with_env(record, directory) for record in self._history_lines(directory, warn=True)]

    def _history_lines(self, directory: Path, warn: bool = False) -> list[Deployment]:
        """The history's readable records as written (env values not read back)."""
        path = directory / "history.jsonl"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        return history_records(data, warn=warn, where=str(path))

    def _append_history(self, directory: Path, stored: Deployment) -> None:
        """Append *stored* on a line of its own (after a torn last line too), fsynced; past
        ``KEPT_HISTORY`` entries, or when an entry still holds env values (written by an older version),
        rewrite the file atomically with the last entries, their env values moved out."""
        path = directory / "history.jsonl"
        line = stored.encode() + b"\n"
        kept = self._history_lines(directory)
        if len(kept) + 1 > KEPT_HISTORY or any(_holds_env_values(r) for r in kept):
            entries = [self._stored(r, directory).encode() + b"\n" for r in kept[-(KEPT_HISTORY - 1) :]]
            write_private_file(path, b"".join([*entries, line]))
            return
        created = not path.exists()
        fd = open_private(path, os.O_RDWR | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # the last line was cut short: never glue this record onto it
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(directory)

    def _stored(self, deployment: Deployment, directory: Path) -> Deployment:
        """*deployment* as written: its env values moved to ``env/<id>.json`` (0600, named by a keyed
        digest of its content, shared by records with the same env), the record keeping the names."""
        request = deployment.job.request
        if not request.env or request.env_ref:
            return deployment
        data = msgspec.json.encode(dict(request.env), order="sorted")
        name = f"env/{keyed_digest(data)}.json"
        target = directory / name
        if not target.is_file():
            private_dir(directory / "env")
            write_private_file(target, data)
        names = tuple((key, "") for key, _ in request.env)
        return deployment.with_request(msgspec.structs.replace(request, env=names, env_ref=_FILE_REF + name))

    def _with_env(self, deployment: Deployment, directory: Path) -> Deployment:
        """*deployment* with its env values read back from the file its record references; left as
        written (names only, the reference kept: a launch refuses it) when that file cannot be read."""
        request = deployment.job.request
        if not request.env_ref.startswith(_FILE_REF):
            return deployment
        name = request.env_ref[len(_FILE_REF) :]
        try:
            if not _ENV_FILE.fullmatch(name):
                raise ValueError(f"not an env file of this store: {name!r}")
            values = msgspec.json.decode((directory / name).read_bytes(), type=dict[str, str])
            env = tuple((key, values[key]) for key, _ in request.env)
        except (OSError, ValueError, KeyError) as exc:
            if str(directory / name) not in _WARNED:  # once per process: a health tick reads it often
                _WARNED.add(str(directory / name))
                _log.warning(
                    "deployment record of flow %r: its env values (%s) cannot be read back (%s); a launch "
                    "of it is refused until the flow is materialized again",
                    deployment.flow_name,
                    directory / name,
                    exc,
                )
            return deployment
        return deployment.with_request(msgspec.structs.replace(request, env=env, env_ref=""))

    def _prune_env(self, directory: Path) -> None:
        """Remove the env files no record of *directory* (current or history) references any more."""
        env_dir = directory / "env"
        if not env_dir.is_dir():
            return
        records = [*self._history_lines(directory), self.current_from_dir(directory)]
        referenced = {
            r.job.request.env_ref[len(_FILE_REF) :]
            for r in records
            if r is not None and r.job.request.env_ref.startswith(_FILE_REF)
        }
        for file in env_dir.iterdir():
            if f"env/{file.name}" not in referenced and not file.name.startswith("."):
                file.unlink(missing_ok=True)

    def snapshot_config(self, flow_name: str, files: Sequence[ConfigFile], label: str) -> tuple[str, ...]:
        """Keep a deployment's config files (name and content, in merge order) as a snapshot of its own;
        return where the job reads them.

        Every launch of the deployment (first start, restart by the health sensor, rollback) reads the
        snapshot, never the live files: editing a config in place changes nothing until the next deploy.
        The copies may hold secrets, as the originals do: the directory is private (0700, files 0600).
        """
        snapshots = private_dir(self.flow_dir(flow_name) / "snapshots")
        directory = private_dir(
            snapshots / f"{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}-{label}"
        )
        copies = []
        for name, data in files:
            target = directory / name
            write_private_file(target, data)
            copies.append(str(target))
        self._prune_snapshots(snapshots, keep=_KEPT_SNAPSHOTS, referenced=directory)
        return tuple(copies)

    @contextmanager
    def readable_config(self, flow_name: str, files: Sequence[str]) -> Iterator[tuple[str, ...]]:
        """A deployment's config snapshot as files readable here (they are, for this store)."""
        yield tuple(files)

    def location(self) -> str:
        """Where the records live, for messages."""
        return f"state directory {self.root}"

    def _prune_snapshots(self, snapshots: Path, keep: int, referenced: Path) -> None:
        """Drop the oldest snapshots beyond *keep*, never one a recorded deployment still points at."""
        in_use = {referenced}
        for deployment in self.all_records(snapshots.parent.name):
            for file in deployment.job.request.config_files:
                in_use.add(Path(file).parent)
        directories = sorted(d for d in snapshots.iterdir() if d.is_dir())
        for directory in directories[:-keep]:
            if directory not in in_use:
                shutil.rmtree(directory, ignore_errors=True)

    def all_records(self, flow_dir: str) -> list[Deployment]:
        """The current record and the last history entries of one flow directory (for snapshot pruning)."""
        directory = self.root / "flows" / flow_dir
        records = [r for r in (self.current_from_dir(directory),) if r is not None]
        return records + self._history_lines(directory)[-_KEPT_SNAPSHOTS:]

    def lock_held(self, flow_name: str) -> bool:
        """True while a deploy, restart or stop of the flow holds its lock (from any process)."""
        if not self._ready():
            return False
        path = self._directory(flow_name) / "lock"
        try:
            handle = open(path)  # noqa: SIM115 - closed below; never creates the file
        except OSError:
            return False
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            handle.close()
        return False

    def locks_held(self, flow_names: Iterable[str]) -> set[str]:
        """Those of *flow_names* whose lock is held now (a health tick asks for every flow)."""
        return {name for name in flow_names if self.lock_held(name)}

    def ensure_held(self, flow_name: str, step: str) -> None:
        """Before *step* (a change: drain, launch, record), make sure the flow's lock this store holds
        is still held; ``DeployLockLost`` otherwise, saying what was and was not done. Nothing to check
        when this store holds no lock of the flow."""
        held = self._held.get(flow_name)
        if held is not None:
            held.ensure_held(step)

    @contextmanager
    def holding(self, held: DeployLock) -> Iterator[DeployLock]:
        """Register *held* as this store's lock of its flow while the block runs (``ensure_held``)."""
        self._held[held.flow_name] = held
        try:
            yield held
        finally:
            self._held.pop(held.flow_name, None)

    @contextmanager
    def lock(self, flow_name: str, holder: str) -> Iterator[DeployLock]:
        """Hold the flow's deploy lock; fail at once, naming the holder, if another deploy holds it.
        A flock on this host is never lost: the lock it yields is always held."""
        path = self.flow_dir(flow_name) / "lock"
        handle = os.fdopen(open_private(path, os.O_RDWR), "r+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                handle.seek(0)
                other = handle.read().strip() or "another process"
                raise DeploymentError(
                    f"flow {flow_name!r} is being deployed or stopped by {other}; this request changed "
                    "nothing. Wait for it to finish, then materialize again if needed."
                ) from exc
            handle.seek(0)
            handle.truncate()
            handle.write(f"{holder} (pid {os.getpid()} on {socket.gethostname()}, since {time.ctime()})")
            handle.flush()
            with self.holding(DeployLock(flow_name, holder)) as held:
                yield held
        finally:
            handle.close()


class DeployLockLost(DeploymentError):
    """A deploy, restart or stop lost its flow's lock (another holder took it over): it stopped before
    its next change; the message says what it did and did not do."""


class DeployLock:
    """A flow's deploy lock as its holder sees it: ``ensure_held(step)`` before each change. This one
    (a flock, :meth:`DeploymentStore.lock`) is never lost; the cluster's Lease can be
    (``KubernetesDeploymentStore``), and then raises :class:`DeployLockLost`.

    Example:
        >>> DeployLock("orders", "run 1").ensure_held("launch the new version")
    """

    def __init__(self, flow_name: str, holder: str) -> None:
        self.flow_name = flow_name
        self.holder = holder
        self.steps: list[str] = []
        """The steps checked so far (each then done, or being done, under the lock)."""

    @property
    def lost(self) -> str | None:
        """Why the lock is no longer held (``None``: held)."""
        return None

    def ensure_held(self, step: str) -> None:
        """Raise :class:`DeployLockLost` before *step* when the lock is lost; else note the step."""
        self.steps.append(step)


def _holds_env_values(record: Deployment) -> bool:
    """True for a record written with its env values in it (by an older version)."""
    request = record.job.request
    return bool(request.env) and not request.env_ref
