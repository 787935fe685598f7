"""``loom-dagster``: the operator's view of the deployed flows (on this host, or with ``--launcher
kubernetes --launcher-config '{"namespace": ...}'`` in a cluster).

loom-dagster status [--json] [--state-dir DIR]     every deployed flow: pid, uptime, health, plan, lag, writes
loom-dagster logs FLOW [-f] [-n 50]                the job's log (follow with -f)
loom-dagster stop FLOW | --all                     drain and stop; health sensors will not restart it
loom-dagster refresh -m MODULE | -f FILE           write a code location's defs state (loads compile nothing)
loom-dagster manifests FLOW -m MODULE | --rbac     the Kubernetes objects a deploy of FLOW applies; the Role

``status`` also lists orphan jobs (health ``orphan``): a job running without a record in this state dir,
found in this host's process table and, for recorded Kafka flows, as a holder of the consumer group's
fence on any host (``loom_dagster.core.deploy.orphans``). ``stop FLOW`` stops a local orphan of FLOW too, record or not.

A record is data: the launcher it names is built only if it is a built-in (``local``, ``kubernetes``) or
registered under the entry point group ``loom_dagster.launchers`` (``--launcher`` likewise); nothing a
record names is imported. ``stop`` signals only processes that ``/proc`` shows are the flow's runtime,
run by this user (``loom_dagster.core.launchers.local``); anything else is refused, saying what did not match.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from loom_dagster.cli.manifests import add_manifests_parser
from loom_dagster.cli.refresh import add_refresh_parser
from loom_dagster.core.deploy.launch_records import LauncherRef
from loom_dagster.core.deploy.orphans import FenceTarget, Orphan, find_orphans, stop_orphans
from loom_dagster.core.deploy.store import Deployment, DeploymentStore, UnreadableRecord
from loom_dagster.core.errors import LoomDagsterError
from loom_dagster.core.job.status import SinkError
from loom_dagster.core.kafka.cluster import KafkaCluster, record_target
from loom_dagster.core.kafka.lag_check import check_lag
from loom_dagster.core.kafka.lag_eval import DeploymentStart
from loom_dagster.core.kafka.lag_status import LagStatus
from loom_dagster.core.launchers.base import Launcher
from loom_dagster.core.launchers.registry import is_launcher_of, launcher_from_ref
from loom_dagster.core.redact import redact_text
from loom_dagster.core.sensor_settings import KafkaLagSettings

LAUNCHER_VARIABLE = "LOOM_DAGSTER_LAUNCHER"
LAUNCHER_CONFIG_VARIABLE = "LOOM_DAGSTER_LAUNCHER_CONFIG"
STATUS_LAG = KafkaLagSettings(warn_lag=2**62, error_lag=2**62, request_timeout_s=5.0, read_delay=False)
"""Lag settings of ``status``: the sensor's thresholds are not known here, only the statuses speak."""


class CliError(LoomDagsterError):
    """A user-facing CLI error (printed without a traceback, exit 2)."""


def launcher_of(
    deployment: Deployment, built: dict[bytes, Launcher] | None = None, cli: Launcher | None = None
) -> Launcher:
    """The launcher that ran *deployment*, built again from its record (cached in *built*), only when
    the record names an allowed launcher (:meth:`LauncherRef.build`); ``CliError`` saying how to
    register it otherwise.

    *cli* (the command's own ``--launcher``) is used instead when it is of the recorded class and reaches
    the job: the operator's credentials, never a kubeconfig path or context the deployer recorded."""
    if cli is not None and is_launcher_of(deployment.launcher, cli) and cli.owns(deployment.job):
        return cli
    built = {} if built is None else built
    key = msgspec.json.encode(deployment.launcher, order="sorted")
    if key not in built:
        try:
            built[key] = launcher_from_ref(deployment.launcher)
        except LoomDagsterError as exc:
            raise CliError(f"flow {deployment.flow_name!r}: {exc}") from exc
    return built[key]


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


def _current(store: DeploymentStore, flow: str) -> Deployment:
    deployment = store.current(flow)
    if deployment is None:
        known = ", ".join(d.flow_name for d in store.all()) or "none"
        raise CliError(f"no deployment of flow {flow!r} in {store.location()}; deployed flows there: {known}")
    return deployment


