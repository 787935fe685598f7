"""Job logs that do not fill the disk: size rotation with a bounded number of files, one line per
dead-lettered record, native fd 1/2 output in the rotated files, ``loom-dagster logs`` (and
``log_tail``) reading across the rotation.

The rotation tests feed the real drainer process (``python -m loom_dagster.core.job.logs``); the job
test deploys ``tests.flows.dlq_some`` on the real broker through the Dagster asset and the local
launcher, with a small rotation bound.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loom_dagster.cli import main as cli
from loom_dagster.core.deploy.launch_records import LaunchedJob, LaunchRequest
from loom_dagster.core.deploy.store import Deployment, DeploymentStore
from loom_dagster.core.job.logs import LogSettings, RotatingLog, follow_lines, log_files, read_tail
from loom_dagster.core.job.status import read_status
from loom_dagster.core.launchers.local import LocalProcessLauncher, log_tail
from loom_dagster.dev.produce import produce
from loom_dagster.runtime.loom_logging import (
    BOUNDARY_LOGGER,
    LIFECYCLE_LOGGER,
    BoundaryErrorFilter,
    LifecycleDuplicateFilter,
)
from tests.flows.delta_only import Tick
from tests.flows.dlq_some import BAD_PREFIX, NATIVE_MARK, NATIVE_PREFIX
from tests.support.deploy_env import DeployBench, bench_fixture
from tests.support.helpers import wait_for

REPO = Path(__file__).resolve().parents[2]
LINE = re.compile(rb"^line (\d+) ")


def numbered(start: int, count: int, width: int = 60) -> bytes:
    """``count`` lines ``line <n> xxx...`` of about *width* bytes each."""
    return b"".join(f"line {n} {'x' * width}\n".encode() for n in range(start, start + count))


def numbers(data: bytes) -> list[int]:
    """The numbers of the ``line <n>`` lines in *data*, in order."""
    return [int(m.group(1)) for m in (LINE.match(line) for line in data.splitlines()) if m]


def read_all(path: Path) -> bytes:
    """Every file of the log, oldest first, concatenated."""
    return b"".join(file.read_bytes() for file in log_files(path))


def run_drainer(settings: LogSettings, data: bytes) -> None:
    """Feed *data* to the real drainer process and wait for it to finish."""
    done = subprocess.run(
        [sys.executable, "-m", "loom_dagster.core.job.logs"],
        input=data,
        env={**os.environ, **settings.env()},
        cwd=REPO,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")


def record_deployment(state_dir: Path, log_path: Path, flow: str = "ticks") -> None:
    """A deployment record of *flow* on this host whose job log is *log_path*."""
    request = LaunchRequest(flow, "x:y", (), "test", "p", "c")
    job = LaunchedJob(flow, "local", socket.gethostname(), (), str(log_path), time.time(), request)
    DeploymentStore(state_dir).save(Deployment(flow, job, "p", "c", time.time()))


# --------------------------------------------------------------------------- rotation


def test_rotation_bounds_file_count_and_sizes_and_keeps_order(tmp_path: Path) -> None:
    settings = LogSettings(tmp_path / "job.log", max_bytes=2048, max_files=3)
    total = 400  # ~27 KB through a 3 x 2 KB log: rotates ~13 times
    run_drainer(settings, numbered(0, total) + b"password=hunter2 in the last line\n")

    files = log_files(settings.path)
    assert [f.name for f in files] == ["job.log.2", "job.log.1", "job.log"]
    assert not (tmp_path / "job.log.3").exists()
    sizes = [f.stat().st_size for f in files]
    assert all(1500 < size <= 2048 for size in sizes[:-1]), sizes
    assert sizes[-1] <= 2048
    kept = numbers(read_all(settings.path))
    assert kept == list(range(kept[0], total)), "lines out of order or missing across files"
    assert kept[0] > 300, "older lines should have been rotated away"
    for file in files:  # every file holds whole lines
        assert file.read_bytes().endswith(b"\n")
    last = settings.path.read_text().splitlines()[-1]
    assert "hunter2" not in last and "password=***" in last


def test_a_line_longer_than_the_bound_is_cut_not_spilled(tmp_path: Path) -> None:
    settings = LogSettings(tmp_path / "job.log", max_bytes=1024, max_files=2)
    run_drainer(settings, b"a" * 5000 + b"\nafter\n")
    assert all(f.stat().st_size <= 1024 for f in log_files(settings.path))
    text = read_all(settings.path).decode()
    assert "[... line cut]" in text and text.endswith("after\n")


def test_two_writers_share_one_rotation(tmp_path: Path) -> None:
    """Every process of a cluster appends to the same job.log: they rotate it together."""
    settings = LogSettings(tmp_path / "job.log", max_bytes=4096, max_files=50)
    writers = [RotatingLog(settings), RotatingLog(settings)]

    def write(log: RotatingLog, start: int) -> None:
        for n in range(start, start + 300):
            log.write(numbered(n, 1))

    threads = [threading.Thread(target=write, args=(log, i * 1000)) for i, log in enumerate(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for log in writers:
        log.close()
    got = numbers(read_all(settings.path))
    assert sorted(got) == [*range(0, 300), *range(1000, 1300)]
    assert [n for n in got if n < 1000] == list(range(300))  # each writer's lines in order
    assert all(f.stat().st_size <= 4096 for f in log_files(settings.path))


# --------------------------------------------------------------------------- multi-line secrets

KEY_SECRET = "Sekr1tKeyMaterialQ7"
KEY_BLOCK = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    + "".join(f"MIIEpAIBAAKCAQEA{KEY_SECRET}{n}xyz+/\n" for n in range(6))
    + "-----END RSA PRIVATE KEY-----\n"
)
YAML_BLOCK = f"config:\n  private_key: |\n    {KEY_SECRET} one\n    {KEY_SECRET} two\n  user: bob\n"


def test_the_drainer_masks_a_key_block_split_across_reads(tmp_path: Path) -> None:
    """The real drainer gets a PEM key and a YAML block scalar in two writes, cut inside each block
    (two reads): every line of them is masked, the lines around stay."""
    settings = LogSettings(tmp_path / "job.log", max_bytes=1 << 20, max_files=2)
    data = f"before\n{KEY_BLOCK}{YAML_BLOCK}after\n".encode()
    cuts = [data.index(b"MIIE") + 40, data.index(b" one") + 8]
    drainer = subprocess.Popen(
        [sys.executable, "-m", "loom_dagster.core.job.logs"],
        stdin=subprocess.PIPE,
        env={**os.environ, **settings.env()},
        cwd=REPO,
    )
    assert drainer.stdin is not None
    start = 0
    for cut in [*cuts, len(data)]:
        drainer.stdin.write(data[start:cut])
        drainer.stdin.flush()
        time.sleep(0.3)  # the drainer reads (and writes out) what it has: the block is cut in two
        start = cut
    drainer.stdin.close()
    assert drainer.wait(30) == 0
    lines = settings.path.read_text().splitlines()
    assert KEY_SECRET not in settings.path.read_text()
    assert lines == [
        "before",
        "-----BEGIN RSA PRIVATE KEY-----",
        *["***"] * 6,
        "-----END RSA PRIVATE KEY-----",
        "config:",
        "  private_key: ***",
        "    ***",
        "    ***",
        "  user: bob",
        "after",
    ]


def test_log_readers_mask_by_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Output written before the drainer took over is in job.log raw: the tail (the health gate's
    ``log_tail``, ``loom-dagster logs``) masks a key block whole, also when its window starts inside
    the block (below its BEGIN); following masks a block appended in pieces."""
    log_path = tmp_path / "job.log"
    log_path.write_text(f"interpreter start\n{KEY_BLOCK}{YAML_BLOCK}last line\n")
    data, cut = read_tail(log_path, 1 << 20)
    assert not cut and KEY_SECRET not in data.decode() and b"-----END RSA PRIVATE KEY-----" in data
    window = len(log_path.read_bytes()) - log_path.read_text().index("xyz+/\nMIIE") - 3
    inside, cut = read_tail(log_path, window)  # starts inside the key, below its BEGIN line
    assert cut and KEY_SECRET not in inside.decode() and b"-----BEGIN" not in inside
    tail = log_tail(log_path, lines=100, window_bytes=window)
    assert KEY_SECRET not in tail and tail.endswith("  user: bob\nlast line")

    record_deployment(tmp_path / "state", log_path)
    assert cli.main(["--state-dir", str(tmp_path / "state"), "logs", "ticks", "-n", "100"]) == 0
    shown = capsys.readouterr().out
    assert (
        KEY_SECRET not in shown and "interpreter start" in shown and "-----END RSA PRIVATE KEY-----" in shown
    )

    done = threading.Event()
    followed = follow_lines(log_path, poll_s=0.05, stop=done.is_set)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(followed))
    reader.start()
    with open(log_path, "a") as handle:
        for piece in (KEY_BLOCK[:60], KEY_BLOCK[60:], YAML_BLOCK, "done\n"):
            handle.write(piece)
            handle.flush()
            time.sleep(0.2)
    time.sleep(0.3)
    done.set()
    reader.join(10)
    assert lines[-1] == "done" and lines.count("***") + lines.count("    ***") == 8
    assert not [line for line in lines if KEY_SECRET in line]


