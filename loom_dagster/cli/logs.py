"""``loom-dagster logs``: the last lines of a flow's job log, redacted; ``-f`` follows it across rotations.

loom-dagster logs orders -n 200 -f
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from loom_dagster.cli.common import CliError, cli_launcher, current_deployment, launcher_of


def add_parser(commands: Any) -> None:
    """Register ``logs`` on the ``loom-dagster`` sub-command parser *commands*."""
    logs = commands.add_parser("logs", help="a flow's job log")
    logs.add_argument("flow")
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("-n", "--lines", type=int, default=50)
    logs.set_defaults(run=cmd_logs)


def cmd_logs(args: argparse.Namespace) -> int:
    """Print the last ``--lines`` lines, then (``--follow``) every new line until interrupted."""
    cli = cli_launcher(args)
    deployment = current_deployment(cli.deployment_store(args.state_dir), args.flow)
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
