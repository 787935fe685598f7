"""A loom lifecycle observer that turns observability events into job counters.

What loom 9 emits while a streaming flow runs (measured, ``loom.core.observability.event``):

- ``Scope.TRANSPORT`` ``kafka_consume`` START/END once per consumed Kafka record;
- ``Scope.WRITE`` END once per successful sink write call, ``meta["sink"]`` (table node name or
  output topic) and ``meta["batch_size"]``; ERROR when the write failed, with ``event.error``
  (``str(exc)``, e.g. ``(sqlite3.OperationalError) no such table: t [SQL: ...]``) and
  ``meta["error_type"]`` (loom's ``_StorageSinkPartition.write_batch`` emits it, then re-raises:
  a table flush failure kills the dataflow; an output-topic batch diverted to its DLQ emits it
  without raising). The ``Scope.TERMINAL`` ``sink_write`` ERROR events of the same batch (one per
  message) carry the same error and are not counted again;
- ``Scope.TERMINAL`` ``error_envelope`` END once per message turned into an error envelope;
- ``Scope.FLOW`` START right before bytewax starts the dataflow (``cli_main``).

Not visible as events: wire decode failures (routed to the DLQ silently) and individual poll
cycles (``Scope.POLL_CYCLE`` wraps the whole run once); see :mod:`loom_dagster.runtime.probe`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from msgspec.structs import replace

from loom_dagster.core.job.failure import clip
from loom_dagster.core.job.status import MAX_SINK_ERROR_CHARS, SinkError, SinkStatus
from loom_dagster.core.redact import redact_text

if TYPE_CHECKING:
    from loom.core.observability.event import LifecycleEvent

_SCOPE_TRANSPORT = "transport"
_SCOPE_WRITE = "write"
_SCOPE_TERMINAL = "terminal"
_SCOPE_FLOW = "flow"
_KIND_START = "start"
_KIND_END = "end"
_KIND_ERROR = "error"
_CONSUME = "kafka_consume"
_ERROR_ENVELOPE = "error_envelope"


@dataclass
class Counters:
    """A consistent copy of the observer's counters."""

    records_in: int = 0
    records_out: int = 0
    errors: int = 0
    failed_writes: int = 0
    flow_started_at: float | None = None
    last_consume_at: float | None = None
    sinks: dict[str, SinkStatus] = field(default_factory=dict)
    sink_error: SinkError | None = None


class StatusObserver:
    """Thread-safe ``LifecycleObserver`` counting records in, records written per sink, errors.

    ``records_out`` is the sum over sinks: a message broadcast to a table and a topic counts
    twice. ``errors`` counts messages turned into error envelopes plus records of failed writes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters = Counters()

    def on_event(self, event: LifecycleEvent) -> None:
        """Update the counters from one loom lifecycle event (cheap: called per record)."""
        scope = event.scope.value
        kind = event.kind.value
        if scope == _SCOPE_TRANSPORT:
            if kind == _KIND_END and event.name == _CONSUME:
                self._consumed()
        elif scope == _SCOPE_WRITE:
            if kind == _KIND_END:
                self._wrote(event.meta, failed=False)
            elif kind == _KIND_ERROR:
                self._wrote(event.meta, failed=True)
                self._write_failed(event.meta, event.error)
        elif scope == _SCOPE_TERMINAL:
            if kind == _KIND_END and event.name == _ERROR_ENVELOPE:
                self._errored(1)
        elif scope == _SCOPE_FLOW and kind == _KIND_START:
            with self._lock:
                self._counters.flow_started_at = time.time()

    def _consumed(self) -> None:
        now = time.time()
        with self._lock:
            self._counters.records_in += 1
            self._counters.last_consume_at = now

    def _errored(self, count: int) -> None:
        with self._lock:
            self._counters.errors += count

    def _wrote(self, meta: dict[str, object], *, failed: bool) -> None:
        sink = str(meta.get("sink") or "unknown")
        size = meta.get("batch_size", meta.get("loom.batch_size", 0))
        records = size if isinstance(size, int) else 0
        now = time.time()
        with self._lock:
            entry = self._counters.sinks.setdefault(sink, SinkStatus())
            if failed:
                self._counters.failed_writes += 1
                self._counters.errors += records
                entry.failed_writes += 1
                return
            entry.records += records
            entry.last_write_at = now
            self._counters.records_out += records
            last = self._counters.sink_error
            if last is not None and last.sink == sink and last.recovered_at is None:
                last.recovered_at = now

    def _write_failed(self, meta: dict[str, object], error: str | None) -> None:
        """Remember the failure as the last sink error (text redacted, capped head + tail)."""
        sink = str(meta.get("sink") or "unknown")
        kind = meta.get("error_type")
        text = clip(redact_text(error or "(no error text)"), MAX_SINK_ERROR_CHARS)
        now = time.time()
        with self._lock:
            previous = self._counters.sink_error
            same_sink = previous is not None and previous.sink == sink
            self._counters.sink_error = SinkError(
                sink=sink,
                at=now,
                error=text,
                error_type=None if kind is None else str(kind),
                count=self._counters.sinks[sink].failed_writes if sink in self._counters.sinks else 1,
                first_at=previous.first_at if previous is not None and same_sink else now,
            )

    def snapshot(self) -> Counters:
        """A copy of the counters, taken under the lock."""
        with self._lock:
            current = self._counters
            return Counters(
                records_in=current.records_in,
                records_out=current.records_out,
                errors=current.errors,
                failed_writes=current.failed_writes,
                flow_started_at=current.flow_started_at,
                last_consume_at=current.last_consume_at,
                sinks={name: replace(s) for name, s in current.sinks.items()},
                sink_error=None if current.sink_error is None else replace(current.sink_error),
            )
