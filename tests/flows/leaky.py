"""The ticks flow (Kafka -> Delta + topic, same config as ``tests.flows.delta_only``) with a step whose
errors carry secrets, for the redaction tests. Both failures are switched on through the job's
environment only, so the flow compiles in the Dagster process:

- ``LOOM_TEST_LEAK_AT_START``: the step's ``__init__`` raises ``RuntimeError(<that text>)``;
- ``LOOM_TEST_LEAK_AT_RUN``: a message with id ``leak`` makes the step raise ``LeakedSecret(<that
  text>)``, a ``BaseException`` (not routed to the DLQ), so the job fails at run time.
"""

from __future__ import annotations

import os

from loom.streaming import (
    Message,
    RecordStep,
)

from tests.flows.delta_only import Tick, TickRow, ticks_flow_with

LEAK_ID = "leak"


class LeakedSecret(BaseException):
    """A fatal error whose text carries a secret (a ``BaseException``: loom does not route it)."""


class LeakyStamp(RecordStep[Tick, TickRow]):
    """Copy the tick; fail at start or on the ``leak`` message with the text from the environment."""

    def __init__(self) -> None:
        message = os.environ.get("LOOM_TEST_LEAK_AT_START")
        if message:
            raise RuntimeError(message)
        self._at_run = os.environ.get("LOOM_TEST_LEAK_AT_RUN", "")

    def execute(self, message: Message[Tick], **kwargs: object) -> TickRow:
        if self._at_run and message.payload.id == LEAK_ID:
            raise LeakedSecret(self._at_run)
        return TickRow(id=message.payload.id, seq=message.payload.seq, version="leaky")


ticks_flow = ticks_flow_with(LeakyStamp)
