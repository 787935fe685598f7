"""Keeps the status file current: state changes from the main thread, heartbeats from a daemon."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from msgspec.structs import replace

from loom_dagster.core.job.status import (
    DEFAULT_HEARTBEAT_S,
    EXIT_DRAIN_TIMEOUT,
    FINAL_STATES,
    STATE_FAILED,
    STATE_RUNNING,
    STATE_STARTING,
    STATE_STOPPING,
    JobStatus,
    write_status,
)
from loom_dagster.core.redact import redact_text as redact
from loom_dagster.runtime.observer import StatusObserver
from loom_dagster.runtime.probe import PollProbe

log = logging.getLogger("loom_dagster.runtime")


class StatusReporter:
    """Owns the :class:`JobStatus` of this process and writes it atomically.

    All writes go through one lock, so the heartbeat thread and the main thread never interleave.
    Never call it from a signal handler (the handler may interrupt the main thread holding the
    lock): handlers call :meth:`wake` instead, which only sets an event.
    """

    def __init__(
        self,
        path: str | Path,
        status: JobStatus,
        *,
        interval_s: float = DEFAULT_HEARTBEAT_S,
        drain_timeout_s: float | None = None,
    ):
        self.path = Path(path)
        self._status = status
        self._interval_s = interval_s
        self._drain_timeout_s = drain_timeout_s
        self._stop_requested_at: float | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: StatusObserver | None = None
        self._probe: PollProbe | None = None
        self._stop_requested: str | None = None
        self._write_failed = False

    # ----- wiring

    def attach(self, observer: StatusObserver | None = None, probe: PollProbe | None = None) -> None:
        """Derive counters from ``observer`` and the connected signal from ``probe``."""
        with self._lock:
            self._observer = observer or self._observer
            self._probe = probe or self._probe

    def set_flow(self, name: str) -> None:
        """Rename the job once the flow (and its real name) is known."""
        with self._lock:
            self._status.flow = name

    # ----- state

    def snapshot(self) -> JobStatus:
        """A refreshed copy of the current record."""
        with self._lock:
            self._refresh(time.time())
            return replace(self._status, sinks=dict(self._status.sinks))

    def set_state(self, state: str, *, exit_code: int | None = None, error: str | None = None) -> None:
        """Change the state and write the record now (fsync'd when the state is final)."""
        with self._lock:
            if self._status.state in FINAL_STATES:
                return
            self._status.state = state
            if exit_code is not None:
                self._status.exit_code = exit_code
            if error is not None:
                self._status.error = redact(error)
            self._write_locked(durable=state in FINAL_STATES)

    def request_stop(self, signal_name: str) -> None:
        """Remember a stop request (signal-handler safe: no lock, only an event)."""
        if self._stop_requested is None:
            self._stop_requested = signal_name
            self._stop_requested_at = time.monotonic()
        self._wake.set()

    @property
    def stop_requested(self) -> str | None:
        """Name of the signal that asked this job to stop, if any."""
        return self._stop_requested

    @property
    def connected(self) -> bool:
        """True once the job completed its first poll."""
        return self.snapshot().connected_at is not None

    # ----- heartbeat

    def write(self) -> None:
        """Refresh the counters and write the record now."""
        with self._lock:
            self._write_locked(durable=False)

    def start(self) -> None:
        """Start the heartbeat daemon thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._beat, name="loom-dagster-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeat thread; the final record is written by :meth:`set_state`."""
        self._done.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._done.is_set():
            self._wake.wait(self._interval_s)
            self._wake.clear()
            if self._done.is_set():
                return
            with self._lock:
                if self._status.state in FINAL_STATES:
                    return
                if self._stop_requested is not None and self._status.state != STATE_STOPPING:
                    self._status.state = STATE_STOPPING
                if self._drain_overdue():
                    self._abandon_drain()
                self._write_locked(durable=False)

    def _drain_overdue(self) -> bool:
        if self._drain_timeout_s is None or self._stop_requested_at is None:
            return False
        return time.monotonic() - self._stop_requested_at > self._drain_timeout_s

    def _abandon_drain(self) -> None:
        """Give up on a drain that hangs (lock held): final record, one line, ``os._exit``.

        Seen when only one process of a bytewax cluster is signalled: it flushes its sinks, then
        waits forever for its peers. Nothing is committed past what was durable, so the records
        of the unfinished drain are replayed by the next run (duplicates possible, no loss).
        """
        reason = (
            f"drain after {self._stop_requested} did not finish within {self._drain_timeout_s:g} s "
            "(in a cluster, signal every process); exiting without completing it"
        )
        self._status.state = STATE_FAILED
        self._status.exit_code = EXIT_DRAIN_TIMEOUT
        self._status.error = reason
        self._write_locked(durable=True)
        log.error("flow %r exit %d: %s", self._status.flow, EXIT_DRAIN_TIMEOUT, reason)
        logging.shutdown()
        os._exit(EXIT_DRAIN_TIMEOUT)

    # ----- internals (lock held)

    def _refresh(self, now: float) -> None:
        status = self._status
        status.heartbeat_at = now
        if self._observer is not None:
            counters = self._observer.snapshot()
            status.records_in = counters.records_in
            status.records_out = counters.records_out
            status.errors = counters.errors
            status.sinks = counters.sinks
            status.sink_error = counters.sink_error
            if counters.flow_started_at is not None and status.state == STATE_STARTING:
                status.state = STATE_RUNNING
            fallback_connected = counters.last_consume_at if self._probe is None else None
        else:
            fallback_connected = None
        if self._probe is not None:
            reading = self._probe.reading()
            status.partitions = reading.partitions
            status.last_poll_at = reading.last_poll_at
            if status.connected_at is None:
                status.connected_at = reading.connected_at(now)
        elif status.connected_at is None and fallback_connected is not None:
            status.connected_at = fallback_connected
            status.last_poll_at = fallback_connected

    def _write_locked(self, *, durable: bool) -> None:
        self._refresh(time.time())
        try:
            write_status(self.path, self._status, durable=durable)
        except OSError as exc:
            if not self._write_failed:
                log.error("cannot write status file %s: %s", self.path, exc)
            self._write_failed = True
        else:
            self._write_failed = False
