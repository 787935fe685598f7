"""Records are data, never code or authority; the job's HTTP server is local and bounded (issue 17).

Against the real runtime, the installed ``loom-dagster`` CLI and a real state directory:

- a record (or ``--launcher``) naming a module that is not a registered launcher imports nothing;
- a record pointing at an unrelated process (``sleep``, leading its own process group) is never
  signalled, and the CLI says why; a record with another boot id is refused too;
- a runtime of another user (uid 65534, started with ``setpriv``) is neither an orphan nor signalled;
- a local job listens on 127.0.0.1 only, does not inherit the daemon's ``LOOM_DAGSTER_HTTP_PORT``,
  keeps its thread count under 200 slow connections (which it cuts off) and answers its probes;
- a port already taken fails the job with a retryable exit (3), which the health sensor restarts.

Every process a test starts is killed by PID in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from loom_dagster.core import procfs
from loom_dagster.core.deploy.launch_records import (
    JobProcess,
    JobState,
    LaunchedJob,
    LauncherRef,
    LaunchRequest,
)
from loom_dagster.core.deploy.store import Deployment, DeploymentStore
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.job.status import EXIT_STARTUP_FAILED, EXIT_STOPPED, read_status
from loom_dagster.core.launchers.local import LocalProcessLauncher
from loom_dagster.core.launchers.registry import launcher_from_ref
from loom_dagster.dev.kafka import KafkaBroker, pick_free_ports
from tests.conftest import make_topics, ticks_config
from tests.support.deploy_env import TICKS, runtime_argv
from tests.support.helpers import ROOT, http_get, run_cli, wait_for

NOBODY = 65534
FLOW = f"sec-ticks-{os.getpid()}"
"""The flow name of every job and record here: unique, so that no ``stop`` here or in another test run
on this host (all as root) takes the other's jobs for orphans of its flow."""


# --------------------------------------------------------------------------- helpers


def record_for(store: DeploymentStore, job: LaunchedJob, launcher: LauncherRef | None = None) -> Deployment:
    """Save a current deployment record of *job* in *store* (as a deploy would) and return it."""
    deployment = Deployment(
        flow_name=job.flow_name,
        job=job,
        plan_hash="p",
        config_hash="c",
        deployed_at=time.time(),
        launcher=launcher or LauncherRef(),
    )
    store.save(deployment)
    return deployment


def job_of(pid: int, flow_name: str = FLOW, **extra: object) -> LaunchedJob:
    """A recorded job whose one process is *pid* (with its real start time)."""
    ticks = procfs.start_ticks(pid)
    assert ticks is not None, f"pid {pid} is gone"
    request = LaunchRequest(flow_name, TICKS, (), "test", "p", "c")
    process = JobProcess(pid, ticks, 0, "", tuple(procfs.cmdline(pid)))
    return LaunchedJob(
        flow_name, "local", socket.gethostname(), (process,), "", time.time(), request, dict(extra)
    )


@contextlib.contextmanager
def started(argv: list[str], **popen: object) -> Iterator[subprocess.Popen[bytes]]:
    """A process for the test; killed by PID (with its group when it leads one) at the end."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **popen)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)


@contextlib.contextmanager
def launched(launcher: LocalProcessLauncher, request: LaunchRequest, log_dir: Path) -> Iterator[LaunchedJob]:
    """A real job launched by *launcher*; SIGKILLed by PID at the end if it still runs."""
    job = launcher.launch(request, str(log_dir))
    try:
        yield job
    finally:
        for proc in job.processes:
            if procfs.is_alive(proc.pid, proc.start_ticks):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        for proc in job.processes:
            with contextlib.suppress(AssertionError):
                wait_for(lambda p=proc: not procfs.is_alive(p.pid, p.start_ticks), 30, "the job to die")


def listen_addresses(pid: int, port: int) -> set[str]:
    """The addresses *pid* listens on at *port* (``/proc/<pid>/net/tcp{,6}``, its own sockets only)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port and fields[9] in inodes:  # 0A: LISTEN
                assert len(address) == width
                if width == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    words = [bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, 32, 8)]
                    found.add(socket.inet_ntop(socket.AF_INET6, b"".join(words)))
    return found


