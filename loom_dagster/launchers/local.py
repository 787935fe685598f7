"""``LocalProcessLauncher``: runs a flow's job as detached processes on this host (the default)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from loom_dagster.errors import DeploymentError
from loom_dagster.launchers import procfs
from loom_dagster.launchers.base import JobProcess, JobReport, JobState, LaunchedJob, Launcher, LaunchRequest
from loom_dagster.launchers.preflight import failure_detail
from loom_dagster.redact import redact_text
from loom_dagster.runtime.failure import MAX_REASON_CHARS, clip
from loom_dagster.runtime.status import read_status

DEFAULT_HEARTBEAT_TIMEOUT_S = 30.0


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

    def __init__(self, python: str | None = None, heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S):
        self.python = python or sys.executable
        self.heartbeat_timeout_s = heartbeat_timeout_s

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
                detail = f" ({status.state}, exit {status.exit_code}: {status.error})" if status else ""
                problems.append(f"process {proc.process_id} (pid {proc.pid}) is not running{detail}")
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
    """Last *lines* whole lines of a log file (within its last *window_bytes*), secrets redacted, each
    capped at *max_line_chars* keeping its head and tail; empty when missing. A failure reason fits
    whole: the runtime caps it at the same :data:`~loom_dagster.runtime.failure.MAX_REASON_CHARS`."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            start = max(0, handle.tell() - window_bytes)
            handle.seek(start)
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    kept = text.splitlines()
    if start > 0 and kept:
        kept = kept[1:]  # the first line is partial: a secret cut in two would not be recognized
    if lines <= 0:
        return ""
    return "\n".join(clip(redact_text(line), max_line_chars) for line in kept[-lines:])