# --------------------------------------------------------------------------- reading across files


def test_log_tail_and_logs_cli_span_two_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = LogSettings(tmp_path / "logs" / "job.log", max_bytes=2048, max_files=5)
    settings.path.parent.mkdir()
    log = RotatingLog(settings)
    log.write(numbered(0, 40))  # 40 x 68 bytes: job.log.1 full, the rest in job.log
    log.close()
    current = numbers(settings.path.read_bytes())
    assert settings.path.with_name("job.log.1").exists() and 0 < len(current) < 30

    tail = log_tail(settings.path, lines=len(current) + 5)
    assert numbers(tail.encode()) == list(range(40 - len(current) - 5, 40))

    record_deployment(tmp_path / "state", settings.path)
    assert cli.main(["--state-dir", str(tmp_path / "state"), "logs", "ticks", "-n", "30"]) == 0
    assert numbers(capsys.readouterr().out.encode()) == list(range(10, 40))


def test_follow_reads_through_rotations(tmp_path: Path) -> None:
    settings = LogSettings(tmp_path / "job.log", max_bytes=1024, max_files=10)
    log = RotatingLog(settings)
    log.write(b"before following\n")
    done = threading.Event()
    lines = follow_lines(settings.path, poll_s=0.05, stop=done.is_set)

    def writer() -> None:
        for n in range(200):  # ~13 KB: a dozen rotations, some between two polls
            log.write(numbered(n, 1))
            if n % 20 == 0:
                time.sleep(0.1)
        time.sleep(0.5)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    got = numbers("\n".join(lines).encode())
    thread.join()
    log.close()
    assert got == list(range(200))


