"""Kafka -> Delta (+ output topic) flow used by the deployment tests: no ClickHouse needed."""

from __future__ import annotations

import os
import time

from loom.core.model import LoomStruct
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


class Tick(LoomStruct):
    """Input message: an id and a sequence number."""

    id: str
    seq: int


class TickRow(LoomStruct):
    """Row written to Delta and the output topic."""

    id: str
    seq: int
    version: str


class Stamp(RecordStep[Tick, TickRow]):
    """Stamp the message with the flow version (``LOOM_TEST_VERSION``) and optionally fail at start."""

    def __init__(self) -> None:
        if os.environ.get("LOOM_TEST_FAIL_AT_START"):
            raise RuntimeError("LOOM_TEST_FAIL_AT_START is set: this version cannot start")
        delay = float(os.environ.get("LOOM_TEST_STEP_DELAY_S", "0") or 0)
        self._delay = delay
        self._version = os.environ.get("LOOM_TEST_VERSION", "v1")

    def execute(self, message: Message[Tick], **kwargs: object) -> TickRow:
        if self._delay:
            time.sleep(self._delay)
        return TickRow(id=message.payload.id, seq=message.payload.seq, version=self._version)


def ticks_flow_with(step: type[RecordStep[Tick, TickRow]]) -> StreamFlow[Tick, TickRow]:
    """The ticks flow (Kafka -> Delta + output topic, DLQ) around *step*; other test flows vary the step."""
    return StreamFlow(
        name="ticks",
        source=FromTopic("ticks", payload=Tick),
        process=Process(
            step,
            Broadcast(
                BroadcastRoute(
                    process=Process(IntoTable(TickRow, name="ticks_delta", backend=Backend.DELTA))
                ),
                BroadcastRoute(process=Process(IntoTopic("ticks_out", payload=TickRow))),
            ),
        ),
        errors=IntoTopic("ticks_dlq"),
    )


ticks_flow = ticks_flow_with(Stamp)
