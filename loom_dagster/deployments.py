"""Deployment records and the per-flow lock, under a state directory on this host.

Layout: ``<state_dir>/flows/<flow>/deployment.json`` (the current deployment), ``history.jsonl``
(every deployment, newest last), ``lock`` (held around stop-previous -> launch -> record) and
``job.log`` / ``status-<n>.json`` (written by the job).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loom_dagster.errors import DeploymentError
from loom_dagster.launchers.base import LaunchedJob

STATE_DIR_VARIABLE = "LOOM_DAGSTER_STATE_DIR"


def default_state_dir() -> Path:
    """``$LOOM_DAGSTER_STATE_DIR``, else ``$DAGSTER_HOME/loom``, else ``~/.loom-dagster``."""
    explicit = os.environ.get(STATE_DIR_VARIABLE)
    if explicit:
        return Path(explicit)
    home = os.environ.get("DAGSTER_HOME")
    return Path(home) / "loom" if home else Path.home() / ".loom-dagster"


@dataclass(frozen=True)
class Deployment:
    """What is (or was) deployed for a flow, as recorded by the deployer."""

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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stopped_on_purpose(self) -> bool:
        """True after an undeploy: health sensors must not restart it."""
        return self.stopped_at is not None

    @property
    def host(self) -> str:
        """Host the job runs on; liveness can only be read there."""
        return self.job.host

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form."""
        data = asdict(self)
        data["job"] = self.job.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Deployment:
        """Inverse of ``to_json``."""
        fields = dict(data)
        fields["job"] = LaunchedJob.from_json(fields["job"])
        return cls(**fields)


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
            return Deployment.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise DeploymentError(f"deployment record {path} is unreadable: {exc}") from exc

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
            return Deployment.from_json(json.loads((directory / "deployment.json").read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, deployment: Deployment, *, history: bool = True) -> None:
        """Write the flow's current record atomically, and append it to its history."""
        directory = self.flow_dir(deployment.flow_name)
        data = deployment.to_json()
        tmp = directory / f".deployment.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, directory / "deployment.json")
        if history:
            with open(directory / "history.jsonl", "a") as handle:
                handle.write(json.dumps(data, sort_keys=True) + "\n")

    def mark_stopped(self, deployment: Deployment, by: str) -> Deployment:
        """Record that the flow was stopped on purpose (undeploy)."""
        stopped = replace(deployment, stopped_at=time.time(), stopped_by=by)
        self.save(stopped)
        return stopped

    def history(self, flow_name: str) -> list[Deployment]:
        """Every recorded deployment of a flow, oldest first."""
        path = self.root / "flows" / flow_dir_name(flow_name) / "history.jsonl"
        if not path.is_file():
            return []
        return [Deployment.from_json(json.loads(line)) for line in path.read_text().splitlines() if line]

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
