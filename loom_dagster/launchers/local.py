"""``LocalProcessLauncher``: runs a flow's job as detached processes on this host (the default)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from loom_dagster.errors import DeploymentError
from loom_dagster.launchers import procfs
from loom_dagster.launchers.base import (
    JobProcess,
    JobReport,
    JobState,
    LaunchedJob,
    Launcher,
    LaunchRequest,
    RuntimeProcess,
)
from loom_dagster.launchers.preflight import failure_detail
from loom_dagster.redact import redact_text
from loom_dagster.runtime.failure import MAX_REASON_CHARS, clip
from loom_dagster.runtime.logs import (
    DEFAULT_LOG_MAX_BYTES,
    DEFAULT_LOG_MAX_FILES,
    LogSettings,
    follow_lines,
    read_tail,
)
from loom_dagster.runtime.status import FINAL_STATES, JobStatus, describe_exit_code, read_status

DEFAULT_HEARTBEAT_TIMEOUT_S = 30.0
RUNTIME_MODULE = "loom_dagster.runtime"


class LocalProcessLauncher(Launcher):
    """Starts the job as ``python -m loom_dagster.runtime`` processes detached from the caller.

    Each process gets its own session (double spawn, stdin from /dev/null, output appended to a log
    file), so it survives the end of the Dagster run and a Ctrl-C of ``dagster dev``. With
    ``processes > 1`` the processes form a Bytewax cluster on loopback ports.

    Example:
        >>> launcher = LocalProcessLauncher(python="/usr/bin/python3")
        >>> launcher.name
        'local'
    """

    name = "local"

    def __init__(
        self,
        python: str | None = None,
        heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
        log_max_bytes: int = DEFAULT_LOG_MAX_BYTES,
        log_max_files: int = DEFAULT_LOG_MAX_FILES,
    ):
        self.python = python or sys.executable
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.log_max_bytes = log_max_bytes  # job.log rotates at this size ...
        self.log_max_files = log_max_files  # ... keeping this many files (job.log included)

    def config(self) -> dict[str, Any]:
        """The keyword arguments that build this launcher again (recorded with each deployment)."""
        return {
            "python": self.python,
            "heartbeat_timeout_s": self.heartbeat_timeout_s,
            "log_max_bytes": self.log_max_bytes,
            "log_max_files": self.log_max_files,
        }

    def owns(self, job: LaunchedJob) -> bool:
        """True when the job runs on this host: only here can its processes be read and signalled."""
        return job.host == socket.gethostname()

    def location(self) -> str:
        """``host '<this host>'``."""
        return f"host {socket.gethostname()!r}"

    def uptime(self, job: LaunchedJob) -> float | None:
        """Seconds since the youngest live process started, from ``/proc``."""
        alive = [p for p in job.processes if procfs.is_alive(p.pid, p.start_ticks)]
        uptimes = [procfs.uptime_seconds(p.pid) for p in alive]
        if not uptimes or None in uptimes:
            return None
        return min(u for u in uptimes if u is not None)

    def logs(self, job: LaunchedJob, lines: int = 40) -> str:
        """The tail of ``job.log`` (across its rotated files), redacted."""
        return log_tail(job.log_path, lines, window_bytes=max(256 * 1024, lines * 2048))

    def follow_logs(self, job: LaunchedJob) -> Iterator[str]:
        """Lines appended to ``job.log`` from now on (opened now), across rotations, redacted."""
        return follow_lines(job.log_path)

    def runtime_processes(self) -> list[RuntimeProcess]:
        """Every live ``python -m loom_dagster.runtime`` process of this host, from ``/proc``."""
        return scan_runtime_processes()

    def launch(self, request: LaunchRequest, log_dir: str) -> LaunchedJob:
        """Start every process of the job and return their PIDs and start times."""
        directory = Path(log_dir) / time.strftime("%Y%m%dT%H%M%S") / f"{time.time_ns() % 10**9:09d}"
        directory.mkdir(parents=True, exist_ok=True)
        log_path = directory / "job.log"
        addresses = _cluster_addresses(request.processes)
        started_at = time.time()
        procs: list[JobProcess] = []
        try:
            for process_id in range(request.processes):
                status_path = directory / f"status-{process_id}.json"
                status_path.unlink(missing_ok=True)
                argv = self.job_argv(request, str(status_path), process_id, addresses)
                pid = self._spawn_detached(argv, log_path, request)
                ticks = procfs.start_ticks(pid)
                procs.append(JobProcess(pid, ticks or 0, process_id, str(status_path), tuple(argv)))
        except Exception:
            for proc in procs:
                _signal(proc, signal.SIGKILL)
            raise
        return LaunchedJob(
            flow_name=request.flow_name,
            launcher=self.name,
            host=socket.gethostname(),
            processes=tuple(procs),
            log_path=str(log_path),
            started_at=started_at,
            request=request,
            extra={"addresses": list(addresses)},
        )

    def job_argv(
        self, request: LaunchRequest, status_path: str, process_id: int, addresses: tuple[str, ...]
    ) -> list[str]:
        """The job's command line: import path, config files, environment; never a secret."""
        argv = [self.python, "-m", "loom_dagster.runtime", "--import-path", request.import_path]
        for config in request.config_files:
            argv += ["--config", config]
        argv += ["--environment", request.environment, "--status-file", status_path]
        argv += ["--flow-name", request.flow_name]
        if request.run_id:
            argv += ["--run-id", request.run_id]  # names the job in its consumer-group fence
        for entry in request.sys_path:
            argv += ["--sys-path", entry]
        if request.processes > 1 or request.workers_per_process > 1:
            argv += ["--workers-per-process", str(request.workers_per_process)]
        if addresses:
            argv += ["--process-id", str(process_id), "--addresses", ",".join(addresses)]
        return argv

    def _spawn_detached(self, argv: list[str], log_path: Path, request: LaunchRequest) -> int:
        env = {**os.environ, **dict(request.env)}
        env["PYTHONPATH"] = os.pathsep.join([*request.sys_path, env.get("PYTHONPATH", "")]).strip(os.pathsep)
        # the runtime rotates job.log itself; what it prints before that is appended to job.log here
        env.update(LogSettings(log_path, self.log_max_bytes, self.log_max_files).env())
        payload = json.dumps({"argv": argv, "log_path": str(log_path), "cwd": request.cwd})
        helper = subprocess.run(
            [self.python, "-m", "loom_dagster.launchers._detach"],
            input=payload,
            capture_output=True,
            text=True,
            env=env,
            cwd=request.cwd or None,
            start_new_session=True,
            timeout=60,
        )
        if helper.returncode != 0 or not helper.stdout.strip().isdigit():
            raise DeploymentError(
                f"could not start the job of flow {request.flow_name!r}: {redact_text(helper.stderr.strip())}"
            )
        return int(helper.stdout.strip())

    def report(self, job: LaunchedJob) -> JobReport:
        """Alive? connected? heartbeat fresh? from ``/proc`` and each process's status record."""
        statuses = []
        alive = 0
        problems: list[str] = []
        connected = 0
        for proc in job.processes:
            running = procfs.is_alive(proc.pid, proc.start_ticks)
            alive += running
            status = read_status(Path(proc.status_path)) if proc.status_path else None
            if status is not None:
                statuses.append(status.to_dict())
                connected += status.connected
            if not running:
                problems.append(f"process {proc.process_id} (pid {proc.pid}) {_how_it_ended(status)}")
            elif status is not None and status.is_stale(self.heartbeat_timeout_s):
                problems.append(
                    f"process {proc.process_id} (pid {proc.pid}) has not written a heartbeat for "
                    f"{status.heartbeat_age() or 0:.0f}s"
                )
        total = len(job.processes)
        if alive < total:
            state = JobState.DEAD
        elif problems:
            state = JobState.HUNG
        elif connected == total:
            state = JobState.HEALTHY
        else:
            state = JobState.STARTING
        reason = "; ".join(problems) or f"{alive}/{total} process(es) alive, {connected} connected"
        return JobReport(state=state, reason=reason, alive_processes=alive, statuses=tuple(statuses))

    def stop(self, job: LaunchedJob, timeout_s: float) -> float:
        """SIGTERM (the runtime drains and flushes), wait up to *timeout_s*, then SIGKILL the rest."""
        started = time.monotonic()
        for proc in job.processes:
            _signal(proc, signal.SIGTERM)
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if not any(procfs.is_alive(p.pid, p.start_ticks) for p in job.processes):
                return time.monotonic() - started
            time.sleep(0.05)
        for proc in job.processes:
            _signal(proc, signal.SIGKILL)
        while any(procfs.is_alive(p.pid, p.start_ticks) for p in job.processes):
            if time.monotonic() > deadline + 10:
                raise DeploymentError(f"job of flow {job.flow_name!r} survived SIGKILL")
            time.sleep(0.05)
        return time.monotonic() - started

    def preflight(self, request: LaunchRequest, timeout_s: float) -> None:
        """Import + compile + prepare the new version in a fresh process with the job's environment."""
        argv = [self.python, "-m", "loom_dagster.launchers.preflight", "--import-path", request.import_path]
        for config in request.config_files:
            argv += ["--config", config]
        argv += ["--environment", request.environment, "--processes", str(request.processes)]
        argv += ["--workers-per-process", str(request.workers_per_process)]
        for entry in request.sys_path:
            argv += ["--sys-path", entry]
        env = {**os.environ, **dict(request.env)}
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, env=env, cwd=request.cwd or None, timeout=timeout_s
            )
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(
                f"preflight of flow {request.flow_name!r} took over {timeout_s:.0f}s"
            ) from exc
        if done.returncode != 0:
            raise DeploymentError(
                f"the new version of flow {request.flow_name!r} fails before start (nothing was stopped):\n"
                f"{failure_detail(done.stderr or done.stdout)}"
            )


