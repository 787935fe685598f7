"""Run one loom streaming flow as a long-lived job: load, compile, run, drain, report.

How a job ends, and what a launcher sees (exit code / final status record):

- bad import path, bad config, compile or deploy-check error, a step whose ``__init__`` raises
  (loom instantiates steps at compile time): exit 2, record ``failed`` with the reason. The record
  is written first thing, so a launcher always finds one unless the arguments themselves are bad
  (argparse error: exit 2, one stderr line, no record);
- the dataflow fails before its first poll (unreachable broker: ~10 s, loom's metadata timeout), or
  the HTTP probes cannot be served (``--http-port`` taken: a restart may find it free): exit 3,
  record ``failed``, ``connected_at`` null;
- it fails after connecting: exit 1; a signal: drain, final offset commit, exit 0, ``stopped``;
- another job consumes the same consumer group (it holds the group's fence, see
  ``loom_dagster.core.checks.fence``): exit 5 before the dataflow starts, the reason naming that job (host, pid,
  flow); a job that loses its fence while running drains and exits 5 too.

A Kafka-sourced job takes the fence after compiling and before its dataflow starts (process 0 of a
cluster takes it for the whole cluster), and releases it after the final offset commit.

A job that dies because a sink write (a table flush) raised says so: its final ``error`` starts with
``sink '<name>' failed to write: `` and the record's ``sink_error`` keeps the full (redacted) text.

A health gate should wait for ``connected_at`` (or a final state); later, ``last_poll_at`` stops
advancing when the dataflow stalls (e.g. a cluster peer is gone) even though heartbeats go on.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from loom_dagster.core.job.failure import exception_chain, interrupted, one_line_reason
from loom_dagster.core.job.status import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_HEARTBEAT_S,
    EXIT_BAD_INPUT,
    EXIT_FENCED,
    EXIT_FLOW_FAILED,
    EXIT_STARTUP_FAILED,
    EXIT_STOPPED,
    STATE_FAILED,
    STATE_STOPPED,
    JobStatus,
    describe_exit_code,
)
from loom_dagster.core.redact import redact_text as redact
from loom_dagster.runtime.observer import StatusObserver
from loom_dagster.runtime.reporter import StatusReporter
from loom_dagster.runtime.signals import StopSignals

if TYPE_CHECKING:
    from loom_dagster.core.checks.fence import JobFence
    from loom_dagster.runtime.http_server import ProbeServer

log = logging.getLogger("loom_dagster.runtime")
DEFAULT_FENCE_TIMEOUT_S = 30.0
"""How long a starting job waits for its consumer group's fence (a SIGKILLed holder frees it in ~10 s)."""
T = TypeVar("T")


@dataclass(frozen=True)
class JobOptions:
    """Everything ``python -m loom_dagster.runtime`` was asked to do (no secrets in here)."""

    import_path: str
    configs: tuple[str, ...]
    status_file: Path
    environment: str | None = None
    flow_name: str | None = None
    sys_paths: tuple[str, ...] = ()
    process_id: int | None = None
    addresses: tuple[str, ...] | None = None
    workers_per_process: int | None = None
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    final_commit: bool = True
    drain_timeout_s: float | None = DEFAULT_DRAIN_TIMEOUT_S
    run_id: str | None = None
    fence: bool = True
    fence_timeout_s: float = DEFAULT_FENCE_TIMEOUT_S
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    live_timeout_s: float | None = None


@dataclass(frozen=True)
class Outcome:
    """How the job ended: exit code and, when it failed, a one-line reason."""

    code: int
    reason: str | None = None


class _Refused(Exception):
    """The flow cannot start as given (import, config, compile): exit ``EXIT_BAD_INPUT``."""


class _NotServing(Exception):
    """The HTTP probes could not be served (the port is taken): exit ``EXIT_STARTUP_FAILED``, retryable."""