def cli_launcher(args: argparse.Namespace) -> Launcher:
    """The launcher ``--launcher`` / ``--launcher-config`` (or their environment variables) name:
    where the deployment records live (files here for ``local``; the cluster for ``kubernetes``)."""
    path = args.launcher or os.environ.get(LAUNCHER_VARIABLE) or "local"
    raw = args.launcher_config or os.environ.get(LAUNCHER_CONFIG_VARIABLE) or "{}"
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise CliError(f"--launcher-config is not JSON: {exc}") from exc
    try:
        return launcher_from_ref(LauncherRef(path, config))
    except LoomDagsterError as exc:
        raise CliError(str(exc)) from exc


def cmd_status(args: argparse.Namespace) -> int:
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


def cmd_logs(args: argparse.Namespace) -> int:
    cli = cli_launcher(args)
    deployment = _current(cli.deployment_store(args.state_dir), args.flow)
    path = Path(deployment.job.log_path)
    launcher = launcher_of(deployment, cli=cli)
    if not launcher.owns(deployment.job):
        raise CliError(f"flow {args.flow!r} runs on host {deployment.host!r}; its log is there: {path}")
    followed = launcher.follow_logs(deployment.job) if args.follow else None  # from before the tail: no gap
    print(launcher.logs(deployment.job, args.lines))
    if followed is None:
        return 0
    try:
        for line in followed:  # across rotations (job.log -> job.log.1), redacted
            print(line, flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from loom_dagster.core.deploy.deployer import FlowDeployer

    cli = cli_launcher(args)
    store = cli.deployment_store(args.state_dir)
    local = launcher_from_ref(LauncherRef())  # orphans are found in this host's process table
    names = [d.flow_name for d in store.all()] if args.all else [args.flow]
    if not args.all and args.flow is None:
        raise CliError("name a flow to stop, or pass --all")
    for name in names:
        orphans = [o for o in find_orphans(store, flows=[name], launcher=local).of(name) if o.local]
        deployment = store.current(name) if orphans else _current(store, name)
        launcher = launcher_of(deployment, cli=cli) if deployment else local
        deployer = FlowDeployer(launcher, store)
        if deployment is None:
            pass
        elif deployment.stopped_on_purpose:
            print(f"{name}: already stopped (by {deployment.stopped_by})")
        else:
            idle = _nothing_runs(launcher, deployment)
            stopped = deployer.undeploy(name, by=f"loom-dagster CLI on {socket.gethostname()}")
            if idle is not None:
                print(f"{name}: marked stopped; nothing was signalled: no process of its job runs ({idle})")
            else:
                print(f"{name}: stopped ({stopped.job.processes_text if stopped else 'nothing ran'})")
        for orphan in stop_orphans(orphans, deployer.options.drain_timeout_s, local):
            print(f"{name}: stopped orphan job pid {orphan.pid} (no deployment record in {store.root})")
    return 0


def _nothing_runs(launcher: Launcher, deployment: Deployment) -> str | None:
    """Why no recorded process of *deployment*'s job runs here (the launcher's report), or ``None``
    when one runs or the job is out of this launcher's reach (the undeploy then says where it runs)."""
    if not launcher.owns(deployment.job):
        return None
    report = launcher.report(deployment.job)
    return redact_text(report.reason) if report.alive_processes == 0 else None


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
        print(f"loom-dagster: fence holders not read: {redact_text(reason)}", file=sys.stderr)
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


def build_parser() -> argparse.ArgumentParser:
    """The ``loom-dagster`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="loom-dagster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--launcher",
        default=None,
        help=f"where the flows run: local (default), kubernetes or a launcher registered under the entry "
        f"point group loom_dagster.core.launchers (default: ${LAUNCHER_VARIABLE})",
    )
    parser.add_argument(
        "--launcher-config",
        default=None,
        help=f'the launcher\'s settings as JSON, e.g. \'{{"namespace": "streaming"}}\' for kubernetes '
        f"(default: ${LAUNCHER_CONFIG_VARIABLE})",
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
    add_refresh_parser(commands)
    add_manifests_parser(commands)
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
