"""Records of the pre-launch sink table checks: ``TableProblem`` (one difference and the DDL or remedy
fixing it), ``SinkTablesReport`` (every sink table of one flow), the problem kinds, and the per-sink
input/outcome the backend checks share."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from loom_dagster.core.flows.records import LoomStorageSink, SinkBackend
from loom_dagster.core.sinks.targets import SinkTarget, scrub

MISSING_TABLE = "missing_table"
MISSING_COLUMN = "missing_column"
EXTRA_NOT_NULL = "extra_not_null"
EXTRA_COLUMN = "extra_column"
"""Delta only: delta-rs refuses an append whose columns differ from the table's, nullable or not."""
TYPE_MISMATCH = "type_mismatch"
UNREACHABLE = "unreachable"
ERROR = "error"
"""The table could not be read or the payload cannot be mapped (the message says why)."""


@dataclass(frozen=True)
class TableProblem:
    """One difference between a sink's real table and its payload, and the DDL (or remedy) fixing it.

    ``kind``: missing_table | missing_column | extra_not_null | extra_column (Delta) | type_mismatch |
    unreachable | error. Texts are secret-free.
    """

    sink: str
    asset_key: str | None
    backend: str
    table: str
    kind: str
    detail: str
    fix: str | None

    def describe(self) -> str:
        """One bullet: where, what, and the fix (indented, may span lines)."""
        where = f"{self.asset_key} (" if self.asset_key else "("
        text = f"- {where}{self.backend} table {self.table}, sink {self.sink!r}) {self.kind}: {self.detail}"
        if self.fix:
            text += "\n    fix:\n" + "\n".join(f"      {line}" for line in self.fix.splitlines())
        return text


@dataclass(frozen=True)
class SinkTablesReport:
    """Every sink table of one flow: problems, tables created, tables checked, Delta tables pending."""

    problems: tuple[TableProblem, ...] = ()
    created: tuple[str, ...] = ()
    checked: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every table exists (or will be created by loom) and matches its payload."""
        return not self.problems

    def describe(self, flow_name: str) -> str:
        """Multi-line text: a header, one bullet per problem with its DDL, and how to opt in to creation."""
        if self.ok:
            return _describe_ok(flow_name, self)
        lines = [
            f"flow {flow_name!r}: {len(self.problems)} problem(s) with the tables its sinks write, found "
            "before launch (the new version was not launched; a running job was not touched):",
            *(p.describe() for p in self.problems),
        ]
        if self.created:
            lines.append(f"created before the check failed: {', '.join(self.created)}")
        if any(p.kind == MISSING_TABLE and p.backend != SinkBackend.DELTA.value for p in self.problems):
            lines.append(
                "Run the DDL above, or opt in to creating missing SQL/ClickHouse tables from the payload "
                "structs at deploy time: LoomDeployResource(create_missing_tables=True) (component YAML: "
                "create_missing_tables: true). Then materialize the flow again."
            )
        else:
            lines.append("Fix the tables (or the payloads) as shown, then materialize the flow again.")
        return "\n".join(lines)

    def metadata(self) -> dict[str, object]:
        """A JSON-able, secret-free summary."""
        return {
            "ok": self.ok,
            "checked": list(self.checked),
            "created": list(self.created),
            "pending": list(self.pending),
            "problems": [asdict(p) for p in self.problems],
        }


def _describe_ok(flow_name: str, report: SinkTablesReport) -> str:
    parts = [f"checked: {', '.join(report.checked) or 'none'}"]
    if report.created:
        parts.append(f"created: {', '.join(report.created)}")
    if report.pending:
        parts.append(f"will be created by loom on first write: {', '.join(report.pending)}")
    return f"flow {flow_name!r}: sink tables ok ({'; '.join(parts)})"


@dataclass(frozen=True)
class SinkToCheck:
    """One storage sink to check: its record, its connection target (secrets out of repr), its payload."""

    label: str
    asset_key: str | None
    record: LoomStorageSink
    target: SinkTarget
    payload: Any

    def problem(self, kind: str, detail: str, fix: str | None = None) -> TableProblem:
        """A problem about this sink, with every known secret scrubbed."""
        secrets = self.target.secrets
        return TableProblem(
            sink=self.record.slot,
            asset_key=self.asset_key,
            backend=self.record.backend.value,
            table=self.record.table
            if self.record.backend is not SinkBackend.CLICKHOUSE
            else f"{self.target.database}.{self.target.table}",
            kind=kind,
            detail=scrub(detail, secrets),
            fix=scrub(fix, secrets) if fix else None,
        )


@dataclass(frozen=True)
class TableOutcome:
    """What checking one sink's table found (merged into the flow's ``SinkTablesReport``)."""

    problems: tuple[TableProblem, ...] = ()
    created: tuple[str, ...] = ()
    checked: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