class _NoFence(Exception):
    """The consumer group's fence was not acquired: the job must not start (``outcome`` says how)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


@dataclass
class _Prepared:
    runner: Any
    runtime: Any


def run_job(options: JobOptions) -> int:
    """Run the job until it is stopped or fails; return the process exit code."""
    try:
        reporter = _new_reporter(options)
    except OSError as exc:
        log.error("exit %d: cannot write status file %s: %s", EXIT_BAD_INPUT, options.status_file, exc)
        return EXIT_BAD_INPUT
    signals = StopSignals(reporter.request_stop)
    signals.install()
    reporter.start()
    probes: ProbeServer | None = None
    try:
        probes = _serve_probes(options, reporter)
        outcome = _execute(options, reporter, signals)
    except _Refused as exc:
        outcome = Outcome(EXIT_BAD_INPUT, str(exc))
    except _NotServing as exc:
        outcome = Outcome(EXIT_STARTUP_FAILED, f"failed before its first poll: {exc}")
    except KeyboardInterrupt:
        outcome = Outcome(EXIT_STOPPED)
    finally:
        signals.disarm()
    _finish(reporter, outcome)
    if probes is not None:
        probes.stop()
    return outcome.code


def _serve_probes(options: JobOptions, reporter: StatusReporter) -> ProbeServer | None:
    """Serve ``/readyz /livez /status /metrics`` (``--http-port``) before the slow import and compile;
    ``_NotServing`` when the address cannot be bound (retryable), ``_Refused`` when the host is unknown."""
    if options.http_port is None:
        return None
    from loom_dagster.runtime.http_server import LIVE_TIMEOUT_HEARTBEATS, ProbeServer, reporter_source

    live_timeout_s = options.live_timeout_s or LIVE_TIMEOUT_HEARTBEATS * options.heartbeat_s
    server = ProbeServer(
        reporter_source(reporter),
        host=options.http_host,
        port=options.http_port,
        live_timeout_s=live_timeout_s,
    )
    try:
        server.start()
    except socket.gaierror as exc:  # a host name that does not resolve: the arguments are wrong
        raise _Refused(f"cannot serve HTTP on {options.http_host}:{options.http_port}: {exc}") from exc
    except OSError as exc:  # a port taken now may be free at the next start: not bad input
        raise _NotServing(f"cannot serve HTTP on {options.http_host}:{options.http_port}: {exc}") from exc
    log.info("serving /readyz /livez /status /metrics on %s (live timeout %gs)", server.url, live_timeout_s)
    return server


def _new_reporter(options: JobOptions) -> StatusReporter:
    """Create the status file's directory and write the first ``starting`` record."""
    options.status_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = options.flow_name or options.import_path.rpartition(":")[2] or options.import_path
    status = JobStatus(flow=name, pid=os.getpid(), host=socket.gethostname(), process_id=options.process_id)
    reporter = StatusReporter(
        options.status_file, status, interval_s=options.heartbeat_s, drain_timeout_s=options.drain_timeout_s
    )
    reporter.write()
    return reporter


def _execute(options: JobOptions, reporter: StatusReporter, signals: StopSignals) -> Outcome:
    try:
        prepared = _prepare(options, reporter)
    except _Refused as exc:
        return Outcome(EXIT_BAD_INPUT, str(exc))
    try:
        fence = _acquire_fence(options, prepared, reporter)
    except _NoFence as exc:
        return exc.outcome
    try:
        outcome = _run(prepared, reporter, signals)
        if outcome.code == EXIT_STOPPED and options.final_commit:
            from loom_dagster.runtime.final_commit import final_commit

            final_commit(prepared.runner)
    finally:
        if fence is not None:
            fence.release()  # after the final commit: the next job starts from committed offsets
    if (
        fence is not None
        and fence.lost_reason is not None
        and outcome.code in (EXIT_STOPPED, EXIT_FLOW_FAILED)
    ):
        return Outcome(EXIT_FENCED, fence.lost_reason)
    return outcome


def _acquire_fence(options: JobOptions, prepared: _Prepared, reporter: StatusReporter) -> JobFence | None:
    """Take the consumer group's fence before the dataflow starts (Kafka sources, process 0 only)."""
    settings = getattr(getattr(getattr(prepared.runner, "_plan", None), "source", None), "settings", None)
    group = getattr(settings, "group_id", None)
    if (
        not options.fence
        or options.process_id not in (None, 0)
        or not group
        or not hasattr(settings, "brokers")
    ):
        return None
    from loom_dagster.core.checks.fence import FenceError, FenceIdentity, fence_for

    flow = reporter.snapshot().flow
    fence = fence_for(settings, group, FenceIdentity.of_this_process(flow, options.run_id), _stop_on_lost)
    try:
        seconds = fence.acquire(options.fence_timeout_s)
    except FenceError as exc:
        codes = {"held": EXIT_FENCED, "config": EXIT_BAD_INPUT}
        code = codes.get(exc.kind, EXIT_STARTUP_FAILED)
        reason = str(exc) if code != EXIT_STARTUP_FAILED else f"failed before its first poll: {exc}"
        raise _NoFence(Outcome(code, reason)) from exc
    log.info("holding the fence %r of consumer group %r (took %.2fs)", fence.group, group, seconds)
    return fence


def _stop_on_lost(reason: str) -> None:
    """The fence is lost: stop the dataflow through the SIGTERM path (drain, final commit)."""
    log.error("%s", reason)
    os.kill(os.getpid(), signal.SIGTERM)


