"""``loom-dagster status``: every deployed flow with its pids, uptime, health, plan, lag and last writes;
also the records that cannot be read and the orphan jobs (running without a record here).

    loom-dagster status --json --no-lag
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loom_dagster.cli.common import cli_launcher, launcher_of, print_stderr
from loom_dagster.core.deploy.orphans import FenceTarget, Orphan, find_orphans
from loom_dagster.core.deploy.store import Deployment, DeploymentStore, UnreadableRecord
from loom_dagster.core.job.status import SinkError
from loom_dagster.core.kafka.cluster import KafkaCluster, record_target
from loom_dagster.core.kafka.lag_check import check_lag
from loom_dagster.core.kafka.lag_eval import DeploymentStart
from loom_dagster.core.kafka.lag_status import LagStatus
from loom_dagster.core.launchers.base import Launcher
from loom_dagster.core.redact import redact_text
from loom_dagster.core.sensor_settings import KafkaLagSettings

STATUS_LAG = KafkaLagSettings(warn_lag=2**62, error_lag=2**62, request_timeout_s=5.0, read_delay=False)
"""Lag settings of ``status``: the sensor's thresholds are not known here, only the statuses speak."""


def add_parser(commands: Any) -> None:
    """Register ``status`` on the ``loom-dagster`` sub-command parser *commands*."""
    status = commands.add_parser("status", help="every deployed flow on this host")
    status.add_argument("--json", action="store_true")
    status.add_argument("--no-lag", action="store_true", help="skip the broker round trip for lag")
    status.add_argument("--all", action="store_true", help="include flows stopped on purpose")
    status.set_defaults(run=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    """Print one row per flow (a table, or JSON with ``--json``)."""
    cli = cli_launcher(args)
    store = cli.deployment_store(args.state_dir)
    recorded, unreadable = store.scan()
    deployments = [d for d in recorded if args.all or not d.stopped_on_purpose]
    built: dict[bytes, Launcher] = {}
    launchers = [launcher_of(d, built, cli) for d in deployments]
    with contextlib.ExitStack() as observing:  # each launcher reads where its jobs run once
        for launcher in {id(launcher): launcher for launcher in launchers}.values():
            observing.enter_context(launcher.observation())
        rows = [
            flow_status(deployment, launcher, with_lag=not args.no_lag)
            for deployment, launcher in zip(deployments, launchers, strict=True)
        ]
    rows += [unreadable_row(record) for record in unreadable]
    rows += [orphan_row(o, store.root) for o in status_orphans(store, read_fences=not args.no_lag)]
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True, default=str))
    elif not rows:
        print(f"no flows deployed in {store.location()}")
    else:
        print(render_table(rows))
    return 0


def flow_status(
    deployment: Deployment, launcher: Launcher | None = None, with_lag: bool = True
) -> dict[str, Any]:
    """One row of ``status``: what runs, since when, how healthy, how far behind, what it last wrote.

    *launcher* defaults to the one the record names (:func:`launcher_of`)."""
    launcher = launcher or launcher_of(deployment)
    job = deployment.job
    row: dict[str, Any] = {
        "flow": deployment.flow_name,
        "host": deployment.host,
        "pids": [p.pid for p in job.processes],
        "plan_hash": deployment.plan_hash,
        "deployed_at": deployment.deployed_at,
        "log_path": job.log_path,
    }
    if not launcher.owns(job):
        row.update(health="other-host", detail=f"deployed on {deployment.host}; run this command there")
        return row
    report = launcher.report(job)
    alive = report.alive_processes > 0
    if deployment.stopped_on_purpose:
        health, detail = "stopped", f"stopped on purpose by {deployment.stopped_by}"
    elif not alive:
        health, detail = "dead", f"stale record: no process is running ({report.reason})"
    else:
        health, detail = report.state.value, report.reason
    row.update(health=health, detail=redact_text(detail), alive_processes=report.alive_processes)
    uptime = launcher.uptime(job) if alive else None
    row["uptime_s"] = round(uptime, 1) if uptime is not None else None
    row["records_in"] = sum(int(s.get("records_in") or 0) for s in report.statuses)
    row["errors"] = sum(int(s.get("errors") or 0) for s in report.statuses)
    row["last_write"] = _last_writes(report.statuses)
    problems = _problems(report.statuses)
    if problems:
        row["problems"] = problems
    if with_lag and alive:
        row["lag"] = source_lag(deployment)
    return row


def _problems(statuses: Sequence[dict[str, Any]]) -> list[str]:
    """A failing sink write (still unresolved) and a final error, per process, redacted."""
    found: list[str] = []
    for status in statuses:
        sink_error = SinkError.from_dict(status.get("sink_error"))
        if sink_error is not None and sink_error.active:
            found.append(redact_text(sink_error.summary()))
        if status.get("error"):
            found.append(redact_text(str(status["error"])))
    return list(dict.fromkeys(found))


