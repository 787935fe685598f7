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
import sys
from collections.abc import Callable, Sequence
from typing import Any

from loom_dagster.cli import logs, manifests, status, stop
from loom_dagster.cli.common import add_launcher_options, print_stderr
from loom_dagster.cli.refresh import add_refresh_parser
from loom_dagster.core.errors import LoomDagsterError

COMMANDS: tuple[Callable[[Any], None], ...] = (
    status.add_parser,
    logs.add_parser,
    stop.add_parser,
    add_refresh_parser,
    manifests.add_parser,
)
"""Each command module's registration, in ``--help`` order: it adds its sub-parser and sets ``run``."""


def build_parser() -> argparse.ArgumentParser:
    """The ``loom-dagster`` argument parser."""
    parser = argparse.ArgumentParser(  # the module docstring is the --help text: an edit changes output
        prog="loom-dagster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_launcher_options(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    for add_parser in COMMANDS:
        add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loom-dagster`` console script: run the command, exit 2 on a
    :class:`LoomDagsterError` (printed without a traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except LoomDagsterError as exc:
        print_stderr(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
