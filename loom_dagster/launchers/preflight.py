"""Preflight of a new version, in a fresh process with the job's environment: import, load config,
compile and prepare the dataflow (cluster shape included), then exit. A running job is not touched.

``python -m loom_dagster.launchers.preflight --import-path M:A --config F [...] --environment E
[--processes N --workers-per-process W] [--sys-path D]``; exit 0 when the job would start.
"""

from __future__ import annotations

import argparse
import sys

from loom_dagster.redact import redact_text
from loom_dagster.runtime.failure import MAX_REASON_CHARS, clip

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
        from loom_dagster.compile import render_compilation_error

        return render_compilation_error(flow_label, exc)
    return f"{type(exc).__name__}: {redact_text(str(exc))}"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loom_dagster.launchers.preflight")
    parser.add_argument("--import-path", required=True)
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--environment", required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--workers-per-process", type=int, default=1)
    parser.add_argument("--sys-path", action="append", default=[])
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

    from loom_dagster.compile import compile_plan
    from loom_dagster.loading import import_flow, load_config

    flow = import_flow(args.import_path)
    config = load_config(args.config, args.environment)
    compile_plan(flow, config)
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


if __name__ == "__main__":
    sys.exit(main())
