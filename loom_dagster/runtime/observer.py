"""A loom lifecycle observer that turns observability events into job counters.

What loom 9 emits while a streaming flow runs (measured, ``loom.core.observability.event``):

- ``Scope.TRANSPORT`` ``kafka_consume`` START/END once per consumed Kafka record;
- ``Scope.WRITE`` END once per successful sink write call, ``meta["sink"]`` (table node name or
  output topic) and ``meta["batch_size"]``; ERROR when the write failed;
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

from loom_dagster.runtime.status import SinkStatus

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
            if kind != _KIND_START:
                self._wrote(event.meta, failed=kind == _KIND_ERROR)
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
            if failed:
                self._counters.failed_writes += 1
                self._counters.errors += records
                return
            entry = self._counters.sinks.setdefault(sink, SinkStatus())
            entry.records += records
            entry.last_write_at = now
            self._counters.records_out += records

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
                sinks={name: SinkStatus(s.last_write_at, s.records) for name, s in current.sinks.items()},
            )
