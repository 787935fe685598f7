"""Kafka -> SQL table flow (SQLAlchemy backend, e.g. SQLite): the sink-error tests point it at a
database whose table does not exist, so the job dies at its first flush with ``no such table``."""

from __future__ import annotations

from loom.core.model import LoomStruct
from loom.streaming import FromTopic, IntoTable, Message, Process, RecordStep, StreamFlow


class Reading(LoomStruct):
    """Input message."""

    id: str
    value: int


class ReadingRow(LoomStruct):
    """Row written to the SQL table."""

    id: str
    value: int


class ToRow(RecordStep[Reading, ReadingRow]):
    """Copy the message into a row."""

    def execute(self, message: Message[Reading], **kwargs: object) -> ReadingRow:
        return ReadingRow(id=message.payload.id, value=message.payload.value)


readings_flow: StreamFlow[Reading, ReadingRow] = StreamFlow(
    name="readings",
    source=FromTopic("readings", payload=Reading),
    process=Process(ToRow, IntoTable(ReadingRow, table="readings", name="readings_sql")),
)