def test_logs_cli_follow_crosses_a_rotation(tmp_path: Path) -> None:
    """``loom-dagster logs FLOW -f`` as a process, while the log rotates under it."""
    settings = LogSettings(tmp_path / "job.log", max_bytes=2048, max_files=5)
    log = RotatingLog(settings)
    log.write(numbered(0, 5))
    record_deployment(tmp_path / "state", settings.path)
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loom_dagster.cli.main",
            "--state-dir",
            str(tmp_path / "state"),
            "logs",
            "ticks",
            "-f",
        ],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert follower.stdout is not None
        first = follower.stdout.readline()  # the tail is printed once following has begun
        assert numbers(first) == [0]
        log.write(numbered(5, 100))  # ~6.8 KB: three rotations
        log.close()
        out = first
        deadline = time.monotonic() + 30
        while numbers(out)[-1:] != [104] and time.monotonic() < deadline:
            out += follower.stdout.readline()
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(10)
    assert numbers(out) == list(range(105))
    assert len(log_files(settings.path)) == 4


# --------------------------------------------------------------------------- filters (no job)


def _record(logger: str, event: dict[str, Any]) -> logging.LogRecord:
    return logging.LogRecord(logger, logging.ERROR, __file__, 1, event, None, None)


def test_filters_pass_other_errors_untouched() -> None:
    """Only a routed record's lines are changed or dropped; any other error passes as it was."""
    lifecycle = LifecycleDuplicateFilter()
    node_error = {"event": "error", "scope": "node", "error": "boom", "error_type": "ValueError"}
    try:
        raise ValueError("boom")
    except ValueError:  # raised outside loom's error boundary: nothing will route it
        assert lifecycle.filter(_record(LIFECYCLE_LOGGER, dict(node_error)))
    flow_error = {"event": "error", "scope": "flow", "error": "signal received"}
    assert lifecycle.filter(_record(LIFECYCLE_LOGGER, flow_error))
    assert not lifecycle.filter(
        _record(LIFECYCLE_LOGGER, {"event": "end", "scope": "terminal", "name": "error_envelope"})
    )
    other = {"event": "something_else", "exc_info": True}
    record = _record(BOUNDARY_LOGGER, other)
    record.exc_info = (ValueError, ValueError("x"), None)
    assert BoundaryErrorFilter().filter(record)
    assert record.msg == {"event": "something_else", "exc_info": True} and record.exc_info is not None


