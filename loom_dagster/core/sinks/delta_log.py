"""A Delta table's transaction log (``_delta_log``), read as files: the newest version and what each
commit says about new data. Data files are never opened.

The log is reached through a ``DeltaLogFiles``: plain files for a local path or ``file://`` URI
(``LocalDeltaLog``), delta-rs' object store with the sink's ``storage_options`` for any other URI
(``ObjectStoreDeltaLog``: s3://, gs://, az://..., the store loom's Delta sink writes through). The reading
logic is the same for both: ``_last_checkpoint`` gives a recent version, the commits after it are probed
by name, and only the newest commit files are parsed, so the cost does not grow with the history.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec

from loom_dagster.core.sinks.connections import local_delta_log
from loom_dagster.core.sinks.reading import as_int

_DELTA_ROW_METRICS = ("numOutputRows", "num_output_rows", "num_added_rows", "numAddedRows")
_LOG_ENTRY_RE = re.compile(r"^(\d{20})\.(?:json|checkpoint(?:\.[^/]*)?\.parquet)$")
_LOG = "_delta_log"


class DeltaLogFiles(Protocol):
    """Read access to the files of one table's ``_delta_log`` (names relative to it)."""

    remote: bool
    """Whether the files are reached over a network (a failure then means *unreachable*)."""

    def read(self, name: str) -> str | None:
        """The file's text; ``None`` when it does not exist."""
        ...

    def has(self, name: str) -> bool:
        """Whether the file exists."""
        ...

    def mtime(self, name: str) -> float | None:
        """The file's modification time (epoch s); ``None`` when it does not exist."""
        ...

    def names(self) -> list[str]:
        """Every file name in the log (empty when there is no log)."""
        ...


class LocalDeltaLog:
    """``_delta_log`` as local files (no deltalake import)."""

    remote = False

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir

    def exists(self) -> bool:
        """Whether the log directory exists."""
        return self.log_dir.is_dir()

    def read(self, name: str) -> str | None:
        try:
            return (self.log_dir / name).read_text()
        except FileNotFoundError:
            return None

    def has(self, name: str) -> bool:
        return (self.log_dir / name).exists()

    def mtime(self, name: str) -> float | None:
        try:
            return (self.log_dir / name).stat().st_mtime
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        try:
            return os.listdir(self.log_dir)
        except FileNotFoundError:
            return []


class ObjectStoreDeltaLog:
    """``_delta_log`` through delta-rs' object store (``deltalake.fs.DeltaStorageHandler``), configured by
    the sink's ``storage_options`` exactly as loom's Delta writer is.

    Raises (from every method): ``OSError`` when the store cannot be reached.
    """

    remote = True

    def __init__(self, table_uri: str, storage_options: Mapping[str, str] | None = None) -> None:
        from deltalake.exceptions import TableNotFoundError
        from deltalake.fs import DeltaStorageHandler

        try:
            self._store: Any = DeltaStorageHandler(table_uri, options=dict(storage_options or {}) or None)
        except TableNotFoundError:  # a file:// URI whose directory does not exist: an empty log
            self._store = None

    def read(self, name: str) -> str | None:
        if self._store is None:
            return None
        try:
            with self._store.open_input_file(f"{_LOG}/{name}") as file:
                return bytes(file.read()).decode()
        except FileNotFoundError:
            return None

    def has(self, name: str) -> bool:
        return self._info(name) is not None

    def mtime(self, name: str) -> float | None:
        info = self._info(name)
        return info.mtime.timestamp() if info is not None and info.mtime is not None else None

    def names(self) -> list[str]:
        from pyarrow.fs import FileSelector, FileType

        if self._store is None:
            return []
        infos = self._store.get_file_info_selector(FileSelector(_LOG, allow_not_found=True))
        return [i.base_name for i in infos if i.type == FileType.File]

    def _info(self, name: str) -> Any:
        from pyarrow.fs import FileType

        if self._store is None:
            return None
        (info,) = self._store.get_file_info([f"{_LOG}/{name}"])
        return info if info.type == FileType.File else None


def open_delta_log(uri: str, storage_options: Mapping[str, str] | None = None) -> DeltaLogFiles:
    """The log of the table at *uri*: local files when it is a path, the object store otherwise."""
    log_dir = local_delta_log(uri)
    if log_dir is not None:
        return LocalDeltaLog(log_dir)
    return ObjectStoreDeltaLog(uri, storage_options)


