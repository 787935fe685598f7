"""Command line of the job runtime: ``python -m loom_dagster.runtime ...``.

Secrets are never arguments: broker credentials, database URLs and the like come from the loom
config files and the environment (``${oc.env:...}``, ``LOOM__SECTION__KEY``) only.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from loom_dagster.core.job.status import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_HEARTBEAT_S,
    EXIT_BAD_INPUT,
    EXIT_CODE_MEANINGS,
)
from loom_dagster.core.redact import redact_text as redact
from loom_dagster.runtime.job import DEFAULT_FENCE_TIMEOUT_S, JobOptions, run_job

PROG = "python -m loom_dagster.runtime"
LOG_PREFIX = "loom-dagster runtime: "
HTTP_PORT_ENV = "LOOM_DAGSTER_HTTP_PORT"
HTTP_HOST_ENV = "LOOM_DAGSTER_HTTP_HOST"
DEFAULT_HTTP_HOST = "127.0.0.1"  # loopback: nothing off this host reaches a local job's probes
POD_HTTP_HOST = "0.0.0.0"  # in a Kubernetes pod: all interfaces, the kubelet probes the pod IP
POD_VARIABLE = "KUBERNETES_SERVICE_HOST"  # set by the kubelet in every pod
AUTO_PROCESS_ID = "auto"
_ORDINAL = re.compile(r"^.+-(?P<ordinal>[0-9]+)$")


class _RedactingFormatter(logging.Formatter):
    """Formats like ``logging.Formatter`` and masks credentials in the result."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors exit with ``EXIT_BAD_INPUT`` and one clear line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{LOG_PREFIX}exit {EXIT_BAD_INPUT}: bad arguments: {redact(message)}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    """The runtime's argument parser."""
    codes = "; ".join(f"{code} = {meaning}" for code, meaning in EXIT_CODE_MEANINGS.items())
    parser = _Parser(
        prog=PROG,
        description="Run one loom streaming flow until SIGTERM/SIGINT, keeping a JSON status file.",
        epilog=f"Exit codes: {codes}.",
    )
    parser.add_argument("--import-path", required=True, help="flow to run, 'package.module:attribute'")
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        dest="configs",
        help="loom config file or directory (base.yaml + <env>.yaml); repeat to merge several",
    )
    parser.add_argument(
        "--environment", default=None, help="loom environment (default: LOOM_ENV, else production)"
    )
    parser.add_argument("--status-file", required=True, type=Path, help="JSON status record to keep current")
    parser.add_argument(
        "--flow-name", default=None, help="name in the status record (default: the flow's name)"
    )
    parser.add_argument(
        "--sys-path",
        action="append",
        default=[],
        dest="sys_paths",
        help="directory to put on sys.path before importing the flow; repeatable",
    )
    parser.add_argument(
        "--heartbeat", type=float, default=DEFAULT_HEARTBEAT_S, help="status write interval, s"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        help=f"seconds a stop may take before the process gives up (exit 4); 0 = wait forever "
        f"(default {DEFAULT_DRAIN_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--no-final-commit",
        dest="final_commit",
        action="store_false",
        help="do not commit the offsets made durable by the shutdown flush (they are then replayed)",
    )
    parser.add_argument(
        "--run-id", default=None, help="the Dagster run that deployed this job (names it in its fence)"
    )
    fence = parser.add_argument_group(
        "consumer-group fence (Kafka sources; see loom_dagster.core.checks.fence)"
    )
    fence.add_argument(
        "--fence-timeout",
        type=float,
        default=DEFAULT_FENCE_TIMEOUT_S,
        help="seconds to wait for the consumer group's fence before refusing to start "
        f"(default {DEFAULT_FENCE_TIMEOUT_S:g}; a SIGKILLed holder frees it after ~10 s)",
    )
    fence.add_argument(
        "--no-fence",
        dest="fence",
        action="store_false",
        help="do not take the fence: nothing stops a second job of the same group (duplicates)",
    )
    cluster = parser.add_argument_group("cluster (overrides streaming.runtime)")
    cluster.add_argument(
        "--process-id",
        default=None,
        help="this process's index in --addresses, or 'auto': the ordinal ending the host name "
        "($HOSTNAME, else the system's), e.g. 2 in a StatefulSet pod 'orders-2'",
    )
    cluster.add_argument(
        "--addresses", default=None, help="host:port of every process, comma-separated, same order everywhere"
    )
    cluster.add_argument(
        "--workers-per-process", type=int, default=None, help="worker threads in this process"
    )
    probes = parser.add_argument_group("HTTP probes and metrics (see loom_dagster.runtime.http_server)")
    probes.add_argument(
        "--http-port",
        type=int,
        default=None,
        help=f"serve /readyz /livez /status /metrics on this port; 0 = any free port "
        f"(default: ${HTTP_PORT_ENV}, else no server)",
    )
    probes.add_argument(
        "--http-host",
        default=None,
        help=f"address to bind (default: ${HTTP_HOST_ENV}, else {POD_HTTP_HOST} in a Kubernetes pod "
        f"(${POD_VARIABLE} set), else {DEFAULT_HTTP_HOST})",
    )
    probes.add_argument(
        "--live-timeout",
        type=float,
        default=None,
        help="seconds without a heartbeat, or without a poll once connected, before /livez answers 503 "
        "(default 3 x --heartbeat)",
    )
    return parser


