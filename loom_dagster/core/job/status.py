"""The status record a running flow job keeps on disk, and how to read it.

Standard library, msgspec and :mod:`loom_dagster.core.redact` only: a launcher, a sensor or a health check
imports this module without importing loom or bytewax. The records are ``msgspec.Struct``s (``to_dict`` / ``from_dict``
for callers holding decoded JSON).

The record is one small JSON object (keys sorted), rewritten atomically (temp file + ``os.replace``) at start,
on every state change and on every heartbeat, so a reader sees either the previous or the next
complete version, never a torn one. Times are epoch seconds (floats). Example::

    {"flow": "orders_enrichment", "pid": 4242, "host": "worker-1", "state": "running",
     "started_at": 1795885410.6, "heartbeat_at": 1795885471.6, "connected_at": 1795885412.0,
     "last_poll_at": 1795885471.5, "records_in": 1000, "records_out": 2000, "errors": 1,
     "sinks": {"orders_delta": {"last_write_at": 1795885470.2, "records": 1000, "failed_writes": 0}},
     "sink_error": null, "exit_code": null, "error": null, "process_id": null, "partitions": 1}

``sink_error`` is the last failed sink write (flush) of the process, e.g.::

    {"sink": "readings_sql", "at": 1795885470.9, "first_at": 1795885470.9, "count": 1,
     "error_type": "OperationalError", "recovered_at": null,
     "error": "(sqlite3.OperationalError) no such table: readings\n[SQL: INSERT INTO ...]"}

The text is redacted and kept whole up to ``MAX_SINK_ERROR_CHARS`` (head and tail beyond).
``count`` is how many write calls to that sink have failed in this process. The entry is kept as
history when a later write to the same sink succeeds: ``recovered_at`` is then set (and cleared
again by the next failure), so a reader treats an entry with ``recovered_at`` as resolved.

The texts of a record (``error``, ``sink_error.error``) are redacted whatever wrote them: when a
record is built or read (``JobStatus``/``SinkError`` redact them on construction and decoding) and
when it is written (:func:`write_status`). So a status file, the ``/status`` endpoint, the CLI and
the sensors show no secret, even from a record an older version wrote.

Exit codes of ``python -m loom_dagster.runtime`` (also written to ``exit_code``):

- ``EXIT_STOPPED`` (0): stopped on request (SIGTERM or SIGINT) after draining.
- ``EXIT_FLOW_FAILED`` (1): the flow failed at run time, after it had connected.
- ``EXIT_BAD_INPUT`` (2): bad arguments, import, config, compile or deploy-check error; nothing
  was started and retrying without a change will fail the same way.
- ``EXIT_STARTUP_FAILED`` (3): the dataflow was built but failed before its first successful
  poll (broker unreachable, topic missing, sink could not be opened...); may be transient.
- ``EXIT_DRAIN_TIMEOUT`` (4): stopped on request, but the drain did not finish within
  ``--drain-timeout`` (e.g. only one process of a cluster was signalled); the process gave up.
  Nothing was committed past what was durable: the unfinished part is replayed by the next run.
- ``EXIT_FENCED`` (5): another job consumes the same consumer group (``loom_dagster.core.checks.fence``): it
  holds the group's fence, so this job refused to start before consuming anything (the error names
  the holder: host, pid, flow); or this job lost its fence while running and stopped after a drain.
  Restarting helps only once the other job is stopped.

A process killed by a signal (SIGKILL, or SIGTERM before the handler is installed, in the first
~0.6 s) has no final record: its file stays in a non-final state with a stale ``heartbeat_at``.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import msgspec

from loom_dagster.core.redact import redact_text

EXIT_STOPPED = 0
EXIT_FLOW_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STARTUP_FAILED = 3
EXIT_DRAIN_TIMEOUT = 4
EXIT_FENCED = 5

EXIT_CODE_MEANINGS: Mapping[int, str] = {
    EXIT_STOPPED: "stopped on request after draining",
    EXIT_FLOW_FAILED: "the flow failed at run time",
    EXIT_BAD_INPUT: "bad input: arguments, import, config, compile or deploy-check error; nothing started",
    EXIT_STARTUP_FAILED: "the flow failed before its first successful poll",
    EXIT_DRAIN_TIMEOUT: "stopped on request, but the drain did not finish in time",
    EXIT_FENCED: "another job consumes the same consumer group (holds its fence); refused to start or stopped",
}

STATE_STARTING = "starting"
STATE_RUNNING = "running"
STATE_STOPPING = "stopping"
STATE_STOPPED = "stopped"
STATE_FAILED = "failed"
STATES = (STATE_STARTING, STATE_RUNNING, STATE_STOPPING, STATE_STOPPED, STATE_FAILED)
FINAL_STATES = frozenset({STATE_STOPPED, STATE_FAILED})

DEFAULT_HEARTBEAT_S = 1.0
MAX_SINK_ERROR_CHARS = 8000
DEFAULT_DRAIN_TIMEOUT_S = 120.0


class SinkStatus(msgspec.Struct):
    """What one sink (table node name or output topic) has written so far."""

    last_write_at: float | None = None
    records: int = 0
    failed_writes: int = 0


class SinkError(msgspec.Struct):
    """The last failed write (flush) of one sink: which sink, when, why, how many times.

    Example:
        >>> SinkError.from_dict({"sink": "readings_sql", "at": 1.5, "error": "no such table"})
        SinkError(sink='readings_sql', at=1.5, error='no such table', error_type=None, count=1, first_at=None, recovered_at=None)
    """

    sink: str
    at: float
    error: str = ""
    error_type: str | None = None
    count: int = 1
    first_at: float | None = None
    recovered_at: float | None = None

    def __post_init__(self) -> None:
        self.error = _redacted(self.error)

    @property
    def active(self) -> bool:
        """True until a later write to the same sink succeeds."""
        return self.recovered_at is None

    def summary(self, limit: int = 300) -> str:
        """``sink 'x' failed to write (N times): <first line of the error>``, for one-line messages."""
        first = next((line.strip() for line in self.error.splitlines() if line.strip()), "")
        if len(first) > limit:
            first = first[:limit] + "..."
        times = "once" if self.count == 1 else f"{self.count} times"
        kind = f"{self.error_type}: " if self.error_type and self.error_type not in first else ""
        return f"sink {self.sink!r} failed to write ({times}): {kind}{first}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready mapping (the ``sink_error`` entry of a status record)."""
        return cast("dict[str, Any]", msgspec.to_builtins(self))

    @classmethod
    def from_dict(cls, data: object) -> SinkError | None:
        """Parse the ``sink_error`` entry of a status record (``None`` if absent or malformed)."""
        if not isinstance(data, Mapping):
            return None
        try:
            return msgspec.convert(_drop_nulls(data, _SINK_ERROR_DEFAULTED), cls, strict=False)
        except msgspec.ValidationError:
            return None


