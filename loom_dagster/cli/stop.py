"""``loom-dagster stop``: drain and stop a flow's job (or every flow's, ``--all``) and mark it stopped on
purpose, so the health sensors do not restart it; a local orphan job of the flow is stopped too.

    loom-dagster stop orders
    loom-dagster stop --all

Only processes that ``/proc`` shows are the flow's runtime, run by this user, are signalled
(``loom_dagster.core.launchers.local``); anything else is refused, saying what did not match.
"""

from __future__ import annotations

import argparse
import socket
from typing import Any

from loom_dagster.cli.common import CliError, cli_launcher, current_deployment, launcher_of
from loom_dagster.core.deploy.deployer import FlowDeployer
from loom_dagster.core.deploy.launch_records import LauncherRef
from loom_dagster.core.deploy.orphans import find_orphans, stop_orphans
from loom_dagster.core.deploy.store import Deployment
from loom_dagster.core.launchers.base import Launcher
from loom_dagster.core.launchers.registry import launcher_from_ref
from loom_dagster.core.redact import redact_text


def add_parser(commands: Any) -> None:
    """Register ``stop`` on the ``loom-dagster`` sub-command parser *commands*."""
    stop = commands.add_parser("stop", help="drain and stop a flow's job (undeploy)")
    stop.add_argument("flow", nargs="?")
    stop.add_argument("--all", action="store_true")
    stop.set_defaults(run=cmd_stop)


def cmd_stop(args: argparse.Namespace) -> int:
    """Undeploy each named flow (printing what stopped), then stop its local orphans."""
    cli = cli_launcher(args)
    store = cli.deployment_store(args.state_dir)
    local = launcher_from_ref(LauncherRef())  # orphans are found in this host's process table
    names = [d.flow_name for d in store.all()] if args.all else [args.flow]
    if not args.all and args.flow is None:
        raise CliError("name a flow to stop, or pass --all")
    for name in names:
        orphans = [o for o in find_orphans(store, flows=[name], launcher=local).of(name) if o.local]
        deployment = store.current(name) if orphans else current_deployment(store, name)
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