def _how_it_ended(status: JobStatus | None) -> str:
    """Why a process is gone, in words: its final record, or the absence of one (a kill)."""
    if status is None:
        return "is not running and never wrote a status record (it died at start-up; see the job log)"
    if status.state in FINAL_STATES:
        code = status.exit_code
        meaning = describe_exit_code(code) if code is not None else "no exit code recorded"
        error = f": {status.error}" if status.error else ""
        return f"exited with code {code} ({meaning}){error}"
    age = status.heartbeat_age()
    since = f"; its last heartbeat was {age:.0f}s ago" if age is not None else ""
    return (
        f"died without a final status (killed by a signal, e.g. SIGKILL or the OOM killer, while "
        f"{status.state}){since}"
    )


def _signal(proc: JobProcess, sig: signal.Signals) -> None:
    """Signal a job process only if it is still the process we started (same start time)."""
    if not procfs.is_alive(proc.pid, proc.start_ticks):
        return
    try:
        stat = procfs.read_stat(proc.pid)
        if stat is not None and stat.pgid == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


def scan_runtime_processes() -> list[RuntimeProcess]:
    """Every live ``loom_dagster.runtime`` process of this host (pid, start ticks, flow, status file)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        process = runtime_process(int(entry.name))
        if process is not None:
            found.append(process)
    return found


def runtime_process(pid: int) -> RuntimeProcess | None:
    """*pid* as a runtime process of this host, or ``None`` (gone, a zombie, another program)."""
    argv = procfs.cmdline(pid)
    if "-m" not in argv or RUNTIME_MODULE not in argv or argv.index(RUNTIME_MODULE) != argv.index("-m") + 1:
        return None
    stat = procfs.read_stat(pid)
    if stat is None or stat.state in ("Z", "X", "x"):
        return None
    return RuntimeProcess(
        pid,
        stat.start_ticks,
        _arg(argv, "--flow-name"),
        _arg(argv, "--status-file"),
        _arg(argv, "--run-id"),
        socket.gethostname(),
    )


def _arg(argv: Sequence[str], flag: str) -> str | None:
    for index, item in enumerate(argv):
        if item == flag and index + 1 < len(argv):
            return argv[index + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return None


def _cluster_addresses(processes: int) -> tuple[str, ...]:
    if processes <= 1:
        return ()
    ports = []
    sockets = []
    for _ in range(processes):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return tuple(f"127.0.0.1:{port}" for port in ports)


def log_tail(
    path: str | Path, lines: int = 40, window_bytes: int = 256 * 1024, max_line_chars: int = MAX_REASON_CHARS
) -> str:
    """Last *lines* whole lines of a job log, across its rotated files (``job.log.N`` ... ``job.log``,
    within their last *window_bytes*), secrets redacted, each capped at *max_line_chars* keeping its
    head and tail; empty when missing. A failure reason fits whole: the runtime caps it at the same
    :data:`~loom_dagster.runtime.failure.MAX_REASON_CHARS`."""
    data, cut = read_tail(path, window_bytes)
    kept = data.decode(errors="replace").splitlines()
    if cut and kept:
        kept = kept[1:]  # the first line is partial: a secret cut in two would not be recognized
    if lines <= 0:
        return ""
    return "\n".join(clip(redact_text(line), max_line_chars) for line in kept[-lines:])
