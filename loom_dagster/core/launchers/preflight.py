"""Preflight of a new version, in a fresh process with the job's environment: import, load config,
compile and prepare the dataflow (cluster shape included), then (``--connect-timeout``) reach every
Kafka broker the plan uses from where the job runs, then exit. A running job is not touched.

``python -m loom_dagster.core.launchers.preflight --import-path M:A --config F [...] --environment E
[--processes N --workers-per-process W] [--sys-path D] [--connect-timeout S]``; exit 0 when the job
would start, 2 (with the reason after :data:`MARKER` on stderr) when it would not.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from loom_dagster.core.deploy.launch_records import LaunchRequest
from loom_dagster.core.job.failure import MAX_REASON_CHARS, clip
from loom_dagster.core.redact import redact_text

MARKER = "preflight failed: "


def failure_detail(output: str, limit: int = MAX_REASON_CHARS) -> str:
    """What a failed preflight printed after :data:`MARKER` (else all of it), redacted, then capped
    at *limit* characters keeping head and tail (the remedy is usually last)."""
    marker = output.rfind(MARKER)
    detail = output[marker + len(MARKER) :] if marker >= 0 else output
    return clip(redact_text(detail.strip()), limit)


def describe_failure(exc: BaseException, flow_label: str) -> str:
    """The failure in one block: loom's issues one per line (code, component, message), else the error."""
    issues = getattr(exc, "issues", None)
    if issues:
        from loom_dagster.core.flows.compile import render_compilation_error

        return render_compilation_error(flow_label, exc)
    return f"{type(exc).__name__}: {redact_text(str(exc))}"


def preflight_args(
    request: LaunchRequest, *, sys_path: bool = True, connect_timeout_s: float = 0
) -> list[str]:
    """The module's arguments for *request* (after ``python``): the same import, config files,
    environment and cluster shape the job gets; *sys_path* adds the request's ``sys_path`` entries."""
    args = ["-m", "loom_dagster.core.launchers.preflight", "--import-path", request.import_path]
    for config in request.config_files:
        args += ["--config", config]
    args += ["--environment", request.environment, "--processes", str(request.processes)]
    args += ["--workers-per-process", str(request.workers_per_process)]
    for entry in request.sys_path if sys_path else ():
        args += ["--sys-path", entry]
    if connect_timeout_s > 0:
        args += ["--connect-timeout", f"{connect_timeout_s:g}"]
    return args


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loom_dagster.core.launchers.preflight")
    parser.add_argument("--import-path", required=True)
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--environment", required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--workers-per-process", type=int, default=1)
    parser.add_argument("--sys-path", action="append", default=[])
    parser.add_argument("--connect-timeout", type=float, default=0.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when the flow imports, compiles and prepares; else print the reason and exit 2."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    for entry in reversed(args.sys_path):
        sys.path.insert(0, entry)
    try:
        _check(args)
    except Exception as exc:
        print(f"{MARKER}{describe_failure(exc, args.import_path)}", file=sys.stderr)
        return 2
    print("preflight ok")
    return 0


def _check(args: argparse.Namespace) -> None:
    from loom.streaming.bytewax import StreamingRunner
    from loom.streaming.bytewax.runner import BytewaxRuntimeConfig

    from loom_dagster.core.flows.compile import compile_plan
    from loom_dagster.core.flows.loading import import_flow, load_config

    flow = import_flow(args.import_path)
    config = load_config(args.config, args.environment)
    plan = compile_plan(flow, config)
    runner = StreamingRunner.from_context(flow, config=config, environment=args.environment)
    addresses = tuple(f"127.0.0.1:{20000 + i}" for i in range(args.processes)) if args.processes > 1 else None
    runtime = BytewaxRuntimeConfig(
        workers_per_process=args.workers_per_process,
        process_id=0 if addresses else None,
        addresses=addresses,
    )
    from loom.core.runner import shutdown_runner

    try:
        runner.prepare_run(runtime=runtime)
    finally:
        shutdown_runner(runner)
    if args.connect_timeout > 0:
        _connect(plan, args.connect_timeout)


def _connect(plan: Any, timeout_s: float) -> None:
    """Every Kafka cluster of the plan answers from here, and every broker it advertises accepts a
    connection (a broker advertising an address this host cannot reach fails the job only later)."""
    from loom_dagster.core.kafka.cluster import cluster_for, unreachable_brokers

    sinks = [*plan.terminal_sinks.values(), *plan.error_routes.values()]
    settings = [getattr(plan.source, "settings", None), *(getattr(sink, "settings", None) for sink in sinks)]
    clusters = {cluster_for(s) for s in settings if s is not None and getattr(s, "brokers", None)}
    problems = [p for p in (unreachable_brokers(c, timeout_s) for c in clusters) if p]
    if problems:
        raise ConnectionError("Kafka is not reachable from where the job runs: " + "; ".join(problems))


if __name__ == "__main__":
    sys.exit(main())