def uids(pid: int) -> tuple[int, int]:
    """(real, effective) uid of *pid*, from ``/proc/<pid>/status``."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
    real, effective = line.split()[1:3]
    return int(real), int(effective)


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if item)


@pytest.fixture()
def ticks_env(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> tuple[Path, Path]:
    """(config dir of the ticks flow on the session broker with its topics, state dir)."""
    make_topics(kafka.bootstrap_servers, topic_prefix, ["ticks", "ticks.out", "ticks.dlq"])
    config = ticks_config(
        tmp_path / "config",
        brokers=kafka.bootstrap_servers,
        prefix=topic_prefix,
        delta_uri=str(tmp_path / "delta" / "ticks"),
    )
    return config, tmp_path / "state"


def ticks_request(config: Path, **env: str) -> LaunchRequest:
    return LaunchRequest(
        flow_name=FLOW,
        import_path=TICKS,
        config_files=(str(config),),
        environment="test",
        plan_hash="p",
        config_hash="c",
        sys_path=(str(ROOT),),
        env=tuple(sorted(env.items())),
        cwd=str(ROOT),
    )


def wait_healthy(launcher: LocalProcessLauncher, job: LaunchedJob) -> None:
    def healthy() -> bool:
        report = launcher.report(job)
        assert report.state is not JobState.DEAD, f"{report.reason}\n{launcher.logs(job, 40)}"
        return report.state is JobState.HEALTHY

    wait_for(healthy, 120, "the job to be healthy")


# --------------------------------------------------------------------------- records are data


EVIL = """
from pathlib import Path
Path({marker!r}).write_text("imported")
from loom_dagster.core.launchers.local import LocalProcessLauncher as Evil
"""


def test_a_record_naming_another_module_imports_nothing(tmp_path: Path) -> None:
    """``status``, ``logs`` and ``stop`` refuse a record whose launcher is not registered, saying how to
    register one; its module (found only through the record's ``sys_path``) is never imported, nor is
    one named by ``--launcher``."""
    marker = tmp_path / "imported.marker"
    code_dir = tmp_path / "elsewhere"
    code_dir.mkdir()
    (code_dir / "evil_launcher_mod.py").write_text(EVIL.format(marker=str(marker)))
    store = DeploymentStore(tmp_path / "state")
    with started(["sleep", "1000"]) as sleeper:
        ref = LauncherRef("evil_launcher_mod:Evil", {}, (str(code_dir),))
        record_for(store, job_of(sleeper.pid), launcher=ref)
        for args in (("status", "--no-lag"), ("logs", FLOW), ("stop", FLOW)):
            done = run_cli(store.root, *args, timeout_s=60)
            assert done.returncode == 2, (args, done.stdout, done.stderr)
            assert "'evil_launcher_mod:Evil' is not a registered launcher" in done.stderr, done.stderr
            assert '[project.entry-points."loom_dagster.launchers"]' in done.stderr, done.stderr
            assert "Traceback" not in done.stderr
            assert not marker.exists(), f"`loom-dagster {' '.join(args)}` imported the record's module"
        with pytest.raises(DeploymentError, match="not a registered launcher"):
            launcher_from_ref(ref)
        assert not marker.exists()
        assert sleeper.poll() is None

    # the operator's --launcher is held to the same list, even with the module importable
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("loom-dagster")), "--launcher", "evil_launcher_mod:Evil"]
        + ["--state-dir", str(tmp_path / "other"), "status", "--no-lag"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 2 and "is not a registered launcher" in done.stderr, done.stderr
    assert not marker.exists(), "--launcher imported an unregistered module"


def test_a_record_pointing_at_an_unrelated_process_is_not_signalled(tmp_path: Path) -> None:
    """A record naming a live ``sleep`` (with its real start time, leading its own process group): it
    is reported as not running, ``stop`` signals nothing and says why, and the launcher refuses it."""
    store = DeploymentStore(tmp_path / "state")
    with started(["sleep", "1000"], start_new_session=True) as sleeper:  # pgid == pid: killpg would hit it
        assert procfs.read_stat(sleeper.pid).pgid == sleeper.pid  # type: ignore[union-attr]
        deployment = record_for(store, job_of(sleeper.pid))

        rows = json.loads(run_cli(store.root, "status", "--json", "--no-lag").stdout)
        (row,) = [r for r in rows if r["flow"] == FLOW]  # other runs' orphans may show too
        assert row["health"] == "dead" and "'sleep 1000'" in row["detail"], row

        launcher = LocalProcessLauncher()
        with pytest.raises(DeploymentError) as refused:
            launcher.stop(deployment.job, timeout_s=5)
        message = str(refused.value)
        assert f"refusing to signal the job of flow {FLOW!r}" in message
        assert "is not a loom-dagster runtime: its command line is 'sleep 1000'" in message
        assert "Nothing was signalled" in message

        done = run_cli(store.root, "stop", FLOW, timeout_s=120)
        assert done.returncode == 0, done.stderr
        assert "nothing was signalled" in done.stdout and "'sleep 1000'" in done.stdout, done.stdout
        time.sleep(0.5)
        assert sleeper.poll() is None, f"the unrelated process was signalled: {sleeper.returncode}"
        current = store.current(FLOW)
        assert current is not None and current.stopped_on_purpose


@pytest.mark.kafka
def test_a_runtime_of_another_user_is_no_orphan_and_never_signalled(
    kafka: KafkaBroker, topic_prefix: str
) -> None:
    """A real ticks job run as uid 65534: ``status`` lists no orphan, ``stop`` finds nothing to
    stop, and a record pointing at it is refused ("runs as uid 65534"): it keeps running."""
    shared = Path(tempfile.mkdtemp(prefix="loom-sec-"))  # pytest's tmp dirs are closed to other users
    try:
        shared.chmod(0o777)
        make_topics(kafka.bootstrap_servers, topic_prefix, ["ticks", "ticks.out", "ticks.dlq"])
        config = ticks_config(
            shared / "config",
            brokers=kafka.bootstrap_servers,
            prefix=topic_prefix,
            delta_uri=str(shared / "delta" / "ticks"),
        )
        (shared / "delta").mkdir(mode=0o777)
        (shared / "delta").chmod(0o777)
        status_file = shared / "status-0.json"
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
        argv += runtime_argv(config, status_file, "--flow-name", FLOW, "--sys-path", str(ROOT))
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOM_DAGSTER_HTTP")}
        env["HOME"] = str(shared)
        with (shared / "job.log").open("wb") as log:
            with started(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT) as other:
                wait_for(
                    lambda: (s := read_status(status_file)) is not None and (s.connected or s.is_final),
                    120,
                    "the other user's job to connect",
                )
                status = read_status(status_file)
                assert status is not None and status.connected, (shared / "job.log").read_text()[-3000:]
                assert uids(other.pid) == (NOBODY, NOBODY)

                def why_gone() -> str:
                    log_tail = (shared / "job.log").read_text(errors="replace")[-3000:]
                    return f"exit {other.returncode}, status {read_status(status_file)}\n{log_tail}"

                state = shared / "state"  # ours, with no record of the flow
                rows = json.loads(run_cli(state, "status", "--json", "--no-lag").stdout)
                assert [r for r in rows if r["flow"] == FLOW] == [], rows  # other runs' orphans may show
                done = run_cli(state, "stop", FLOW, timeout_s=120)
                assert done.returncode == 2 and f"no deployment of flow {FLOW!r}" in done.stderr, done
                assert other.poll() is None, f"the other user's job was stopped as an orphan: {why_gone()}"

                store = DeploymentStore(state)
                record_for(store, job_of(other.pid))
                done = run_cli(state, "stop", FLOW, timeout_s=120)
                assert done.returncode == 2, (done.stdout, done.stderr)
                assert f"runs as uid {NOBODY}, not as uid 0 (this user)" in done.stderr, done.stderr
                assert "Nothing was signalled" in done.stderr and "Traceback" not in done.stderr
                time.sleep(0.5)
                assert other.poll() is None, f"the other user's job was signalled: {why_gone()}"
                after = read_status(status_file)
                assert after is not None and after.state == "running", after
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# --------------------------------------------------------------------------- the job's processes


@pytest.mark.kafka
def test_daemon_port_not_inherited_and_a_rebooted_record_refused(
    ticks_env: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``LOOM_DAGSTER_HTTP_PORT`` in the launching process's environment (a daemon's), a local job
    neither inherits nor serves it. The same job, recorded with another boot id, is refused; recorded
    as launched, it stops cleanly."""
    config, state = ticks_env
    (daemon_port,) = pick_free_ports(1)
    monkeypatch.setenv("LOOM_DAGSTER_HTTP_PORT", str(daemon_port))
    launcher = LocalProcessLauncher()
    with launched(launcher, ticks_request(config), state / "flows" / FLOW) as job:
        wait_healthy(launcher, job)
        pid = job.processes[0].pid
        assert "LOOM_DAGSTER_HTTP_PORT" not in environ(pid)
        assert listen_addresses(pid, daemon_port) == set()
        assert "serving /readyz" not in launcher.logs(job, 200)
        assert job.extra.get("boot_id") == boot_id(), "the launch records this boot's id"

        rebooted = msgspec.structs.replace(job, extra={**job.extra, "boot_id": "00000000-dead-beef-0000"})
        report = launcher.report(rebooted)
        assert report.alive_processes == 0 and "the host rebooted since the job was launched" in report.reason
        with pytest.raises(DeploymentError, match="rebooted since the job was launched"):
            launcher.stop(rebooted, timeout_s=5)
        assert procfs.is_alive(pid, job.processes[0].start_ticks)

        launcher.stop(job, timeout_s=60)  # verified: our runtime of this flow, this boot, this user
        status = read_status(Path(job.processes[0].status_path))
        assert status is not None and status.exit_code == EXIT_STOPPED


@pytest.mark.kafka
def test_local_job_serves_loopback_only_and_bounds_slow_clients(ticks_env: tuple[Path, Path]) -> None:
    """A local job given a port binds 127.0.0.1 only. 200 connections that each send a byte every
    0.5 s do not add threads to it (at most a few: no thread per connection), are cut off within the
    request deadline, and its probes answer throughout."""
    config, state = ticks_env
    (port,) = pick_free_ports(1)
    launcher = LocalProcessLauncher()
    request = ticks_request(config, LOOM_DAGSTER_HTTP_PORT=str(port))
    with launched(launcher, request, state / "flows" / FLOW) as job:
        wait_healthy(launcher, job)
        pid = job.processes[0].pid
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(f"{base}/readyz")[0] == 200, 60, "/readyz 200")
        assert listen_addresses(pid, port) == {"127.0.0.1"}

        samples = []
        for _ in range(5):
            samples.append(thread_count(pid))
            time.sleep(0.2)
        baseline = max(samples)
        slow: list[socket.socket] = []
        try:
            for _ in range(200):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"G")
                slow.append(sock)
            peak = baseline
            started_at = time.monotonic()
            while time.monotonic() - started_at < 4.0:  # within the 5 s request deadline
                for sock in slow:
                    with contextlib.suppress(OSError):
                        sock.send(b"E")
                peak = max(peak, thread_count(pid))
                code, body = http_get(f"{base}/readyz", timeout=2)
                assert (code, body) == (200, "ready\n"), "a probe went unanswered under slow clients"
                assert http_get(f"{base}/livez", timeout=2)[0] == 200
                time.sleep(0.5)
            assert peak <= baseline + 2, f"{peak} threads under 200 slow connections (before: {baseline})"

            def cut_off(sock: socket.socket) -> bool:
                try:
                    sock.settimeout(0.05)
                    return sock.recv(1) == b""
                except (ConnectionError, OSError) as exc:
                    return not isinstance(exc, TimeoutError)

            wait_for(lambda: all(cut_off(s) for s in slow), 10, "every slow connection to be cut off")
        finally:
            for sock in slow:
                sock.close()
        assert http_get(f"{base}/readyz")[0] == 200
        launcher.stop(job, timeout_s=60)


@pytest.mark.kafka
def test_a_taken_port_is_a_retryable_failure(ticks_env: tuple[Path, Path]) -> None:
    """The job's port is taken: it exits 3 (failed before its first poll), not 2 (bad input), and the
    health sensor's classification keeps restarting it (no halt)."""
    from loom_dagster.core.deploy.restart_policy import RestartState, halt_reason, job_death

    config, state = ticks_env
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        launcher = LocalProcessLauncher()
        request = ticks_request(config, LOOM_DAGSTER_HTTP_PORT=str(port))
        with launched(launcher, request, state / "flows" / FLOW) as job:
            wait_for(lambda: launcher.report(job).state is JobState.DEAD, 60, "the job to exit")
            report = launcher.report(job)
            (status,) = report.statuses
            assert status["exit_code"] == EXIT_STARTUP_FAILED, status
            assert f"cannot serve HTTP on 127.0.0.1:{port}" in status["error"], status
            deployment = record_for(DeploymentStore(state), job)
            death = job_death(deployment, report)
            assert death is not None and not death.bad_input, death
            assert halt_reason(RestartState(), death) is None
    finally:
        blocker.close()