def _last_writes(statuses: Sequence[dict[str, Any]]) -> dict[str, float]:
    writes: dict[str, float] = {}
    for status in statuses:
        for sink, info in (status.get("sinks") or {}).items():
            at = info.get("last_write_at")
            if at and at > writes.get(sink, 0):
                writes[sink] = at
    return writes


def source_lag(deployment: Deployment) -> int | str | None:
    """Total consumer lag of the flow's group: the same fetch and evaluation as the ``kafka_lag`` check
    (one shot, no window; a partition without a commit counts from the offset the job started from).

    A number when every source partition answered and is fine, else the lag with its status
    (``"120 (NO_COMMITS)"``) or ``"unavailable (UNREACHABLE)"``. A record keeps no credentials: a
    secured cluster is not read here (the sensor reads it with the flow's own settings).
    """
    source = deployment.extra.get("source") or {}
    target = record_target(deployment.flow_name, source)
    if target is None:
        return None
    if source.get("secured"):
        return "n/a (secured cluster: see the kafka_lag check)"
    started = max(deployment.deployed_at, deployment.job.started_at)
    start = DeploymentStart.from_record(started, deployment.extra or {}, window_s=0.0)
    try:
        (flow,) = check_lag([target], STATUS_LAG, starts={target.name: start}).flows
    except Exception as exc:  # a bad client config is a status, not a crash
        return f"unavailable ({type(exc).__name__})"
    if flow.status is LagStatus.OK:
        return flow.total_lag
    if flow.status in (LagStatus.UNREACHABLE, LagStatus.MISSING_TOPIC) or not flow.partitions:
        return f"unavailable ({flow.status.value})"
    return f"{flow.total_lag} ({flow.status.value})"


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    """The human view of ``status``."""
    headers = ["FLOW", "HEALTH", "PIDS", "UPTIME", "PLAN", "LAG", "RECORDS", "LAST WRITE"]
    lines = [headers]
    now = time.time()
    for row in rows:
        writes = row.get("last_write") or {}
        last = ", ".join(f"{sink} {_ago(now - at)}" for sink, at in sorted(writes.items())) or "-"
        lines.append(
            [
                row["flow"],
                row.get("health", "?"),
                ",".join(map(str, row["pids"])),
                _ago(row["uptime_s"], suffix="") if row.get("uptime_s") is not None else "-",
                row["plan_hash"],
                str(row.get("lag", "-")) if row.get("lag") is not None else "-",
                str(row.get("records_in", "-")),
                last,
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(headers))]
    table = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    table += [f"{row['flow']}: {problem}" for row in rows for problem in row.get("problems") or ()]
    return "\n".join(table)


def _ago(seconds: float, suffix: str = " ago") -> str:
    if seconds < 60:
        return f"{seconds:.0f}s{suffix}"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m{suffix}"
    return f"{seconds / 3600:.1f}h{suffix}"


def status_orphans(store: DeploymentStore, read_fences: bool = True) -> list[Orphan]:
    """Jobs running without a record here: every local runtime process, and (``read_fences``) the
    fence holders of the recorded Kafka flows on any host (plaintext clusters: a record keeps no
    credentials; the health sensor reads secured ones)."""
    targets = []
    for deployment in store.all() if read_fences else ():
        source = deployment.extra.get("source") or {}
        if source.get("kind") == "kafka" and source.get("group_id") and not source.get("secured"):
            cluster = KafkaCluster(",".join(sorted(str(b) for b in source.get("brokers") or ())))
            targets.append(FenceTarget(deployment.flow_name, str(source["group_id"]), cluster))
    report = find_orphans(store, targets=targets, timeout_s=3.0)
    for reason in report.unreachable:
        print_stderr(f"fence holders not read: {redact_text(reason)}")
    return list(report.orphans)


def unreadable_row(record: UnreadableRecord) -> dict[str, Any]:
    """A ``status`` row for a deployment record that exists but cannot be read (shown, never hidden)."""
    detail = redact_text(f"deployment record {record.location} is unreadable: {record.reason}")
    return {
        "flow": record.flow,
        "host": "-",
        "pids": [],
        "plan_hash": "-",
        "health": "unreadable",
        "detail": detail,
        "problems": [detail],
        "record": record.location,
    }


def orphan_row(orphan: Orphan, state_dir: Path) -> dict[str, Any]:
    """A ``status`` row for a job that runs without a deployment record here."""
    detail = orphan.describe(state_dir)
    return {
        "flow": orphan.flow_name,
        "host": orphan.host,
        "pids": [orphan.pid] if orphan.pid is not None else [],
        "plan_hash": "-",
        "health": "orphan",
        "detail": detail,
        "problems": [detail],
        "consumer_group": orphan.consumer_group,
        "found_by": orphan.found_by,
        "run_id": orphan.run_id,
    }
