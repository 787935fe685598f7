"""``LocalProcessLauncher``: runs a flow's job as detached processes on this host (the default).

A recorded process is signalled only once ``/proc`` shows it is this flow's runtime as launched: the
same start time, the same boot (the boot id recorded at launch), a command line ``python -m
loom_dagster.runtime ... --flow-name <flow>`` and this user as its owner (:func:`check_process`);
anything else is refused, naming what did not match. The job's process group is signalled only when
that verified process leads it. Orphan detection (:func:`scan_runtime_processes`) sees only this
user's runtime processes.

A relaunch (restart, rollback, rewind) starts the record's request again (import path, config snapshot,
sys.path, cwd, env read back from its 0600 file), unsealed (``Launcher.verify_record`` checks nothing
here): the records live in the private state directory (0700, owned by this user, refused otherwise),
beside the installation's key, so whoever can edit a record can run code as this user anyway and could
re-seal it too; the Kubernetes launcher, whose records anyone allowed to write ConfigMaps may edit, seals
them.

A job serves its HTTP probes only where its own environment asks for it: the daemon's
``LOOM_DAGSTER_HTTP_PORT`` is not inherited (one port cannot serve every job of the host), and a
local job binds loopback (``127.0.0.1``) unless its request sets ``LOOM_DAGSTER_HTTP_HOST``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loom_dagster.core import procfs
from loom_dagster.core.deploy.launch_records import (
    JobProcess,
    JobReport,
    JobState,
    LaunchedJob,
    LaunchRequest,
    RuntimeProcess,
)
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.job.failure import MAX_REASON_CHARS, clip
from loom_dagster.core.job.logs import (
    DEFAULT_LOG_MAX_BYTES,
    DEFAULT_LOG_MAX_FILES,
    LogSettings,
    follow_lines,
    read_tail,
)
from loom_dagster.core.job.status import FINAL_STATES, JobStatus, describe_exit_code, read_status
from loom_dagster.core.launchers.base import Launcher
from loom_dagster.core.launchers.preflight import failure_detail, preflight_args
from loom_dagster.core.redact import redact_text

DEFAULT_HEARTBEAT_TIMEOUT_S = 30.0
RUNTIME_MODULE = "loom_dagster.runtime"
HTTP_PORT_ENV = "LOOM_DAGSTER_HTTP_PORT"  # loom_dagster.runtime.args.HTTP_PORT_ENV (no runtime import here)
HTTP_HOST_ENV = "LOOM_DAGSTER_HTTP_HOST"  # loom_dagster.runtime.args.HTTP_HOST_ENV
LOCAL_HTTP_HOST = "127.0.0.1"


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
        boot = launch_boot_id(job)
        alive = [p for p in job.processes if check_process(p, job.flow_name, boot).ours]
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
        """Every live ``python -m loom_dagster.runtime`` process of this user on this host, from ``/proc``."""
        return scan_runtime_processes()

    def launch(self, request: LaunchRequest, log_dir: str) -> LaunchedJob:
        """Start every process of the job and return their PIDs and start times."""
        from loom_dagster.core.deploy.store import open_private, private_dir

        request.job_env()  # env values kept elsewhere and not read back: refuse before anything starts
        directory = private_dir(
            Path(log_dir) / time.strftime("%Y%m%dT%H%M%S") / f"{time.time_ns() % 10**9:09d}"
        )
        log_path = directory / "job.log"
        os.close(open_private(log_path, os.O_WRONLY))  # 0600 before the job appends to it
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
                with contextlib.suppress(DeploymentError):
                    _signal(proc, signal.SIGKILL, request.flow_name, None)
            raise
        boot = procfs.boot_id()
        return LaunchedJob(
            flow_name=request.flow_name,
            launcher=self.name,
            host=socket.gethostname(),
            processes=tuple(procs),
            log_path=str(log_path),
            started_at=started_at,
            request=request,
            extra={"addresses": list(addresses), **({"boot_id": boot} if boot else {})},
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
        own = request.job_env()
        env = {**os.environ, **own}
        http_env(env, own)
        env["PYTHONPATH"] = os.pathsep.join([*request.sys_path, env.get("PYTHONPATH", "")]).strip(os.pathsep)
        # the runtime rotates job.log itself; what it prints before that is appended to job.log here
        env.update(LogSettings(log_path, self.log_max_bytes, self.log_max_files).env())
        payload = json.dumps({"argv": argv, "log_path": str(log_path), "cwd": request.cwd})
        helper = subprocess.run(
            [self.python, "-m", "loom_dagster.core.launchers._detach"],
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
        boot = launch_boot_id(job)
        for proc in job.processes:
            check = check_process(proc, job.flow_name, boot)
            running = check.ours
            alive += running
            status = read_status(Path(proc.status_path)) if proc.status_path else None
            if status is not None:
                statuses.append(status.to_dict())
                connected += status.connected
            if check.mismatch:
                problems.append(
                    f"process {proc.process_id} (pid {proc.pid}) is not running: {check.mismatch} "
                    "(nothing will signal it)"
                )
            elif not running:
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
        """SIGTERM (the runtime drains and flushes), wait up to *timeout_s*, then SIGKILL the rest.

        Every live process is verified first (:func:`check_process`): when one is not this flow's
        runtime of this user, ``DeploymentError`` says what did not match and nothing is signalled."""
        started = time.monotonic()
        boot = launch_boot_id(job)
        checks = [check_process(p, job.flow_name, boot, signalled=True) for p in job.processes]
        refused = [c.mismatch for c in checks if c.mismatch]
        if refused:
            raise DeploymentError(
                f"refusing to signal the job of flow {job.flow_name!r}: {'; '.join(refused)}. "
                "Nothing was signalled."
            )
        for proc in job.processes:
            _signal(proc, signal.SIGTERM, job.flow_name, boot)
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if not any(procfs.is_alive(p.pid, p.start_ticks) for p in job.processes):
                return time.monotonic() - started
            time.sleep(0.05)
        for proc in job.processes:
            _signal(proc, signal.SIGKILL, job.flow_name, boot)
        while any(procfs.is_alive(p.pid, p.start_ticks) for p in job.processes):
            if time.monotonic() > deadline + 10:
                raise DeploymentError(f"job of flow {job.flow_name!r} survived SIGKILL")
            time.sleep(0.05)
        return time.monotonic() - started

    def preflight(self, request: LaunchRequest, timeout_s: float) -> str:
        """Import + compile + prepare the new version in a fresh process with the job's environment."""
        argv = [self.python, *preflight_args(request)]
        env = {**os.environ, **request.job_env()}
        started = time.monotonic()
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
        took = time.monotonic() - started
        return f"the new version imports, compiles and prepares in a fresh local process ({took:.1f} s)"


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


