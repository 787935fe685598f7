"""The contract of one topic: the struct each flow writes to it against the struct each flow reads it
with (``ContractPair``), and the topic's summary (``TopicContract``, the topic asset's ``loom/contract``).

Only flows loaded in the same code location are paired: a reader (or writer) in another code location is
not seen, so its contract is not checked.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from loom_dagster.core.contracts.compare import Finding, compare_with_readers
from loom_dagster.core.contracts.shape import PayloadContract

OTHER_LOCATIONS_NOTE = (
    "Only flows loaded in this code location are compared: a flow of another code location that reads or "
    "writes the topic is not seen."
)


class ContractPair(msgspec.Struct, frozen=True, omit_defaults=True):
    """One writing flow against one reading flow on a topic, and what the comparison found.

    ``checked`` is false when a side declares no struct (``IntoTopic`` without ``payload`` and no typed step
    before it; a reader without a struct): nothing could be compared.
    """

    topic: str
    writer_flow: str
    reader_flow: str
    writer: str | None = None
    reader: str | None = None
    findings: tuple[Finding, ...] = ()
    checked: bool = True
    note: str = ""

    @property
    def breaking(self) -> list[Finding]:
        """The findings that break the reader."""
        return [f for f in self.findings if f.breaking]

    @property
    def compatible(self) -> bool | None:
        """Whether the reader decodes what the writer sends (``None``: not checked)."""
        return not self.breaking if self.checked else None

    def describe(self) -> str:
        """Headline and one line per finding."""
        if not self.checked:
            return (
                f"topic {self.topic!r}: {self.writer_flow!r} -> {self.reader_flow!r} not checked: {self.note}"
            )
        verdict = "BREAKS" if self.breaking else "compatible"
        head = (
            f"topic {self.topic!r}: flow {self.writer_flow!r} writes {self.writer}, flow {self.reader_flow!r} "
            f"reads {self.reader}: {verdict}"
        )
        return "\n".join([head, *(f"  - {f.describe()}" for f in self.findings)])

    def metadata(self) -> dict[str, object]:
        """JSON-safe: flows, structs, verdict, findings as text."""
        out: dict[str, object] = {
            "topic": self.topic,
            "writer_flow": self.writer_flow,
            "reader_flow": self.reader_flow,
            "writer_struct": self.writer,
            "reader_struct": self.reader,
            "compatible": self.compatible,
        }
        if self.breaking:
            out["breaking"] = [f.describe() for f in self.breaking]
        changes = [f.describe() for f in self.findings if not f.breaking]
        if changes:
            out["compatible_changes"] = changes
        if self.note:
            out["note"] = self.note
        return out


def pair_contract(
    topic: str,
    writer_flow: str,
    writer: PayloadContract | None,
    reader_flow: str,
    readers: Sequence[PayloadContract],
) -> ContractPair:
    """Compare what *writer_flow* writes to *topic* with what *reader_flow* reads it as.

    Example:
        >>> from loom.core.model import LoomStruct
        >>> from loom_dagster.core.contracts.shape import payload_contract
        >>> class Row(LoomStruct):
        ...     id: str
        >>> pair = pair_contract("rows", "a", payload_contract(Row), "b", [payload_contract(Row)])
        >>> (pair.compatible, pair.findings)
        (True, ())
    """
    if writer is None:
        return ContractPair(
            topic,
            writer_flow,
            reader_flow,
            checked=False,
            note=f"flow {writer_flow!r} declares no struct for the topic: give its IntoTopic a payload= "
            "(or a typed step before it)",
        )
    if not readers:
        return ContractPair(
            topic,
            writer_flow,
            reader_flow,
            writer=writer.struct,
            checked=False,
            note=f"flow {reader_flow!r} reads the topic without a struct",
        )
    matched, findings = compare_with_readers(writer, tuple(readers))
    reader = matched.struct if matched is not None else " | ".join(r.struct for r in readers)
    return ContractPair(topic, writer_flow, reader_flow, writer.struct, reader, findings)


class WrittenStruct(msgspec.Struct, frozen=True, omit_defaults=True):
    """The struct one flow writes to a topic (``None``: not declared)."""

    flow: str
    contract: PayloadContract | None = None


class TopicContract(msgspec.Struct, frozen=True, omit_defaults=True):
    """A topic's contract in this code location: its writers' structs and every writer/reader pair."""

    topic: str
    writers: tuple[WrittenStruct, ...] = ()
    pairs: tuple[ContractPair, ...] = ()

    @property
    def compatible(self) -> bool | None:
        """``False`` if a pair breaks, ``True`` if every checked pair is compatible, ``None`` if none was checked."""
        verdicts = [p.compatible for p in self.pairs if p.checked]
        if not verdicts:
            return None
        return all(verdicts)

    def metadata(self) -> dict[str, object]:
        """The topic asset's ``loom/contract``: writer struct(s), readers, compatibility per reader."""
        return {
            "writers": [
                {"flow": w.flow, **(w.contract.describe() if w.contract is not None else {"struct": None})}
                for w in self.writers
            ],
            "readers": [p.metadata() for p in self.pairs],
            "compatible": self.compatible,
            "note": OTHER_LOCATIONS_NOTE,
        }


def topic_contract(
    topic: str,
    writers: Sequence[tuple[str, PayloadContract | None]],
    readers: Sequence[tuple[str, Sequence[PayloadContract]]],
) -> TopicContract | None:
    """The contract of *topic*: each ``(flow, struct)`` writer against each ``(flow, structs)`` reader;
    ``None`` when no flow here writes it. Comparisons are cached per distinct struct pair."""
    if not writers:
        return None
    pairs = tuple(
        pair_contract(topic, writer_flow, written, reader_flow, read)
        for writer_flow, written in writers
        for reader_flow, read in readers
    )
    return TopicContract(topic, tuple(WrittenStruct(f, c) for f, c in writers), pairs)
