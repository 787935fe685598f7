"""The Delta sink reader: version, last data commit time and rows, from the transaction log only
(``delta_log``), for local and remote tables alike."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from msgspec.structs import replace as replace_struct

from loom_dagster.core.sinks.connections import DEFAULT_TIMEOUT_S, delta_storage_options
from loom_dagster.core.sinks.delta_log import (
    DeltaCommit,
    DeltaLogFiles,
    LocalDeltaLog,
    delta_commits,
    latest_delta_version,
    open_delta_log,
)
from loom_dagster.core.sinks.reading import JsonScalar, ReadStatus, SinkReading, failed
from loom_dagster.core.sinks.targets import SinkTarget

MAX_COMMITS_PER_READ = 1000
"""At most this many Delta commits are parsed per read (rows_added is flagged partial beyond it)."""
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_delta(
    target: SinkTarget,
    previous: SinkReading | None,
    *,
    now: float,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    log: DeltaLogFiles | None = None,
) -> SinkReading:
    """Delta table version, last data commit time and rows, from the transaction log only.

    *log* overrides where the log is read from (default: ``open_delta_log`` of the target's URI with its
    ``storage_options`` and a request timeout).
    """
    hint = previous.version if previous is not None else None
    try:
        if log is None:
            options = delta_storage_options(target.connect_url, target.storage_options, timeout_s)
            log = open_delta_log(target.connect_url, options)
        if isinstance(log, LocalDeltaLog) and not log.exists():
            return failed(
                target, ReadStatus.MISSING, f"no Delta table at {target.location} (no _delta_log)", now
            )
        latest = latest_delta_version(log, hint)
        if latest is None:
            why = "no commit in its _delta_log" if log.remote else "empty _delta_log"
            return failed(target, ReadStatus.MISSING, f"no Delta table at {target.location} ({why})", now)
        files = log
        return delta_reading(target, previous, latest, lambda new, old: delta_commits(files, new, old), now)
    except OSError as exc:
        if log is not None and not log.remote:
            raise  # a local file system error: read_sink reports it as a read error
        message = _ANSI.sub("", f"cannot reach {target.location}: {exc}")  # delta-rs colours its errors
        return failed(target, ReadStatus.UNREACHABLE, message, now)


def delta_reading(
    target: SinkTarget,
    previous: SinkReading | None,
    latest: int,
    commits: Callable[[int, int], Iterator[DeltaCommit]],
    now: float,
) -> SinkReading:
    """Summarise the commits newer than *previous* (or the newest data commit when there is none)."""
    since = previous.version if previous is not None and previous.version is not None else None
    if since is not None and since > latest:
        since = None  # the table was re-created
    if since == latest and previous is not None:
        return replace_struct(previous, read_at=now, rows_added=0, error=None)
    oldest = max(0, latest - MAX_COMMITS_PER_READ + 1, since + 1 if since is not None else 0)
    newest_data: DeltaCommit | None = None
    newest_any: DeltaCommit | None = None
    rows_added: int | None = 0 if since is not None else None
    for commit in commits(latest, oldest):
        newest_any = newest_any or commit
        if not commit.data_change:
            continue
        newest_data = newest_data or commit
        if rows_added is None:
            break
        rows_added += commit.rows or 0
    extra: dict[str, JsonScalar] = {"latest_version": latest}
    if since is not None and oldest > since + 1:
        extra["rows_added_partial"] = True
    if newest_any is not None:
        extra["latest_operation"] = newest_any.operation
    if newest_data is None:
        return _without_new_data(target, previous, since, latest, now, extra)
    extra["operation"] = newest_data.operation
    return SinkReading(
        asset_key=target.asset_key,
        backend=target.backend,
        status=ReadStatus.OK,
        read_at=now,
        marker=str(newest_data.version),
        version=latest,
        last_modified=newest_data.timestamp,
        rows=newest_data.rows,
        rows_added=rows_added,
        extra=extra,
    )


def _without_new_data(
    target: SinkTarget,
    previous: SinkReading | None,
    since: int | None,
    latest: int,
    now: float,
    extra: dict[str, JsonScalar],
) -> SinkReading:
    if previous is not None and since is not None:
        return replace_struct(previous, read_at=now, version=latest, rows_added=0, error=None, extra=extra)
    return SinkReading(target.asset_key, target.backend, ReadStatus.OK, now, version=latest, extra=extra)