@dataclass(frozen=True)
class ProcessCheck:
    """What ``/proc`` says about a recorded job process.

    ``alive``: a process with the recorded pid and start time runs; ``mismatch``: it runs, but is not
    this flow's runtime as launched (or, when checked for a signal, not this user's), in words."""

    alive: bool
    mismatch: str | None = None

    @property
    def ours(self) -> bool:
        """The recorded process runs and is the flow's runtime."""
        return self.alive and self.mismatch is None


def launch_boot_id(job: LaunchedJob) -> str | None:
    """The boot id recorded when *job* was launched (``None`` in older records)."""
    value = (job.extra or {}).get("boot_id")
    return str(value) if value else None


def check_process(
    proc: JobProcess, flow_name: str, boot_id: str | None, *, signalled: bool = False
) -> ProcessCheck:
    """Whether *proc* still is the runtime of *flow_name* that was launched: same start time, same boot
    (when *boot_id* was recorded), command line ``-m loom_dagster.runtime ... --flow-name <flow>`` and,
    when *signalled*, run by this user (real and effective uid).

    Example:
        >>> check_process(JobProcess(pid=os.getpid(), start_ticks=1), "f", None)
        ProcessCheck(alive=False, mismatch=None)
    """
    stat = procfs.read_stat(proc.pid)
    if stat is None or stat.state in ("Z", "X", "x") or stat.start_ticks != proc.start_ticks:
        return ProcessCheck(False)
    now = procfs.boot_id()
    if boot_id and now and boot_id != now:
        return ProcessCheck(
            True,
            f"pid {proc.pid} is another process: the host rebooted since the job was launched "
            f"(boot id {boot_id}, now {now})",
        )
    why = runtime_mismatch(procfs.cmdline(proc.pid), flow_name)
    if why is not None:
        return ProcessCheck(True, f"pid {proc.pid} {why}")
    if signalled:
        owner = procfs.owner(proc.pid)
        if owner is None:
            return ProcessCheck(True, f"the owner of pid {proc.pid} cannot be read from /proc")
        if not owner.is_us():
            return ProcessCheck(
                True,
                f"pid {proc.pid} runs as {owner.describe()}, not as uid {os.geteuid()} (this user): stop it "
                "as the user that runs it",
            )
    return ProcessCheck(True)


