"""Variants of the ticks flow (config of ``tests.flows.delta_only``) for the progress gate and the
regression watch, switched by the job's environment so that they compile in the Dagster process:

- ``ticks_flow``: a step that copies the first ``LOOM_TEST_BLOCK_AFTER`` ticks (default 0), then
  blocks (sleeps) on the next one. The job stays alive and healthy (its heartbeat comes from a thread,
  its first poll happened) yet, once blocked, commits nothing and writes no row: with the default 0 it
  never moves any data at all.
- ``unrouted_flow``: a step that raises on every tick, in a flow WITHOUT an ``errors`` route. loom
  drops unrouted error envelopes at a drop sink that completes them, so this version commits its
  offsets (data "moves" as far as Kafka is concerned) while writing no row: a progress gate counts it
  as progress by commits (see ``tests/integration/test_progress_gate.py``).
"""

from __future__ import annotations

import os
import time

from loom.streaming import (
    Backend,
    Broadcast,
    BroadcastRoute,
    FromTopic,
    IntoTable,
    IntoTopic,
    Message,
    Process,
    RecordStep,
    StreamFlow,
)

from tests.flows.delta_only import Tick, TickRow, ticks_flow_with

BLOCK_S = 3600.0
"""How long a blocked step sleeps (the job is stopped long before)."""


class BlocksAfter(RecordStep[Tick, TickRow]):
    """Copy the tick; from record ``LOOM_TEST_BLOCK_AFTER + 1`` on, block instead."""

    def __init__(self) -> None:
        self._after = int(os.environ.get("LOOM_TEST_BLOCK_AFTER", "0") or 0)
        self._seen = 0
        self._version = os.environ.get("LOOM_TEST_VERSION", "blocks")

    def execute(self, message: Message[Tick], **kwargs: object) -> TickRow:
        self._seen += 1
        if self._seen > self._after:
            time.sleep(BLOCK_S)
        return TickRow(id=message.payload.id, seq=message.payload.seq, version=self._version)


class AlwaysRaises(RecordStep[Tick, TickRow]):
    """Raise on every tick."""

    def execute(self, message: Message[Tick], **kwargs: object) -> TickRow:
        raise ValueError(f"tick {message.payload.id} refused")


ticks_flow = ticks_flow_with(BlocksAfter)

unrouted_flow = StreamFlow(
    name="ticks",
    source=FromTopic("ticks", payload=Tick),
    process=Process(
        AlwaysRaises,
        Broadcast(
            BroadcastRoute(process=Process(IntoTable(TickRow, name="ticks_delta", backend=Backend.DELTA))),
            BroadcastRoute(process=Process(IntoTopic("ticks_out", payload=TickRow))),
        ),
    ),
)