class JobStatus(msgspec.Struct):
    """One snapshot of a flow job, as written to the status file.

    Example:
        >>> status = JobStatus(flow="orders", pid=42, host="h", started_at=1.0)
        >>> JobStatus.from_dict(status.to_dict()) == status
        True
    """

    flow: str
    pid: int
    host: str = ""
    state: str = STATE_STARTING
    started_at: float = msgspec.field(default_factory=time.time)
    heartbeat_at: float | None = None
    connected_at: float | None = None
    last_poll_at: float | None = None
    records_in: int = 0
    records_out: int = 0
    errors: int = 0
    sinks: dict[str, SinkStatus] = msgspec.field(default_factory=dict)
    sink_error: SinkError | None = None
    exit_code: int | None = None
    error: str | None = None
    process_id: int | None = None
    partitions: int | None = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"unknown state {self.state!r}")
        if self.error:
            self.error = _redacted(self.error)

    @property
    def is_final(self) -> bool:
        """True once the job has stopped or failed (the process is exiting or gone)."""
        return self.state in FINAL_STATES

    @property
    def connected(self) -> bool:
        """True once the source completed its first poll: the job's "healthy" signal."""
        return self.connected_at is not None

    def heartbeat_age(self, now: float | None = None) -> float | None:
        """Seconds since the last heartbeat (``None`` if there was none)."""
        if self.heartbeat_at is None:
            return None
        return (time.time() if now is None else now) - self.heartbeat_at

    def is_stale(self, max_age_s: float, now: float | None = None) -> bool:
        """True if a non-final job has not written a heartbeat for ``max_age_s`` seconds."""
        if self.is_final:
            return False
        age = self.heartbeat_age(now)
        return age is None or age > max_age_s

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready mapping written to the status file."""
        return cast("dict[str, Any]", msgspec.to_builtins(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobStatus:
        """Build a record from a decoded status file; unknown keys are ignored.

        Raises:
            ValueError: if a required key is missing or a value has the wrong type.
        """
        if not isinstance(data, Mapping) or "started_at" not in data:
            raise ValueError("not a loom-dagster job status record: no started_at")
        try:
            return msgspec.convert(_lenient(data), cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"not a loom-dagster job status record: {exc}") from exc


@functools.lru_cache(maxsize=64)
def _redacted(text: str) -> str:
    """``redact_text``, remembered: a heartbeat rewrites the same error text every second."""
    return redact_text(text)


def _redacted_status(status: JobStatus) -> JobStatus:
    """*status* with its texts redacted (itself when they are clean; a caller may have set them)."""
    error = _redacted(status.error) if status.error else status.error
    sink_error = status.sink_error
    if sink_error is not None and _redacted(sink_error.error) != sink_error.error:
        sink_error = msgspec.structs.replace(sink_error, error=_redacted(sink_error.error))
    if error == status.error and sink_error is status.sink_error:
        return status
    return msgspec.structs.replace(status, error=error, sink_error=sink_error)


_SINK_ERROR_DEFAULTED = ("error", "count")
_STATUS_DEFAULTED = ("host", "records_in", "records_out", "errors")
_SINK_STATUS_DEFAULTED = ("records", "failed_writes")


def _drop_nulls(data: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """*data* without the null entries of *keys*, which then take their defaults (as older readers did)."""
    return {k: v for k, v in data.items() if not (v is None and k in keys)}


def _lenient(data: Mapping[str, Any]) -> dict[str, Any]:
    """A decoded status record as the records take it: nulls of defaulted fields dropped, a malformed
    ``sink_error`` or ``sinks`` entry left out (the rest of the record still loads)."""
    out = _drop_nulls(data, _STATUS_DEFAULTED)
    if "sink_error" in out:
        out["sink_error"] = SinkError.from_dict(out["sink_error"])
    sinks = out.get("sinks")
    if sinks is None or isinstance(sinks, Mapping):
        out["sinks"] = {
            str(name): _drop_nulls(entry, _SINK_STATUS_DEFAULTED)
            for name, entry in (sinks or {}).items()
            if isinstance(entry, Mapping)
        }
    else:
        out["sinks"] = {}
    return out


_ENCODER = msgspec.json.Encoder(order="sorted")
_DECODER = msgspec.json.Decoder()


def write_status(path: str | os.PathLike[str], status: JobStatus, *, durable: bool = False) -> None:
    """Atomically replace the status file with ``status`` (temp file in the same directory).

    ``durable`` also fsyncs the file, for the final record that must survive a host crash. The
    record's texts are written redacted.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    payload = _ENCODER.encode(_redacted_status(status))
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:  # private
        handle.write(payload)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, target)