def runtime_mismatch(argv: Sequence[str], flow_name: str) -> str | None:
    """Why *argv* is not ``python -m loom_dagster.runtime ... --flow-name <flow_name>`` (``None``: it is).

    Example:
        >>> runtime_mismatch(["python", "-m", "loom_dagster.runtime", "--flow-name", "f"], "f") is None
        True
        >>> runtime_mismatch(["sleep", "1000"], "f")
        "is not a loom-dagster runtime: its command line is 'sleep 1000', not 'python -m loom_dagster.runtime ... --flow-name f'"
    """
    expected = f"python -m {RUNTIME_MODULE} ... --flow-name {flow_name}"
    if not argv:
        return f"has no readable command line, not {expected!r}"
    if not _is_runtime_argv(argv):
        shown = redact_text(shlex.join(argv))
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        return f"is not a loom-dagster runtime: its command line is {shown!r}, not {expected!r}"
    name = _arg(argv, "--flow-name")
    if name != flow_name:
        return f"is the runtime of flow {name!r}, not of flow {flow_name!r}"
    return None


def _is_runtime_argv(argv: Sequence[str]) -> bool:
    return "-m" in argv and RUNTIME_MODULE in argv and argv.index(RUNTIME_MODULE) == argv.index("-m") + 1


def _signal(proc: JobProcess, sig: signal.Signals, flow_name: str, boot_id: str | None) -> None:
    """Signal a job process only if it is still the runtime of *flow_name* we started, run by this user
    (:func:`check_process`); its process group only when it leads that group. A process that is gone
    is left alone; one that is not ours is refused (``DeploymentError``, nothing signalled)."""
    check = check_process(proc, flow_name, boot_id, signalled=True)
    if not check.alive:
        return
    if check.mismatch:
        raise DeploymentError(
            f"refusing to signal pid {proc.pid} of flow {flow_name!r}: {check.mismatch}. Nothing was signalled."
        )
    stat = procfs.read_stat(proc.pid)
    try:
        if stat is not None and stat.pgid == proc.pid:
            os.killpg(proc.pid, sig)  # the verified runtime leads its group (its own session)
        else:
            os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        raise DeploymentError(
            f"not permitted to signal pid {proc.pid} of flow {flow_name!r} ({exc.strerror}): run this as "
            "the user that runs the job"
        ) from exc


def http_env(env: dict[str, str], own: Mapping[str, str]) -> None:
    """The job's HTTP settings in its environment *env* (edited in place): the port only where the
    flow's own env (*own*: ``LoomFlowSpec.env``) sets it, never inherited from this process (every
    local job would try the same port), bound to loopback unless *own* sets ``LOOM_DAGSTER_HTTP_HOST``.

    Example:
        >>> env = {"LOOM_DAGSTER_HTTP_PORT": "8080", "PATH": "/bin"}
        >>> http_env(env, {})
        >>> env
        {'PATH': '/bin', 'LOOM_DAGSTER_HTTP_HOST': '127.0.0.1'}
    """
    for name in (HTTP_PORT_ENV, HTTP_HOST_ENV):
        if name in own:
            env[name] = own[name]
        else:
            env.pop(name, None)
    env.setdefault(HTTP_HOST_ENV, LOCAL_HTTP_HOST)


def scan_runtime_processes() -> list[RuntimeProcess]:
    """Every live ``loom_dagster.runtime`` process of this user on this host (pid, start ticks, flow,
    status file); another user's are not ours to report or stop."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        process = runtime_process(int(entry.name))
        if process is not None:
            found.append(process)
    return found


def runtime_process(pid: int) -> RuntimeProcess | None:
    """*pid* as a runtime process of this user on this host, or ``None`` (gone, a zombie, another
    program, another user's)."""
    argv = procfs.cmdline(pid)
    if not _is_runtime_argv(argv):
        return None
    stat = procfs.read_stat(pid)
    if stat is None or stat.state in ("Z", "X", "x"):
        return None
    owner = procfs.owner(pid)
    if owner is None or not owner.is_us():
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
    :data:`~loom_dagster.core.job.failure.MAX_REASON_CHARS`."""
    data, cut = read_tail(path, window_bytes)
    kept = data.decode(errors="replace").splitlines()
    if cut and kept:
        kept = kept[1:]  # the first line is partial: a secret cut in two would not be recognized
    if lines <= 0:
        return ""
    return "\n".join(clip(redact_text(line), max_line_chars) for line in kept[-lines:])
