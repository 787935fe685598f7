"""``loom_reset_offsets``: rewind (or fast-forward) a deployed flow's consumer-group offsets from the UI.

The logic lives in ``loom_dagster.core.deploy.rewind`` (no Dagster there); this module is the job around it: run
config, the run log, and an ``AssetObservation`` on the flow asset with the per-partition report.
"""

from collections.abc import Mapping
from typing import Any

import dagster as dg
from pydantic import Field

from loom_dagster.core.deploy.rewind import RewindPlan, RewindRequest, RewindResult, rewind_flow
from loom_dagster.core.errors import DeploymentError, LoomDagsterError
from loom_dagster.core.redact import redact_text
from loom_dagster.resource import LoomDeployResource

RESET_OFFSETS_JOB = "loom_reset_offsets"
RESET_OFFSETS_OP = "reset_loom_offsets"
MAX_MARKDOWN_ROWS = 200


class ResetOffsetsConfig(dg.Config):
    """Which flow, exactly one target, an optional partition selection, and whether to only report."""

    flow: str = Field(description="Name of the flow whose consumer group is rewound.")
    to_datetime: str | None = Field(
        default=None,
        description="ISO 8601 with a timezone (2026-03-01T12:00:00Z): resume at the first message at or "
        "after that time (none: the end).",
    )
    earliest: bool = Field(
        default=False, description="Resume at the low watermark (re-read everything kept)."
    )
    latest: bool = Field(default=False, description="Resume at the end (skip everything not yet read).")
    shift_by: int | None = Field(
        default=None,
        description="Move each partition's committed offset by this many messages (negative: re-read), "
        "clamped to the partition.",
    )
    topics: list[str] | None = Field(
        default=None, description="Only these source topics (every partition of each)."
    )
    partitions: dict[str, list[int]] | None = Field(
        default=None, description='Only these partitions, e.g. {"orders.events": [0, 2]}.'
    )
    dry_run: bool = Field(default=False, description="Report what would change; change nothing.")

    def request(self) -> RewindRequest:
        """The core request."""
        return RewindRequest(
            flow=self.flow,
            to_datetime=self.to_datetime,
            earliest=self.earliest,
            latest=self.latest,
            shift_by=self.shift_by,
            topics=list(self.topics) if self.topics is not None else None,
            partitions={t: list(p) for t, p in self.partitions.items()}
            if self.partitions is not None
            else None,
            dry_run=self.dry_run,
        )


def build_reset_offsets_job(flow_keys: Mapping[str, dg.AssetKey]) -> dg.JobDefinition:
    """A job that rewinds one flow's offsets (flow name -> its asset key, for the observation).

    Example:
        >>> job = build_reset_offsets_job({"orders": dg.AssetKey(["loom", "orders"])})
        >>> job.name
        'loom_reset_offsets'
    """
    keys = dict(flow_keys)

    @dg.op(
        name=RESET_OFFSETS_OP,
        description="Plan on the broker, then (unless dry_run) drain the flow's job, reset its consumer "
        "group's offsets and relaunch the same deployment.",
    )
    def _reset(
        context: dg.OpExecutionContext, config: ResetOffsetsConfig, loom: LoomDeployResource
    ) -> dg.Output[dict[str, Any]]:
        try:
            if config.flow not in keys:
                raise DeploymentError(
                    f"unknown flow {config.flow!r}; flows in this code location: {', '.join(sorted(keys))}"
                )
            result = rewind_flow(
                loom.deployer(), config.request(), by=f"run {context.run.run_id}", log=context.log.info
            )
        except LoomDagsterError as exc:
            raise dg.Failure(description=redact_text(str(exc)), allow_retries=False) from exc
        metadata = rewind_metadata(result)
        context.log_event(
            dg.AssetObservation(
                asset_key=keys[config.flow],
                description=_headline(result),
                metadata=metadata,
            )
        )
        return dg.Output(result.plan.to_dict(), metadata=metadata)

    @dg.job(
        name=RESET_OFFSETS_JOB,
        description="Rewind or fast-forward a loom flow's consumer-group offsets (to a time, earliest, "
        "latest or by N messages), restarting its job from them; dry_run only reports.",
    )
    def _job() -> None:
        _reset()

    return _job


def _headline(result: RewindResult) -> str:
    plan = result.plan
    verb = "would reprocess" if not result.applied else "reprocesses"
    done = "dry run" if not result.applied else "rewound"
    return f"{done} ({plan.target}): {verb} {plan.reprocessed} message(s), skips {plan.skipped}"


def rewind_metadata(result: RewindResult) -> dict[str, Any]:
    """The observation / output metadata: totals, the partition table (JSON and Markdown), timings."""
    plan = result.plan
    metadata: dict[str, Any] = {
        "loom/rewind_target": plan.target,
        "loom/dry_run": not result.applied,
        "loom/consumer_group": plan.group_id,
        "loom/reprocessed": plan.reprocessed,
        "loom/skipped": plan.skipped,
        "loom/partitions": dg.MetadataValue.json(plan.to_dict()),
        "loom/partition_table": dg.MetadataValue.md(_markdown(plan)),
        "loom/relaunched": result.relaunched,
        "loom/rewind_s": round(result.seconds, 3),
    }
    if result.drain_seconds is not None:
        metadata["loom/drain_s"] = round(result.drain_seconds, 3)
    if result.gate_seconds is not None:
        metadata["loom/health_gate_s"] = round(result.gate_seconds, 3)
    if result.deployment is not None and result.relaunched:
        metadata["loom/processes"] = result.deployment.job.processes_text
    return metadata


def _markdown(plan: RewindPlan) -> str:
    lines = [
        "| topic | partition | low | end | committed | new | reprocessed | skipped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in plan.partitions[:MAX_MARKDOWN_ROWS]:
        committed = "-" if p.committed is None else str(p.committed)
        lines.append(
            f"| {p.topic} | {p.partition} | {p.low} | {p.high} | {committed} | {p.new} | {p.reprocessed} "
            f"| {p.skipped} |"
        )
    if len(plan.partitions) > MAX_MARKDOWN_ROWS:
        lines.append(f"\n({len(plan.partitions) - MAX_MARKDOWN_ROWS} more in loom/partitions)")
    lines.append(f"\n**Total:** {plan.reprocessed} reprocessed, {plan.skipped} skipped")
    return "\n".join(lines)
