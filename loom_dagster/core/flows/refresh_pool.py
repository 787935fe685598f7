"""The flows of a cold defs-state refresh compiled in parallel worker processes.

A cold refresh (the automatic one at a load with an empty state, and ``loom-dagster refresh``) imports,
configures and compiles every flow, about 40 ms a flow on one core. ``DefsState.load`` hands the
flows to refresh to ``refresh_in_pool`` when there are enough of them. Each worker is a fresh
interpreter running ``python -m loom_dagster.core.flows.refresh_worker`` (never a ``fork`` of this process, unsafe
once Dagster or grpc threads run in it), driven by one thread of a ``concurrent.futures`` thread pool
over its stdin and stdout; it gets this process's ``sys.path``, working directory and environment.
It takes one flow at a time, imports the flow module, compiles and describes it exactly as the serial
refresh does (``defs_state.refresh_entry``) and sends back only the entry's msgspec JSON (the
secret-free records, what the state file holds), how long it took, and the log records it emitted
(replayed in this process's loggers). No plan, flow object or credential crosses the pipe; this
process writes the entries, and compiles a plan on first use as for any entry it reads. What a flow
module prints goes to the worker's stderr (this process's), never into the replies.

Why not ``multiprocessing`` (``ProcessPoolExecutor`` with the ``spawn`` or ``forkserver`` context): its
workers run the parent's ``__main__`` script again before anything else. For the ``loom-dagster``
script that is only an import (0.4 s a worker), but a script without an ``if __name__ ==
"__main__":`` guard that builds loom definitions ran all its top-level code again in every worker (and
then failed there); a library starting a pool inside a code location's load must not do that. This
worker imports only this package and the flows.

An error is the one the serial refresh raises (same class, same message naming the flow and its import
path), re-raised here with the worker's traceback as its cause. As in the serial refresh, the error
raised is the first failing flow's in spec order, and every flow before it keeps its entry; a flow
after it may too (it was already compiling), never a wrong one. A worker that dies, or cannot start,
costs no flow: what it did not return is compiled in this process, with a warning.

``LOOM_DAGSTER_REFRESH_WORKERS`` (or ``DefsState(workers=)``, ``loom-dagster refresh --workers``):
unset or ``auto`` -> the CPUs this process may use; ``1`` -> the serial refresh in this process;
``N`` -> at most N processes. A worker costs about a second of CPU to start (Python, then loom's
imports; the serial refresh pays those imports once), so the pool gets at most one worker per ``MIN_FLOWS_PER_WORKER`` flows to refresh and is not
started at all below two workers' worth: a location of a few flows, or a load refreshing the few flows
that changed, compiles in this process (``bench/cold_refresh.py`` measured the break-even).
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from loom_dagster.core.flows.spec import LoomFlowSpec

_log = logging.getLogger(__name__)

WORKERS_VARIABLE = "LOOM_DAGSTER_REFRESH_WORKERS"
MIN_FLOWS_PER_WORKER = 32
"""Flows a worker must have to compile to be worth its start-up; below ``2 * MIN_FLOWS_PER_WORKER``
flows to refresh, no pool. Measured (``bench/cold_refresh.py --counts 8,16,32,48,64,96 --force-pool``,
2 CPUs): two workers cost about 0.7 s of CPU more than the serial refresh's own imports, a flow about
44 ms. With the second CPU free the pool won from about 32 flows; with it busy (another job) it lost
up to about 96, by at most a second."""

WorkerResult = tuple[bytes, float, list[dict[str, Any]]]
"""What a worker returns for one flow: the entry's JSON, its seconds, its log records."""


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configured_workers(workers: int | None = None) -> int:
    """The refresh's worker count: *workers* if given, else ``LOOM_DAGSTER_REFRESH_WORKERS``, else the
    CPUs (``auto``). Raises ``ValueError`` naming the setting for anything but a whole number >= 1 or
    ``auto``.

    Example:
        >>> configured_workers(1)
        1
    """
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"refresh workers must be a whole number >= 1, not {workers!r}")
        return workers
    setting = os.environ.get(WORKERS_VARIABLE, "").strip().lower()
    if setting in ("", "auto"):
        return available_cpus()
    try:
        count = int(setting)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(
            f"{WORKERS_VARIABLE}={setting!r}: give a whole number >= 1 (1 compiles the flows in this "
            "process) or 'auto' (the CPUs)"
        )
    return count