def parse_options(argv: Sequence[str] | None = None) -> JobOptions:
    """Parse and check the arguments into :class:`~loom_dagster.runtime.job.JobOptions`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    addresses = _addresses(parser, args.addresses)
    process_id = _process_id(parser, args.process_id)
    _check_cluster(parser, process_id, addresses, args.workers_per_process)
    http_port = _http_port(parser, args.http_port)
    if args.heartbeat <= 0:
        parser.error("--heartbeat must be above 0")
    if args.drain_timeout < 0:
        parser.error("--drain-timeout must be 0 (no limit) or above")
    if args.fence_timeout <= 0:
        parser.error("--fence-timeout must be above 0")
    if args.live_timeout is not None and args.live_timeout <= 0:
        parser.error("--live-timeout must be above 0")
    return JobOptions(
        import_path=args.import_path,
        configs=tuple(args.configs),
        status_file=args.status_file,
        environment=args.environment,
        flow_name=args.flow_name,
        sys_paths=tuple(args.sys_paths),
        process_id=process_id,
        addresses=addresses,
        workers_per_process=args.workers_per_process,
        heartbeat_s=args.heartbeat,
        final_commit=args.final_commit,
        drain_timeout_s=args.drain_timeout or None,
        run_id=args.run_id,
        fence=args.fence,
        fence_timeout_s=args.fence_timeout,
        http_port=http_port,
        http_host=http_host(args.http_host),
        live_timeout_s=args.live_timeout,
    )


def _addresses(parser: argparse.ArgumentParser, raw: str | None) -> tuple[str, ...] | None:
    if raw is None:
        return None
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    for item in items:
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            parser.error(f"--addresses entry {item!r} must look like host:port")
    if not items:
        parser.error("--addresses is empty")
    return items


def pod_ordinal(host_name: str) -> int | None:
    """The ordinal ending a StatefulSet pod's host name (first DNS label), or ``None``.

    Example:
        >>> pod_ordinal("orders-2"), pod_ordinal("orders-10.orders.ns.svc.cluster.local"), pod_ordinal("orders")
        (2, 10, None)
    """
    match = _ORDINAL.match(host_name.strip().split(".", 1)[0])
    return int(match["ordinal"]) if match else None


def host_name() -> str:
    """This pod's name: ``$HOSTNAME`` (set by Kubernetes), else the system host name."""
    return os.environ.get("HOSTNAME", "").strip() or socket.gethostname()


def _process_id(parser: argparse.ArgumentParser, raw: str | None) -> int | None:
    """``--process-id``: an integer, or ``auto`` (the host name's ordinal)."""
    if raw is None:
        return None
    if raw.strip().lower() == AUTO_PROCESS_ID:
        name = host_name()
        ordinal = pod_ordinal(name)
        if ordinal is None:
            parser.error(
                f"--process-id auto: host name {name!r} does not end in an ordinal "
                "(a StatefulSet pod is named like 'orders-2')"
            )
        return ordinal
    try:
        return int(raw)
    except ValueError:
        parser.error(f"--process-id must be an integer or 'auto', not {raw!r}")


def _http_port(parser: argparse.ArgumentParser, flag: int | None) -> int | None:
    """``--http-port``, else ``$LOOM_DAGSTER_HTTP_PORT`` (unset or empty: no server)."""
    port: int | None = flag
    if port is None:
        raw = os.environ.get(HTTP_PORT_ENV, "").strip()
        if not raw:
            return None
        if not (raw.isascii() and raw.isdigit()):
            parser.error(f"{HTTP_PORT_ENV}={raw!r} is not a port number")
        port = int(raw)
    if not 0 <= port <= 65535:
        parser.error(f"--http-port {port} is not a port number (0 = any free port)")
    return port


def http_host(flag: str | None) -> str:
    """``--http-host``, else ``$LOOM_DAGSTER_HTTP_HOST``, else all interfaces in a Kubernetes pod (the
    kubelet probes the pod IP), else loopback.

    Example:
        >>> http_host("::1")
        '::1'
    """
    chosen = (flag or "").strip() or os.environ.get(HTTP_HOST_ENV, "").strip()
    if chosen:
        return chosen
    return POD_HTTP_HOST if os.environ.get(POD_VARIABLE, "").strip() else DEFAULT_HTTP_HOST


def _check_cluster(
    parser: argparse.ArgumentParser,
    process_id: int | None,
    addresses: tuple[str, ...] | None,
    workers: int | None,
) -> None:
    if (process_id is None) != (addresses is None):
        parser.error("--process-id and --addresses go together")
    if process_id is not None and addresses is not None and not 0 <= process_id < len(addresses):
        parser.error(f"--process-id {process_id} is not an index of the {len(addresses)} --addresses")
    if workers is not None and workers < 1:
        parser.error("--workers-per-process must be at least 1")


def configure_logging() -> None:
    """Our own lines go to stderr, one per event, prefixed and redacted; loom's one per event, a
    routed record in one line (:mod:`~loom_dagster.runtime.loom_logging`). With
    ``LOOM_DAGSTER_LOG_FILE`` set (by the launcher), fd 1/2 go to the rotated job log first
    (:mod:`~loom_dagster.core.job.logs`)."""
    from loom_dagster.core.job.logs import JobLogHandler, start_job_log
    from loom_dagster.runtime.loom_logging import configure_loom_logging

    handler = JobLogHandler(sys.stderr, start_job_log(LOG_PREFIX))
    handler.setFormatter(_RedactingFormatter(f"{LOG_PREFIX}%(message)s"))
    logger = logging.getLogger("loom_dagster.runtime")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    configure_loom_logging(sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, run the job, return its exit code."""
    configure_logging()
    return run_job(parse_options(argv))