def read_status(path: str | os.PathLike[str]) -> JobStatus | None:
    """Read a status file; ``None`` if it is missing, empty, partial or not a status record."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None
    try:
        data = _DECODER.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    try:
        return JobStatus.from_dict(data)
    except ValueError:
        return None


def describe_exit_code(code: int | None) -> str:
    """Human-readable meaning of a runtime exit code (negative = killed by that signal)."""
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by signal {-code}"
    return EXIT_CODE_MEANINGS.get(code, f"unexpected exit code {code}")


__all__ = [
    "DEFAULT_DRAIN_TIMEOUT_S",
    "DEFAULT_HEARTBEAT_S",
    "EXIT_BAD_INPUT",
    "EXIT_DRAIN_TIMEOUT",
    "EXIT_CODE_MEANINGS",
    "EXIT_FENCED",
    "EXIT_FLOW_FAILED",
    "EXIT_STARTUP_FAILED",
    "EXIT_STOPPED",
    "FINAL_STATES",
    "MAX_SINK_ERROR_CHARS",
    "STATES",
    "STATE_FAILED",
    "STATE_RUNNING",
    "STATE_STARTING",
    "STATE_STOPPED",
    "STATE_STOPPING",
    "JobStatus",
    "SinkError",
    "SinkStatus",
    "describe_exit_code",
    "read_status",
    "write_status",
]
