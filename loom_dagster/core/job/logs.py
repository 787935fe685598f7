"""A job's log, rotated by size, with a bounded number of files, read back across the rotation.

Files: ``job.log`` (current), ``job.log.1`` (previous) ... ``job.log.<max_files - 1>`` (oldest);
``job.log.lock`` serializes writers (every process of a cluster appends to the same log).

How output gets there: the launcher starts the job with stdout/stderr appended to ``job.log`` and
the settings in ``LOOM_DAGSTER_LOG_*``. First thing, the runtime (:func:`take_over_stdio`) starts a
drainer, ``python -m loom_dagster.core.job.logs`` (its own session, deaf to SIGINT/SIGTERM/SIGHUP),
and points fd 1 and 2 at a pipe the drainer reads. Everything written to fd 1/2 from then on
(Python logging, ``print``, Rust panics, librdkafka) is redacted and written to the rotated files;
what was written before (interpreter start-up errors) is already in ``job.log``. Redaction is by
record, not by line: one :class:`~loom_dagster.core.redact.LineRedactor` sees the whole stream, so the
body of a PEM private key and the indented lines of a YAML value under a secret key (``private_key:
|``) are masked up to their end, however the output was cut into reads. Reading redacts again (the
part written before the drainer started; a window starting inside a key block, up to its ``END``).
The drainer is a process, not a thread, so output written right before a hard crash (an abort, a
segfault) is not lost with the job: it reads to end-of-file after the job is gone.

Only the standard library and :mod:`loom_dagster.core.redact` are imported.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import msgspec

from loom_dagster.core.redact import LineRedactor, redact_text

ENV_LOG_FILE = "LOOM_DAGSTER_LOG_FILE"
ENV_LOG_MAX_BYTES = "LOOM_DAGSTER_LOG_MAX_BYTES"
ENV_LOG_MAX_FILES = "LOOM_DAGSTER_LOG_MAX_FILES"
DEFAULT_LOG_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_LOG_MAX_FILES = 5
MIN_LOG_MAX_BYTES = 1024
MAX_LINE_BYTES = 64 * 1024
CUT_MARK = " [... line cut]"
_READ_CHUNK = 64 * 1024


class LogSettings(msgspec.Struct, frozen=True):
    """Where the job log is and how it rotates: at most ``max_files`` files of ``max_bytes`` each."""

    path: Path
    max_bytes: int = DEFAULT_LOG_MAX_BYTES
    max_files: int = DEFAULT_LOG_MAX_FILES

    def __post_init__(self) -> None:
        if self.max_bytes < MIN_LOG_MAX_BYTES:
            raise ValueError(f"log max bytes must be at least {MIN_LOG_MAX_BYTES}, got {self.max_bytes}")
        if self.max_files < 1:
            raise ValueError(f"log max files must be at least 1, got {self.max_files}")

    def env(self) -> dict[str, str]:
        """The environment variables that pass these settings to the job."""
        return {
            ENV_LOG_FILE: str(self.path),
            ENV_LOG_MAX_BYTES: str(self.max_bytes),
            ENV_LOG_MAX_FILES: str(self.max_files),
        }

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> LogSettings | None:
        """The settings in the environment; None when no log file is set."""
        env = os.environ if environ is None else environ
        path = env.get(ENV_LOG_FILE)
        if not path:
            return None
        return cls(
            Path(path),
            max_bytes=int(env.get(ENV_LOG_MAX_BYTES) or DEFAULT_LOG_MAX_BYTES),
            max_files=int(env.get(ENV_LOG_MAX_FILES) or DEFAULT_LOG_MAX_FILES),
        )


def rotated_path(path: Path, index: int) -> Path:
    """``job.log`` for 0, ``job.log.<index>`` otherwise."""
    return path if index == 0 else path.with_name(f"{path.name}.{index}")


def log_files(path: str | Path) -> list[Path]:
    """The existing files of a log, oldest first, the current file last."""
    base = Path(path)
    found: list[Path] = []
    index = 1
    while rotated_path(base, index).exists():
        found.append(rotated_path(base, index))
        index += 1
    found.reverse()
    if base.exists():
        found.append(base)
    return found


def _lock_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.lock")


@contextmanager
def _flock(path: Path, operation: int, create: bool) -> Iterator[None]:
    """Hold ``flock(operation)`` on the log's lock file (skipped if it is absent and not *create*)."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        fd = os.open(_lock_path(path), flags, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- writing


