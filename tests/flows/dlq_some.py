"""The ticks flow (Kafka -> Delta + topic, config of ``tests.flows.delta_only``) whose step fails for
some records, for the job-log tests:

- a tick whose id starts with ``bad-`` makes the step raise ``ValueError`` (routed to the DLQ topic);
- a tick whose id starts with ``native-`` makes the step write its id straight to fd 2 with
  ``os.write`` (as native code would: no Python logging, no ``sys.stderr``), then pass.
"""

from __future__ import annotations

import os

from loom.streaming import (
    Message,
    RecordStep,
)

from tests.flows.delta_only import Tick, TickRow, ticks_flow_with

BAD_PREFIX = "bad-"
NATIVE_PREFIX = "native-"
NATIVE_MARK = "written-to-fd-2-natively"


class SometimesFails(RecordStep[Tick, TickRow]):
    """Copy the tick; ``bad-*`` raises, ``native-*`` writes to fd 2 first."""

    def execute(self, message: Message[Tick], **kwargs: object) -> TickRow:
        tick = message.payload
        if tick.id.startswith(BAD_PREFIX):
            raise ValueError(f"tick {tick.id} is bad")
        if tick.id.startswith(NATIVE_PREFIX):
            os.write(2, f"{NATIVE_MARK} {tick.id}\n".encode())
        return TickRow(id=tick.id, seq=tick.seq, version="dlq-some")


ticks_flow = ticks_flow_with(SometimesFails)
