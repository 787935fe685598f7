"""The lineage check: the sinks a freshly compiled plan writes must be the sinks the asset graph declares."""

from __future__ import annotations

from enum import StrEnum

import msgspec

from loom_dagster.core.errors import LineageMismatchError
from loom_dagster.core.flows.records import LoomFlow


class DifferenceKind(StrEnum):
    """How a sink of the compiled plan differs from the declared asset graph."""

    MISSING = "missing"
    UNEXPECTED = "unexpected"
    CHANGED = "changed"


class LineageDifference(msgspec.Struct, frozen=True):
    """One difference between the declared sinks and the plan's sinks."""

    kind: DifferenceKind
    slot: str
    declared: str | None
    compiled: str | None
    asset_key: str | None = None

    def describe(self) -> str:
        """One line saying what differs and how to fix it."""
        where = f" (asset {self.asset_key})" if self.asset_key else ""
        if self.kind is DifferenceKind.MISSING:
            return (
                f"missing: the asset graph declares sink {self.slot!r} -> {self.declared}{where}, but the "
                "compiled plan no longer writes it. Reload the code location so the graph drops it, or "
                "restore the sink in the flow/config."
            )
        if self.kind is DifferenceKind.UNEXPECTED:
            return (
                f"unexpected: the compiled plan writes sink {self.slot!r} -> {self.compiled}, which the asset "
                "graph does not declare. Reload the code location so the graph shows it, or remove it."
            )
        return (
            f"changed: sink {self.slot!r} is declared as {self.declared}{where} but the run-time config "
            f"resolves it to {self.compiled}. Reload the code location to pick up the new target, or "
            "revert the config."
        )


def diff_sinks(
    declared: LoomFlow, compiled: LoomFlow, asset_keys: dict[str, str] | None = None
) -> list[LineageDifference]:
    """Differences between the declared flow's sinks and a freshly compiled one's (empty when they agree)."""
    keys = asset_keys or {}
    want, have = declared.sink_identities, compiled.sink_identities
    diffs: list[LineageDifference] = []
    for slot in sorted(want.keys() | have.keys()):
        before, after = want.get(slot), have.get(slot)
        if before == after:
            continue
        if after is None:
            kind = DifferenceKind.MISSING
        elif before is None:
            kind = DifferenceKind.UNEXPECTED
        else:
            kind = DifferenceKind.CHANGED
        diffs.append(LineageDifference(kind, slot, before, after, keys.get(slot)))
    return diffs


def check_lineage(declared: LoomFlow, compiled: LoomFlow, asset_keys: dict[str, str] | None = None) -> None:
    """Raise ``LineageMismatchError`` listing every difference; return quietly when the sinks agree.

    Example:
        >>> from loom_dagster.core.flows.records import LoomFlow
        >>> flow = LoomFlow("f", "m:f", "h", "c", "test", "kafka", "g", "at_least_once")
        >>> check_lineage(flow, flow)
    """
    diffs = diff_sinks(declared, compiled, asset_keys)
    if not diffs:
        return
    lines = [
        f"lineage check failed for flow {declared.name!r}: {len(diffs)} sink(s) of the compiled plan "
        "differ from the asset graph; nothing was deployed."
    ]
    lines += [f"  - {d.describe()}" for d in diffs]
    raise LineageMismatchError("\n".join(lines))