class RotatingLog:
    """Appends whole lines to a log, rotating it before a write would pass ``max_bytes``.

    Safe across processes: each write holds the lock file and reopens the current file if another
    writer rotated it. A file never exceeds ``max_bytes`` through this class (a longer line is cut).
    """

    def __init__(self, settings: LogSettings) -> None:
        self.settings = settings
        self.path = settings.path
        self._fd: int | None = None

    def write(self, data: bytes) -> None:
        """Append *data* (whole lines), rotating as needed: each file is filled up to the bound."""
        with _flock(self.path, fcntl.LOCK_EX, create=True):
            fd = self._current()
            size = os.fstat(fd).st_size
            batch = bytearray()
            for line in _capped_lines(data, self.settings.max_bytes):
                if size + len(batch) + len(line) > self.settings.max_bytes and (size or batch):
                    _write_all(fd, bytes(batch))
                    batch.clear()
                    self._rotate()
                    fd, size = self._current(), 0
                batch += line
            _write_all(fd, bytes(batch))

    def close(self) -> None:
        """Close the current file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _current(self) -> int:
        """The open current file, reopened if it was rotated (or removed) by another writer."""
        if self._fd is not None:
            try:
                same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return self._fd
            self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return self._fd

    def _rotate(self) -> None:
        """``job.log.<n-2>`` -> ``job.log.<n-1>`` ... ``job.log`` -> ``job.log.1``; the oldest goes."""
        last = self.settings.max_files - 1
        if last == 0:
            self.path.unlink(missing_ok=True)
        for index in range(last, 0, -1):
            source = rotated_path(self.path, index - 1)
            if source.exists():
                os.replace(source, rotated_path(self.path, index))
        for stale in (rotated_path(self.path, last + 1), rotated_path(self.path, last + 2)):
            stale.unlink(missing_ok=True)  # left by an earlier, larger max_files
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _capped_lines(data: bytes, max_bytes: int) -> Iterator[bytes]:
    """The lines of *data*, each cut to at most *max_bytes* (newline included)."""
    for line in data.splitlines(keepends=True):
        if len(line) > max_bytes:
            line = line[: max_bytes - len(CUT_MARK) - 1] + CUT_MARK.encode() + b"\n"
        yield line


def clean_lines(
    block: bytes, max_line_bytes: int = MAX_LINE_BYTES, redactor: LineRedactor | None = None
) -> bytes:
    """Whole lines of output, each redacted and capped at *max_line_bytes*, newline-terminated.

    *redactor* carries multi-line secrets over from the previous block of the same stream (a fresh
    one when not given)."""
    redactor = redactor or LineRedactor()
    text = block.decode("utf-8", errors="replace")
    lines = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
    out = []
    for line in lines:
        clean = redactor(line).encode("utf-8", errors="replace")
        if len(clean) > max_line_bytes:
            clean = clean[: max_line_bytes - len(CUT_MARK)] + CUT_MARK.encode()
        out.append(clean + b"\n")
    return b"".join(out)


def drain(fd: int, log: RotatingLog) -> None:
    """Copy *fd* to *log* until end-of-file, whole lines at a time, redacted by record."""
    pending = b""
    limit = min(MAX_LINE_BYTES, log.settings.max_bytes)
    redactor = LineRedactor()  # one for the stream: a key block spans reads
    while True:
        try:
            chunk = os.read(fd, _READ_CHUNK)
        except InterruptedError:
            continue
        if not chunk:
            break
        pending += chunk
        head, newline, pending = pending.rpartition(b"\n")
        if newline:
            log.write(clean_lines(head + newline, limit, redactor))
        if len(pending) > limit:  # an endless line: write what we have
            log.write(clean_lines(pending, limit, redactor))
            pending = b""
    if pending:
        log.write(clean_lines(pending, limit, redactor))


def main() -> int:
    """``python -m loom_dagster.core.job.logs``: drain stdin into the log named in the environment."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    settings = LogSettings.from_env()
    if settings is None:
        sys.stderr.write(f"loom-dagster log drainer: {ENV_LOG_FILE} is not set\n")
        return 2
    log = RotatingLog(settings)
    try:
        drain(sys.stdin.fileno(), log)
    finally:
        log.close()
    return 0


# --------------------------------------------------------------------------- the runtime's side


class StdioTakeover(msgspec.Struct):
    """fd 1/2 of this process point at the drainer's pipe; :meth:`release` flushes and waits."""

    drainer: subprocess.Popen[bytes]
    released: bool = False

    def release(self, timeout_s: float = 5.0) -> None:
        """Point fd 1/2 at /dev/null (the drainer then reads end-of-file) and wait for the drainer."""
        if self.released:
            return
        self.released = True
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
            os.dup2(null, 2)
        finally:
            os.close(null)
        try:
            self.drainer.wait(timeout_s)  # children holding fd 1/2 keep it open: then we stop waiting
        except subprocess.TimeoutExpired:
            pass


def take_over_stdio(settings: LogSettings) -> StdioTakeover:
    """Start the drainer and point fd 1 and 2 at it. Raises ``OSError`` if it cannot start."""
    read_end, write_end = os.pipe()
    try:
        drainer = subprocess.Popen(
            [sys.executable, "-m", "loom_dagster.core.job.logs"],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            env={**os.environ, **settings.env()},
            start_new_session=True,
            close_fds=True,
        )
    except BaseException:
        os.close(read_end)
        os.close(write_end)
        raise
    os.close(read_end)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)
    return StdioTakeover(drainer)