def pool_size(flows: int, workers: int) -> int:
    """Processes to start for refreshing *flows* flows with at most *workers*: one per
    ``MIN_FLOWS_PER_WORKER`` flows; ``1`` (no pool, compile in this process) below two.

    Example:
        >>> pool_size(4, 8), pool_size(1000, 2), pool_size(100, 8)
        (1, 2, 3)
    """
    size = min(workers, flows // MIN_FLOWS_PER_WORKER)
    if size < 2 or not sys.executable:  # an embedded interpreter cannot start another
        return 1
    return size


def parallel_spec(spec: LoomFlowSpec) -> LoomFlowSpec | None:
    """What a worker gets of *spec*: what its records derive from (import path, config sources,
    environment), not its ``env`` (credentials) nor its presentation (applied in the parent). ``None``
    for a subclass of ``LoomFlowSpec``, which may load its flow its own way: it compiles in-process."""
    if type(spec) is not LoomFlowSpec:
        return None
    return LoomFlowSpec(spec.import_path, config=spec.config_sources, environment=spec.environment)


def refresh_in_pool(
    tasks: Sequence[tuple[LoomFlowSpec, str]],
    workers: int,
    on_result: Callable[[int, bytes, float], None],
) -> tuple[list[int], tuple[int, BaseException] | None]:
    """Refresh ``tasks[i] = (worker spec, state key)`` in *workers* worker processes; call
    ``on_result(i, entry_json, seconds)`` in this thread as each one is done.

    Returns the tasks that got no result because their worker died or none could start (the caller
    compiles them in-process), and the first failure in task order, if any. Tasks are handed out in
    order; after a failure no further task starts, those already started finish and are reported.
    """
    feed = _Feed(len(tasks))
    results: queue.SimpleQueue[tuple[int, str, Any]] = queue.SimpleQueue()
    hello = {"sys_path": list(sys.path), "level": logging.getLogger().getEffectiveLevel()}
    failures: dict[int, BaseException] = {}
    broken: list[int] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loom-refresh") as threads:
        drivers = [threads.submit(_drive, hello, tasks, feed, results) for _ in range(workers)]
        try:
            running = len(drivers)
            while running:
                index, kind, payload = results.get()
                if kind == "done":
                    running -= 1
                elif kind == "ok":
                    entry, seconds, records = payload
                    _replay(records)
                    on_result(index, entry, seconds)
                elif kind == "error":
                    failures[index] = payload
                    feed.stop()  # the serial refresh stops at its first failure too
                else:
                    broken.append(index)
        except BaseException:
            feed.stop(kill=True)  # an interrupt, or on_result failed: do not wait for the workers
            raise
    for driver in drivers:
        driver.result()  # a bug in a driver is not silent
    if not feed.stopped:
        broken += feed.untaken()  # every worker died or none could start
    if broken:
        _log.warning(
            "loom defs state: a refresh worker process died or could not start; %d flow(s) are compiled "
            "in this process instead (%s=1 always does)",
            len(broken),
            WORKERS_VARIABLE,
        )
    first = min(failures) if failures else None
    return sorted(broken), (first, failures[first]) if first is not None else None


class _Feed:
    """Hands out task indices in order to the driver threads until stopped; kills their workers on
    an interrupt."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._next = 0
        self._lock = threading.Lock()
        self._processes: list[subprocess.Popen[bytes]] = []
        self._killed = False
        self.stopped = False

    def take(self) -> int | None:
        with self._lock:
            if self.stopped or self._next >= self._count:
                return None
            self._next += 1
            return self._next - 1

    def untaken(self) -> list[int]:
        with self._lock:
            return list(range(self._next, self._count))

    def started(self, process: subprocess.Popen[bytes]) -> bool:
        """Register a worker; ``False`` if the pool was killed meanwhile (the caller closes it)."""
        with self._lock:
            if self._killed:
                return False
            self._processes.append(process)
            return True

    def stop(self, *, kill: bool = False) -> None:
        with self._lock:
            self.stopped = True
            if kill:
                self._killed = True
                for process in self._processes:
                    _kill(process)


def _drive(
    hello: dict[str, Any],
    tasks: Sequence[tuple[LoomFlowSpec, str]],
    feed: _Feed,
    results: queue.SimpleQueue[tuple[int, str, Any]],
) -> None:
    """Start one worker and feed it tasks one at a time until the feed is empty or stopped."""
    try:
        process = _start_worker()
    except OSError as exc:
        _log.debug("loom defs state: cannot start a refresh worker: %s", exc)
        results.put((-1, "done", None))
        return
    try:
        if not feed.started(process):
            return
        assert process.stdin is not None and process.stdout is not None
        try:
            send(process.stdin, hello)
        except OSError:
            return  # it died starting: the others take its tasks
        while (index := feed.take()) is not None:
            try:
                send(process.stdin, tasks[index])
                reply = receive(process.stdout)
            except (OSError, EOFError, pickle.UnpicklingError, struct.error):
                reply = None
            if reply is None:
                results.put((index, "broken", None))
                return
            kind, payload = reply
            results.put((index, kind, _rebuilt(payload) if kind == "error" else payload))
    finally:
        _close(process)
        results.put((-1, "done", None))


def _start_worker() -> subprocess.Popen[bytes]:
    """``python -m loom_dagster.core.flows.refresh_worker``, this package importable whatever ``PYTHONPATH`` says
    (the worker then takes this process's ``sys.path``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", "loom_dagster.core.flows.refresh_worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )


_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def _close(process: subprocess.Popen[bytes]) -> None:
    """End of input: the worker exits; killed (by its pid) if it does not within 10 s."""
    for stream in (process.stdin, process.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _kill(process)
        process.wait()


def _kill(process: subprocess.Popen[bytes]) -> None:
    try:
        process.kill()
    except OSError:
        pass


class WorkerTraceback(Exception):
    """The traceback of an error raised in a refresh worker (the cause of the error re-raised here)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _rebuilt(payload: tuple[bytes | None, str, str]) -> BaseException:
    """The worker's error, as it was raised there (its class and message), its traceback as cause."""
    pickled, described, trace = payload
    error: BaseException | None = None
    if pickled is not None:
        try:
            error = pickle.loads(pickled)
        except Exception:  # a class this process cannot rebuild: its description
            error = None
    if not isinstance(error, BaseException):
        error = RuntimeError(described)
    error.__cause__ = WorkerTraceback(f"\n{trace}")
    return error


# --------------------------------------------------------------------------------------------------
# The protocol: a 4-byte length, then a pickle (between this process and its own child only)
# --------------------------------------------------------------------------------------------------


def send(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def receive(stream: IO[bytes]) -> Any:
    """The next message, or ``None`` at the end of the stream."""
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


def _replay(records: list[dict[str, Any]]) -> None:
    """Emit a worker's log records through this process's loggers (handlers, levels and filters)."""
    for fields in records:
        logger = logging.getLogger(fields["name"])
        if logger.isEnabledFor(fields["levelno"]):
            logger.handle(logging.makeLogRecord(fields))