def _step(label: str, action: Callable[[], T]) -> T:
    """Run one preparation step; any error becomes ``_Refused`` with ``label`` in front."""
    try:
        return action()
    except (KeyboardInterrupt, _Refused):
        raise
    except BaseException as exc:  # SystemExit from a module, pyo3 panics: still a refusal
        raise _Refused(f"{label}: {one_line_reason(exc)}") from exc


def _prepare(options: JobOptions, reporter: StatusReporter) -> _Prepared:
    """Import, load config, compile: everything that can fail before the dataflow is started."""
    from loom_dagster.core.flows.job_config import runtime_config
    from loom_dagster.core.flows.loading import (
        ensure_on_path,
        import_flow,
        load_config,
        resolve_environment_name,
    )
    from loom_dagster.runtime.build import build_observability, build_runner
    from loom_dagster.runtime.probe import install_poll_probe

    for directory in options.sys_paths:
        ensure_on_path(directory)
    flow = _step("cannot load flow", lambda: import_flow(options.import_path))
    name = options.flow_name or flow.name
    reporter.set_flow(name)
    environment = _step("invalid environment", lambda: resolve_environment_name(options.environment))
    config = _step(f"cannot load config of flow {name!r}", lambda: load_config(options.configs, environment))
    observer = StatusObserver()
    observability = _step(
        "invalid observability config", lambda: build_observability(config, environment, observer)
    )
    runner = _step(
        f"cannot compile flow {name!r}", lambda: build_runner(flow, config, environment, observability)
    )
    runtime = _step(
        "invalid streaming.runtime",
        lambda: runtime_config(
            config,
            process_id=options.process_id,
            addresses=options.addresses,
            workers_per_process=options.workers_per_process,
        ),
    )
    reporter.attach(observer, install_poll_probe())
    if options.final_commit:
        from loom_dagster.runtime.final_commit import install_tracker_registry

        install_tracker_registry()
    return _Prepared(runner=runner, runtime=runtime)


def _run(prepared: _Prepared, reporter: StatusReporter, signals: StopSignals) -> Outcome:
    """Run the dataflow (blocking) and classify how it ended."""
    try:
        prepared.runner.run(runtime=prepared.runtime)
    except KeyboardInterrupt:
        return Outcome(EXIT_STOPPED)
    except BaseException as exc:  # bytewax panics arrive as pyo3 PanicException, a BaseException
        return _classify_failure(exc, reporter)
    finally:
        signals.disarm()
    return Outcome(EXIT_STOPPED)


def _classify_failure(exc: BaseException, reporter: StatusReporter) -> Outcome:
    """Exit code and reason of a run that raised."""
    from loom_dagster.runtime.build import is_runtime_configuration_error

    if reporter.stop_requested is not None and interrupted(exc):
        return Outcome(EXIT_STOPPED)
    reason = one_line_reason(exc)
    sink = _failed_sink(exc, reporter)
    if sink is not None:
        reason = f"sink {sink!r} failed to write: {reason}"
    if is_runtime_configuration_error(exc):
        return Outcome(EXIT_BAD_INPUT, f"runtime settings refused: {reason}")
    if reporter.stop_requested is not None:
        return Outcome(EXIT_FLOW_FAILED, f"failed while draining after {reporter.stop_requested}: {reason}")
    if not reporter.connected:
        return Outcome(EXIT_STARTUP_FAILED, f"failed before its first poll: {reason}")
    return Outcome(EXIT_FLOW_FAILED, f"failed at run time: {reason}")


def _failed_sink(exc: BaseException, reporter: StatusReporter) -> str | None:
    """The sink whose failed write raised ``exc`` (its unrecovered error text is in the chain)."""
    error = reporter.snapshot().sink_error
    if error is None or not error.active:
        return None
    recorded = error.error.strip().splitlines()[0] if error.error.strip() else ""
    if not recorded:
        return None
    for item in exception_chain(exc):
        first = redact(str(item).strip()).splitlines()
        if first and (first[0] in recorded or recorded in str(item)):
            return error.sink
    return None


def _finish(reporter: StatusReporter, outcome: Outcome) -> None:
    """Write the final record (fsync'd), stop the heartbeat, log one line."""
    if outcome.code == EXIT_STOPPED:
        reporter.set_state(STATE_STOPPED, exit_code=outcome.code)
    else:
        reporter.set_state(STATE_FAILED, exit_code=outcome.code, error=outcome.reason)
    reporter.stop()
    flow = reporter.snapshot().flow
    if outcome.code == EXIT_STOPPED:
        cause = reporter.stop_requested or "the dataflow ended by itself"
        log.info("flow %r stopped (%s); exit %d", flow, cause, outcome.code)
    else:
        log.error(
            "flow %r exit %d (%s): %s",
            flow,
            outcome.code,
            describe_exit_code(outcome.code),
            redact(outcome.reason or "no reason recorded"),
        )
