"""Deployment records and the per-flow lock, under a state directory on this host.

Layout: ``<state_dir>/flows/<flow>/deployment.json`` (the current deployment), ``history.jsonl``
(every deployment, newest last), ``lock`` (held around stop-previous -> launch -> record),
``snapshots/<time>-<hash>/`` (the config files each deployment runs, copied at deploy time) and
``job.log`` / ``status-<n>.json`` (written by the job).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from loom_dagster.errors import DeploymentError
from loom_dagster.launchers.base import LaunchedJob, LauncherRef

STATE_DIR_VARIABLE = "LOOM_DAGSTER_STATE_DIR"
_KEPT_SNAPSHOTS = 10


def default_state_dir() -> Path:
    """``$LOOM_DAGSTER_STATE_DIR``, else ``$DAGSTER_HOME/loom``, else ``~/.loom-dagster``."""
    explicit = os.environ.get(STATE_DIR_VARIABLE)
    if explicit:
        return Path(explicit)
    home = os.environ.get("DAGSTER_HOME")
    return Path(home) / "loom" if home else Path.home() / ".loom-dagster"


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
            path.write_bytes(data)
            paths.append(str(path))
        yield tuple(paths)


def flow_dir_name(flow_name: str) -> str:
    """Filesystem-safe directory name for a flow."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", flow_name)


class DeploymentStore:
    """Reads and writes deployment records for the flows of one state directory.

    Example:
        >>> import tempfile
        >>> store = DeploymentStore(tempfile.mkdtemp())
        >>> store.current("orders") is None
        True
    """

    def __init__(self, state_dir: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(state_dir) if state_dir else default_state_dir()

    def flow_dir(self, flow_name: str) -> Path:
        """Directory holding one flow's record, lock, logs and status files."""
        path = self.root / "flows" / flow_dir_name(flow_name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def current(self, flow_name: str) -> Deployment | None:
        """The flow's current deployment record, or ``None``."""
        path = self.root / "flows" / flow_dir_name(flow_name) / "deployment.json"
        try:
            return Deployment.decode(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:  # msgspec.DecodeError / ValidationError
            raise DeploymentError(f"deployment record {path} is unreadable: {exc}") from exc

    def current_many(self, flow_names: Iterable[str]) -> dict[str, Deployment | None]:
        """The current record of each of *flow_names* (one read each here; a store that can read them
        all in one request, the cluster's, does)."""
        return {name: self.current(name) for name in flow_names}

    def all(self) -> list[Deployment]:
        """Every flow's current deployment in this state directory."""
        flows = self.root / "flows"
        if not flows.is_dir():
            return []
        records = []
        for child in sorted(flows.iterdir()):
            if (child / "deployment.json").is_file():
                record = self.current_from_dir(child)
                if record is not None:
                    records.append(record)
        return records

    def current_from_dir(self, directory: Path) -> Deployment | None:
        """Read the record in *directory* (skipping unreadable ones)."""
        try:
            return Deployment.decode((directory / "deployment.json").read_bytes())
        except (OSError, ValueError):
            return None

    def save(self, deployment: Deployment, *, history: bool = True) -> None:
        """Write the flow's current record atomically, and append it to its history."""
        directory = self.flow_dir(deployment.flow_name)
        tmp = directory / f".deployment.{os.getpid()}.tmp"
        tmp.write_bytes(deployment.encode(indent=2))
        os.replace(tmp, directory / "deployment.json")
        if history:
            with open(directory / "history.jsonl", "ab") as handle:
                handle.write(deployment.encode() + b"\n")

    def mark_stopped(self, deployment: Deployment, by: str) -> Deployment:
        """Record that the flow was stopped on purpose (undeploy)."""
        stopped = msgspec.structs.replace(deployment, stopped_at=time.time(), stopped_by=by)
        self.save(stopped)
        return stopped

    def history(self, flow_name: str) -> list[Deployment]:
        """Every recorded deployment of a flow, oldest first."""
        path = self.root / "flows" / flow_dir_name(flow_name) / "history.jsonl"
        if not path.is_file():
            return []
        return [Deployment.decode(line) for line in path.read_bytes().splitlines() if line]

    def snapshot_config(self, flow_name: str, files: Sequence[ConfigFile], label: str) -> tuple[str, ...]:
        """Keep a deployment's config files (name and content, in merge order) as a snapshot of its own;
        return where the job reads them.

        Every launch of the deployment (first start, restart by the health sensor, rollback) reads the
        snapshot, never the live files: editing a config in place changes nothing until the next deploy.
        The copies may hold secrets, as the originals do: the directory is private (0700, files 0600).
        """
        snapshots = self.flow_dir(flow_name) / "snapshots"
        directory = snapshots / f"{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}-{label}"
        directory.mkdir(parents=True, mode=0o700)
        copies = []
        for name, data in files:
            target = directory / name
            target.touch(mode=0o600)
            target.write_bytes(data)
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
        history = directory / "history.jsonl"
        if history.is_file():
            for line in history.read_text().splitlines()[-_KEPT_SNAPSHOTS:]:
                try:
                    records.append(Deployment.decode(line))
                except ValueError:
                    continue
        return records

    def lock_held(self, flow_name: str) -> bool:
        """True while a deploy, restart or stop of the flow holds its lock (from any process)."""
        path = self.root / "flows" / flow_dir_name(flow_name) / "lock"
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

    @contextmanager
    def lock(self, flow_name: str, holder: str) -> Iterator[None]:
        """Hold the flow's deploy lock; fail at once, naming the holder, if another deploy holds it."""
        path = self.flow_dir(flow_name) / "lock"
        handle = open(path, "a+")
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
            yield
        finally:
            handle.close()
