"""``loom-dagster``: the operator's view of the flows deployed on this host.

loom-dagster status [--json] [--state-dir DIR]     every deployed flow: pid, uptime, health, plan, lag, writes
loom-dagster logs FLOW [-f] [-n 50]                the job's log (follow with -f)
loom-dagster stop FLOW | --all                     drain and stop; health sensors will not restart it
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loom_dagster.deployments import Deployment, DeploymentStore
from loom_dagster.errors import LoomDagsterError
from loom_dagster.launchers import procfs
from loom_dagster.launchers.local import LocalProcessLauncher, log_tail
from loom_dagster.redact import redact_text
from loom_dagster.runtime.status import SinkError


class CliError(LoomDagsterError):
    """A user-facing CLI error (printed without a traceback, exit 2)."""


def flow_status(
    deployment: Deployment, launcher: LocalProcessLauncher, with_lag: bool = True
) -> dict[str, Any]:
    """One row of ``status``: what runs, since when, how healthy, how far behind, what it last wrote."""
    job = deployment.job
    row: dict[str, Any] = {
        "flow": deployment.flow_name,
        "host": deployment.host,
        "pids": [p.pid for p in job.processes],
        "plan_hash": deployment.plan_hash,
        "deployed_at": deployment.deployed_at,
        "log_path": job.log_path,
    }
    if deployment.host != socket.gethostname():
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
    uptimes = [procfs.uptime_seconds(p.pid) for p in job.processes if procfs.is_alive(p.pid, p.start_ticks)]
    row.update(health=health, detail=detail, alive_processes=report.alive_processes)
    row["uptime_s"] = (
        round(min(u for u in uptimes if u is not None), 1) if uptimes and None not in uptimes else None
    )
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
    """Total consumer lag of the flow's group (end - committed over its source partitions)."""
    source = deployment.extra.get("source") or {}
    if source.get("kind") != "kafka" or not source.get("group_id"):
        return None
    if source.get("secured"):
        return "n/a (secured cluster: see the kafka_lag check)"
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": ",".join(source["brokers"]),
            "group.id": source["group_id"],
            "enable.auto.commit": False,
            "socket.timeout.ms": 5000,
        }
    )
    try:
        total = 0
        for topic in source["topics"]:
            meta = consumer.list_topics(topic, timeout=5)
            parts = [TopicPartition(topic, p) for p in meta.topics[topic].partitions]
            committed = consumer.committed(parts, timeout=5)
            for tp in committed:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=5)
                total += high - max(tp.offset, 0)
        return total
    except Exception as exc:  # the broker being down is a status, not a crash
        return f"unavailable ({type(exc).__name__})"
    finally:
        consumer.close()


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


def _current(store: DeploymentStore, flow: str) -> Deployment:
    deployment = store.current(flow)
    if deployment is None:
        known = ", ".join(d.flow_name for d in store.all()) or "none"
        raise CliError(f"no deployment of flow {flow!r} in {store.root}; deployed flows here: {known}")
    return deployment


def cmd_status(args: argparse.Namespace) -> int:
    store = DeploymentStore(args.state_dir)
    launcher = LocalProcessLauncher()
    deployments = [d for d in store.all() if args.all or not d.stopped_on_purpose]
    rows = [flow_status(d, launcher, with_lag=not args.no_lag) for d in deployments]
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True, default=str))
    elif not rows:
        print(f"no flows deployed in {store.root}")
    else:
        print(render_table(rows))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    deployment = _current(DeploymentStore(args.state_dir), args.flow)
    path = Path(deployment.job.log_path)
    if deployment.host != socket.gethostname():
        raise CliError(f"flow {args.flow!r} runs on host {deployment.host!r}; its log is there: {path}")
    print(log_tail(path, args.lines))
    if not args.follow:
        return 0
    with path.open("rb") as handle:
        handle.seek(0, 2)
        try:
            while True:
                chunk = handle.read()
                if chunk:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
                else:
                    time.sleep(0.3)
        except KeyboardInterrupt:
            return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from loom_dagster.deploy import FlowDeployer

    store = DeploymentStore(args.state_dir)
    deployer = FlowDeployer(LocalProcessLauncher(), store)
    names = [d.flow_name for d in store.all()] if args.all else [args.flow]
    if not args.all and args.flow is None:
        raise CliError("name a flow to stop, or pass --all")
    for name in names:
        deployment = _current(store, name)
        if deployment.stopped_on_purpose:
            print(f"{name}: already stopped (by {deployment.stopped_by})")
            continue
        stopped = deployer.undeploy(name, by=f"loom-dagster CLI on {socket.gethostname()}")
        pids = ", ".join(str(p.pid) for p in stopped.job.processes) if stopped else "-"
        print(f"{name}: stopped (pids {pids})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``loom-dagster`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="loom-dagster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        help="deployment state dir (default: $LOOM_DAGSTER_STATE_DIR, "
        "else $DAGSTER_HOME/loom, else ~/.loom-dagster)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="every deployed flow on this host")
    status.add_argument("--json", action="store_true")
    status.add_argument("--no-lag", action="store_true", help="skip the broker round trip for lag")
    status.add_argument("--all", action="store_true", help="include flows stopped on purpose")
    status.set_defaults(run=cmd_status)
    logs = commands.add_parser("logs", help="a flow's job log")
    logs.add_argument("flow")
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("-n", "--lines", type=int, default=50)
    logs.set_defaults(run=cmd_logs)
    stop = commands.add_parser("stop", help="drain and stop a flow's job (undeploy)")
    stop.add_argument("flow", nargs="?")
    stop.add_argument("--all", action="store_true")
    stop.set_defaults(run=cmd_stop)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loom-dagster`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except LoomDagsterError as exc:
        print(f"loom-dagster: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