# --------------------------------------------------------------------------- a real job


@pytest.fixture
def bench(kafka: Any, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def job_lines(path: Path) -> list[str]:
    """Every line of the job log, across its files."""
    return read_all(path).decode(errors="replace").splitlines()


def wait_until(predicate: Any, what: str, timeout_s: float = 60.0) -> Any:
    return wait_for(predicate, timeout_s, what)


def test_job_logs_one_line_per_dlq_record_rotated_with_native_output(
    bench: DeployBench, capsys: pytest.CaptureFixture[str]
) -> None:
    max_bytes, max_files = 16 * 1024, 40
    launcher = LocalProcessLauncher(log_max_bytes=max_bytes, log_max_files=max_files)
    request = LaunchRequest(
        flow_name="ticks",
        import_path="tests.flows.dlq_some:ticks_flow",
        config_files=(str(bench.config),),
        environment="test",
        plan_hash="p",
        config_hash="c",
        sys_path=(str(REPO),),
        cwd=str(REPO),
    )
    job = launcher.launch(request, str(bench.state_dir / "logs"))
    try:
        check_job_log(bench, launcher, job, capsys, max_bytes, max_files)
    finally:
        launcher.stop(job, timeout_s=30)
    assert "stopped (SIGTERM); exit 0" in job_lines(Path(job.log_path))[-1]  # the last words are kept
    wait_until(lambda: not drainers_of(Path(job.log_path)), "the drainer to exit", 10)


def check_job_log(
    bench: DeployBench,
    launcher: LocalProcessLauncher,
    job: LaunchedJob,
    capsys: pytest.CaptureFixture[str],
    max_bytes: int,
    max_files: int,
) -> None:
    """Measure lines per DLQ record, native output, the bounds and ``loom-dagster logs -n``."""
    log_path = Path(job.log_path)
    status_path = Path(job.processes[0].status_path)

    def status_errors() -> int:
        status = read_status(status_path)
        return status.errors if status is not None else 0

    wait_until(lambda: launcher.report(job).state.value == "healthy", "a connected job", 90)
    time.sleep(1.0)  # only DLQ records from here: OK records would add their table flush lines later
    before = job_lines(log_path)

    dlq_records = 200  # ~60 KB of DLQ lines: the log rotates during the measurement
    ticks = [Tick(id=f"{BAD_PREFIX}{n}", seq=n) for n in range(dlq_records)]
    produce(bench.bootstrap, f"{bench.prefix}.ticks", ticks, key=lambda t: t.id)
    wait_until(lambda: status_errors() >= dlq_records, f"{dlq_records} error envelopes")
    time.sleep(1.0)
    after = job_lines(log_path)

    added = after[len(before) :] if after[: len(before)] == before else None
    assert added is not None, "lines before the measurement were lost (raise max_files)"
    with capsys.disabled():
        print(
            f"\njob log: {len(added)} lines for {dlq_records} DLQ records ({len(added) / dlq_records:.2f}/record)"
        )
    routed = [line for line in added if "unhandled_boundary_error" in line]
    assert len(routed) == dlq_records
    dlq_topic = f"{bench.prefix}.ticks.dlq"
    assert all(f"error_topic={dlq_topic}" in line and "error_type=ValueError" in line for line in routed)
    assert all("kind=task" in line and "is bad" in line for line in routed)
    assert dlq_records <= len(added) <= dlq_records + 5, "\n".join(added[:40])
    assert not any("Traceback" in line for line in after)

    produce(bench.bootstrap, f"{bench.prefix}.ticks", [Tick(id=f"{NATIVE_PREFIX}1", seq=1)])
    wait_until(
        lambda: any(f"{NATIVE_MARK} {NATIVE_PREFIX}1" in line for line in job_lines(log_path)),
        "the step's os.write(2, ...) in the rotated log",
    )

    files = log_files(log_path)
    assert len(files) >= 4, "the measurement should have rotated the log"
    assert len(files) <= max_files and all(f.stat().st_size <= max_bytes for f in files)
    assert log_tail(log_path, lines=300).count("unhandled_boundary_error") >= 150  # several files

    DeploymentStore(bench.state_dir).save(Deployment("ticks", job, "p", "c", time.time()))
    capsys.readouterr()
    assert cli.main(["--state-dir", str(bench.state_dir), "logs", "ticks", "-n", "150"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown == job_lines(log_path)[-150:]
    assert len(log_path.read_text().splitlines()) < 150  # so the 150 lines span several files


def drainers_of(log_path: Path) -> list[int]:
    """PIDs of live log drainers writing *log_path* (from their environment)."""
    wanted = f"LOOM_DAGSTER_LOG_FILE={log_path}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_output_before_the_runtime_takes_over_stays_in_job_log(tmp_path: Path) -> None:
    """A line printed while the interpreter starts (here by a ``sitecustomize``) is in job.log, with
    the runtime's own lines after it; the drainer leaves with the job."""
    early = tmp_path / "early"
    early.mkdir()
    (early / "sitecustomize.py").write_text(
        "import sys\nsys.stderr.write('printed at interpreter start\\n')\n"
    )
    launcher = LocalProcessLauncher(log_max_bytes=4096, log_max_files=2)
    request = LaunchRequest(
        "ticks", "no_such_module:flow", (str(tmp_path),), "test", "p", "c", sys_path=(str(early),)
    )
    job = launcher.launch(request, str(tmp_path / "logs"))
    log_path = Path(job.log_path)
    wait_until(lambda: "exit 2" in read_all(log_path).decode(), "the runtime's exit line", 30)
    lines = job_lines(log_path)
    first_runtime = next(i for i, line in enumerate(lines) if line.startswith("loom-dagster runtime:"))
    assert "printed at interpreter start" in lines[:first_runtime]
    assert any("cannot load flow" in line for line in lines)
    wait_until(lambda: not drainers_of(log_path), "the drainer to exit", 10)