def start_job_log(prefix: str = "") -> StdioTakeover | None:
    """Hand fd 1/2 to the rotated log named in the environment; None (one stderr line) if unset or
    impossible, and output then goes where it went before."""
    try:
        settings = LogSettings.from_env()
        return take_over_stdio(settings) if settings is not None else None
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"{prefix}job log not rotated: {redact_text(str(exc))}\n")
        return None


class JobLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose ``close`` (``logging.shutdown``, at exit) also waits for the drainer
    to write everything the process wrote to fd 1/2."""

    def __init__(self, stream: object, takeover: StdioTakeover | None) -> None:
        super().__init__(stream)  # type: ignore[arg-type]
        self.takeover = takeover

    def close(self) -> None:
        super().close()
        if self.takeover is not None:
            self.takeover.release()


# --------------------------------------------------------------------------- reading


def read_tail(path: str | Path, window_bytes: int) -> tuple[bytes, bool]:
    """The last *window_bytes* of the log across its files (oldest first), redacted as one text, and
    whether it starts mid-log (so its first line may be partial). Empty when there is no log.

    Redacted as a whole, not line by line: a key block is masked up to its end, also when the window
    starts inside it (the lines above its ``END``)."""
    base = Path(path)
    chunks: list[bytes] = []
    remaining = window_bytes
    cut = False
    with _flock(base, fcntl.LOCK_SH, create=False):
        for file in reversed(log_files(base)):
            if remaining <= 0:
                cut = True
                break
            try:
                with open(file, "rb") as handle:
                    size = handle.seek(0, os.SEEK_END)
                    start = max(0, size - remaining)
                    handle.seek(start)
                    data = handle.read(size - start)
            except OSError:
                continue
            cut = cut or start > 0
            if data and not data.endswith(b"\n") and chunks:
                data += b"\n"
            chunks.append(data)
            remaining -= len(data)
    chunks.reverse()
    data = b"".join(chunks)
    text = data.decode("utf-8", errors="replace")
    clean = redact_text(text)
    return (data if clean == text else clean.encode("utf-8", errors="replace")), cut


def follow_lines(
    path: str | Path, poll_s: float = 0.3, stop: Callable[[], bool] = lambda: False
) -> Iterator[str]:
    """Yield the lines appended to the log from now on (redacted by record), through rotations, until
    *stop*.

    After a rotation the rest of the file we were reading is read, then every newer file in order.
    """
    base = Path(path)
    return _follow(base, _open_at_end(base), poll_s, stop)  # opened now, not at the first next()


def _follow(base: Path, handle: BinaryIO | None, poll_s: float, stop: Callable[[], bool]) -> Iterator[str]:
    pending = b""
    redactor = LineRedactor()
    while not stop():
        chunk = handle.read() if handle is not None else b""
        if chunk:
            pending += chunk
            head, newline, pending = pending.rpartition(b"\n")
            if newline:
                yield from _decoded(head, redactor)
            continue
        with _flock(base, fcntl.LOCK_SH, create=False):  # no rotation half done while we look
            newer = _newer_files(base, handle)
            if newer is not None:
                if handle is not None:
                    pending += handle.read()  # written before the rotation, after our last read
                    handle.close()
                for file in newer[:-1]:
                    pending += _read_whole(file)
                handle = _open(newer[-1]) if newer else None
        if newer is None:
            time.sleep(poll_s)
    if pending:
        yield from _decoded(pending, redactor)
    if handle is not None:
        handle.close()


def _decoded(block: bytes, redactor: LineRedactor) -> Iterator[str]:
    for line in block.decode("utf-8", errors="replace").split("\n"):
        yield redactor(line)


def _open(path: Path) -> BinaryIO | None:
    try:
        return open(path, "rb")  # noqa: SIM115 - kept open while following
    except OSError:
        return None


def _open_at_end(path: Path) -> BinaryIO | None:
    handle = _open(path)
    if handle is not None:
        handle.seek(0, os.SEEK_END)
    return handle


def _read_whole(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _newer_files(base: Path, handle: BinaryIO | None) -> list[Path] | None:
    """None while *handle* is still the current file; else the files written after it, oldest first
    (ending with the current file)."""
    files = log_files(base)
    if handle is None:
        return files[-1:] if files else None
    inode = os.fstat(handle.fileno()).st_ino
    inodes = []
    for file in files:
        try:
            inodes.append(file.stat().st_ino)
        except OSError:
            inodes.append(-1)
    if inodes and inodes[-1] == inode:
        return None
    if inode in inodes:
        return files[inodes.index(inode) + 1 :]
    return files  # ours was rotated away entirely: everything left is newer


if __name__ == "__main__":
    sys.exit(main())
