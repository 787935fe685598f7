"""What a deploy checks before launch: the contracts of the flow being deployed with the flows of its code
location (``flow_contracts`` -> ``ContractsReport``; ``ContractBroken`` when one breaks).

For each topic the flow writes, its new struct against every flow here that reads the topic; for each
topic it reads, every flow here that writes it against its new reader struct (a new required field breaks
too). Also the written struct against the one its previous deployment wrote (``extra["contracts"]`` of the
deployment record): what changed, listed, not judged. Only flows loaded in the same code location are seen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from loom_dagster.core.contracts.compare import Finding, compare_contracts
from loom_dagster.core.contracts.shape import PayloadContract
from loom_dagster.core.contracts.topic import OTHER_LOCATIONS_NOTE, ContractPair, pair_contract
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.flows.records import LoomFlow, TopicRole

EXTRA_KEY = "contracts"
"""Key of the deployment record's ``extra`` holding the structs the deployment writes, by topic."""

ACCEPT_HINT = (
    "set accept_contract_change: true in the run config (ops: {loom_deploy: {config: "
    "{accept_contract_change: true}}})"
)


class WriterChange(msgspec.Struct, frozen=True, omit_defaults=True):
    """How the struct written to a topic changed since the previous deployment: the findings of a
    reader still on the previous struct."""

    topic: str
    previous: str
    current: str
    findings: tuple[Finding, ...] = ()

    def describe(self) -> str:
        head = f"topic {self.topic!r}: {self.previous} (deployed) -> {self.current}"
        return "\n".join([head, *(f"  - {f.describe()}" for f in self.findings)])


class ContractsReport(msgspec.Struct, frozen=True):
    """The contracts of one flow with the flows of its code location, as a deploy checked them."""

    flow_name: str
    pairs: tuple[ContractPair, ...] = ()
    changes: tuple[WriterChange, ...] = ()
    accepted: bool = False

    @property
    def broken(self) -> list[ContractPair]:
        """The pairs whose reader cannot decode what the writer sends."""
        return [p for p in self.pairs if p.breaking]

    @property
    def blocks(self) -> bool:
        """Whether the deploy must stop: a pair breaks and the run did not accept it."""
        return bool(self.broken) and not self.accepted

    def summary(self) -> str:
        """One line: how many pairs, broken, accepted, unchecked."""
        if not self.pairs and not self.changes:
            return "no topic shared with another flow of this code location"
        checked = [p for p in self.pairs if p.checked]
        text = f"{len(checked)} contract(s) checked, {len(self.broken)} broken"
        if self.broken and self.accepted:
            text += " (accepted by the run config)"
        unchecked = len(self.pairs) - len(checked)
        if unchecked:
            text += f", {unchecked} not checked (no struct)"
        if self.changes:
            text += f", {len(self.changes)} written struct(s) changed since the deployed version"
        return text

    def describe(self) -> str:
        """Every pair and change, for the deploy's log."""
        lines = [f"Contracts of flow {self.flow_name!r}: {self.summary()}."]
        lines += [p.describe() for p in self.pairs]
        if self.changes:
            lines.append("Changed since the deployed version:")
            lines += [c.describe() for c in self.changes]
        lines.append(OTHER_LOCATIONS_NOTE)
        return "\n".join(lines)

    def metadata(self) -> dict[str, object]:
        """JSON-safe, for ``loom/contracts``."""
        return {
            "summary": self.summary(),
            "accepted": self.accepted,
            "pairs": [p.metadata() for p in self.pairs],
            "changes_since_deployed": [
                {
                    "topic": c.topic,
                    "previous": c.previous,
                    "current": c.current,
                    "changes": [f.describe() for f in c.findings],
                }
                for c in self.changes
            ],
            "note": OTHER_LOCATIONS_NOTE,
        }


class ContractBroken(DeploymentError):
    """The flow being deployed would send a struct that a reading flow cannot decode (or reads a struct a
    writing flow does not send); nothing was drained or launched."""

    def __init__(self, report: ContractsReport) -> None:
        lines = [
            f"Deploy of flow {report.flow_name!r} refused: it breaks {len(report.broken)} contract(s) with "
            "flows of this code location (their messages would fail to decode and go to the reader's "
            "dead-letter topic as WIRE errors); nothing was drained or launched."
        ]
        lines += [p.describe() for p in report.broken]
        lines.append(
            "Fix the struct as each finding says (or deploy the reader's compatible version first). To deploy "
            f"anyway, {ACCEPT_HINT}. {OTHER_LOCATIONS_NOTE}"
        )
        super().__init__("\n".join(lines))
        self.contracts = report


def flow_contracts(
    flow: LoomFlow,
    location_flows: Sequence[LoomFlow],
    previous_extra: Mapping[str, object] | None = None,
    *,
    accepted: bool = False,
) -> ContractsReport:
    """The contracts of *flow* (as it will be deployed) with the other flows of its code location
    (*location_flows*, the flow itself left out by name), and its written structs against
    *previous_extra* (the previous deployment record's ``extra``)."""
    others = [f for f in location_flows if f.name != flow.name]
    pairs: list[ContractPair] = []
    for out in flow.output_topics:
        if out.role is not TopicRole.OUTPUT:
            continue
        for reader in [*others, flow]:
            for src in reader.source_topics:
                if src.topic == out.topic:
                    pairs.append(
                        pair_contract(out.topic, flow.name, out.contract, reader.name, src.contracts)
                    )
    for src in flow.source_topics:
        for writer in others:
            for out in writer.output_topics:
                if out.role is TopicRole.OUTPUT and out.topic == src.topic:
                    pairs.append(
                        pair_contract(src.topic, writer.name, out.contract, flow.name, src.contracts)
                    )
    return ContractsReport(flow.name, tuple(pairs), writer_changes(flow, previous_extra), accepted)


def writer_changes(flow: LoomFlow, previous_extra: Mapping[str, object] | None) -> tuple[WriterChange, ...]:
    """Each written struct that differs from the one the previous deployment recorded for its topic."""
    recorded = (previous_extra or {}).get(EXTRA_KEY)
    if not isinstance(recorded, Mapping):
        return ()
    changes = []
    for out in flow.output_topics:
        if out.role is not TopicRole.OUTPUT or out.contract is None or out.topic not in recorded:
            continue
        try:
            previous = msgspec.convert(recorded[out.topic], PayloadContract)
        except msgspec.ValidationError:  # recorded by another layout: nothing to compare with
            continue
        if previous != out.contract:
            findings = compare_contracts(out.contract, previous)
            changes.append(WriterChange(out.topic, previous.struct, out.contract.struct, findings))
    return tuple(changes)


def contracts_extra(flow: LoomFlow) -> dict[str, object]:
    """What a deployment records of its contracts: the struct it writes to each topic (JSON-safe)."""
    written = {  # as JSON reads them back (lists, not tuples): a record compares equal once stored
        out.topic: msgspec.json.decode(msgspec.json.encode(out.contract))
        for out in flow.output_topics
        if out.role is TopicRole.OUTPUT and out.contract is not None
    }
    return {EXTRA_KEY: written} if written else {}