class DeltaCommit(msgspec.Struct, frozen=True):
    """What one Delta commit says about new data."""

    version: int
    timestamp: float | None
    operation: str
    rows: int | None
    data_change: bool


def commit_name(version: int) -> str:
    """The commit file's name of *version*."""
    return f"{version:020d}.json"


def latest_delta_version(log: DeltaLogFiles | Path, hint: int | None = None) -> int | None:
    """Newest version: from ``_last_checkpoint`` (or *hint*, a version seen before, when newer), probing
    the next commit files by name.

    Costs one small read plus at most a checkpoint interval of existence checks (none past *hint*),
    whatever the history length; falls back to listing the log when there is no usable starting point.
    *log* may be a local ``_delta_log`` directory.
    """
    files = LocalDeltaLog(log) if isinstance(log, Path) else log
    start = _last_checkpoint_version(files)
    if hint is not None and hint > (start if start is not None else -1) and files.has(commit_name(hint)):
        start = hint
    elif start is None or not (files.has(commit_name(start)) or files.has(commit_name(start + 1))):
        return _listed_latest_version(files)
    version = start
    while files.has(commit_name(version + 1)):
        version += 1
    return version


def _last_checkpoint_version(files: DeltaLogFiles) -> int | None:
    try:
        version = json.loads(files.read("_last_checkpoint") or "null").get("version")
    except OSError:
        if files.remote:
            raise
        return None
    except (ValueError, AttributeError):
        return None
    return version if isinstance(version, int) and version >= 0 else None


def _listed_latest_version(files: DeltaLogFiles) -> int | None:
    versions = [int(m[1]) for name in files.names() if (m := _LOG_ENTRY_RE.match(name))]
    return max(versions) if versions else None


def delta_commits(files: DeltaLogFiles, newest: int, oldest: int) -> Iterator[DeltaCommit]:
    """Commits from *newest* down to *oldest* (inclusive), newest first; stops at a missing file. A
    commit without a time in its ``commitInfo`` takes its file's modification time."""
    for version in range(newest, oldest - 1, -1):
        name = commit_name(version)
        text = files.read(name)
        if text is None:
            return
        commit = parse_delta_commit(version, text.splitlines())
        if commit.timestamp is None:
            commit = msgspec.structs.replace(commit, timestamp=files.mtime(name))
        yield commit


def parse_delta_commit(version: int, lines: Sequence[str], fallback_ts: float | None = None) -> DeltaCommit:
    """One commit file: ``commitInfo`` time, operation and row metrics; new data = an ``add`` with dataChange."""
    info: Mapping[str, Any] = {}
    added, counted, data_change = 0, False, False
    for line in lines:
        if not line.strip():
            continue
        action = json.loads(line)
        if "commitInfo" in action:
            info = action["commitInfo"] or {}
        elif "add" in action and (action["add"] or {}).get("dataChange", True):
            data_change = True
            records = _stats_rows(action["add"].get("stats"))
            if records is not None:
                added, counted = added + records, True
    rows = metric_rows(info.get("operationMetrics"))
    return DeltaCommit(
        version=version,
        timestamp=_commit_time(info) or fallback_ts,
        operation=str(info.get("operation") or ""),
        rows=rows if rows is not None else (added if counted else None),
        data_change=data_change,
    )


def metric_rows(metrics: Any) -> int | None:
    """Rows written, from ``operationMetrics`` (Spark ``numOutputRows``, delta-rs ``num_added_rows``)."""
    if not isinstance(metrics, Mapping):
        return None
    for key in _DELTA_ROW_METRICS:
        value = as_int(metrics.get(key))
        if value is not None:
            return value
    return None


def _stats_rows(stats: Any) -> int | None:
    if not isinstance(stats, str) or "numRecords" not in stats:
        return None
    try:
        return as_int(json.loads(stats).get("numRecords"))
    except ValueError:
        return None


def _commit_time(info: Mapping[str, Any]) -> float | None:
    millis = as_int(info.get("inCommitTimestamp")) or as_int(info.get("timestamp"))
    return millis / 1000.0 if millis else None
