"""HTTP probes and metrics of a running job: ``/readyz``, ``/livez``, ``/status``, ``/metrics``.

``python -m loom_dagster.runtime ... --http-port 8080`` (or ``LOOM_DAGSTER_HTTP_PORT=8080``) serves
them for a kubelet and a Prometheus scraper, on loopback (``127.0.0.1``) unless told otherwise
(``--http-host``; all interfaces by default only in a Kubernetes pod, where the kubelet probes the pod
IP). There is no authentication: what is served is what the status file holds (redacted, no secrets)
and the probes' verdicts; nothing can be changed through it. The server starts right after the first status record,
before the flow is imported and compiled, so ``/livez`` answers at once and ``/readyz`` says
``starting`` meanwhile; it stops once the final record is written.

- ``GET /readyz``: 200 ``ready`` once the dataflow has connected (first successful poll:
  ``connected_at`` set) while the job is ``starting``/``running``; else 503 and a one-line reason
  (``starting: ...``, ``stopping: ...``, ``stopped (exit 0)``, ``failed (exit 3): ...``).
- ``GET /livez``: 200 ``alive`` while heartbeats are younger than the live timeout and, once the
  dataflow is connected and polls partitions here, while ``last_poll_at`` is younger than it too
  (a dataflow stalled behind a gone cluster peer keeps heartbeating); else 503 and the reason. A
  ``stopping`` job is not checked for polls (the drain has its own ``--drain-timeout``).
- ``GET /status``: the status record as JSON, the same (redacted) content as the status file.
- ``GET /metrics``: Prometheus text exposition (``loom_dagster_*``, label ``flow``), read from the
  live record by a collector on a registry of its own.

Every answer comes from the record the :class:`~loom_dagster.runtime.reporter.StatusReporter` last
wrote, kept in memory (:func:`reporter_source`): what the file says, without reading the file, and
without refreshing it (a probe must not stand in for a heartbeat).

The server is one daemon thread multiplexing every connection with :mod:`selectors` (no thread per
connection): at most ``max_connections`` (16) are open at once, the oldest unfinished one is closed to
make room for a new one, and each must send its request and take its answer within
``request_timeout_s`` (5 s) of being accepted, or it is closed. A client that sends one byte every few
seconds costs a socket for 5 s, never a thread; a probe that sends its request at once is answered
however many slow clients there are. Why no web framework: four small GET endpoints at probe rate need
no routing or async stack; one daemon thread shares nothing with bytewax's run loop or loom's async
bridge, adds no dependency and is listening within milliseconds of start.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

import msgspec
from msgspec.structs import replace
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from loom_dagster.core.job.status import (
    DEFAULT_HEARTBEAT_S,
    FINAL_STATES,
    STATE_RUNNING,
    STATE_STARTING,
    STATE_STOPPING,
    STATES,
    JobStatus,
)
from loom_dagster.core.redact import redact_text

if TYPE_CHECKING:
    from loom_dagster.runtime.reporter import StatusReporter

log = logging.getLogger("loom_dagster.runtime")

StatusSource = Callable[[], JobStatus | None]
"""Returns the current record, or ``None`` when it cannot be read right now."""

LIVE_TIMEOUT_HEARTBEATS = 3.0
"""Default live timeout, in heartbeat intervals (``--live-timeout`` overrides it)."""
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_CONNECTIONS = 16
"""Connections open at once; a new one beyond it closes the oldest unfinished one."""
DEFAULT_REQUEST_TIMEOUT_S = 5.0
"""Seconds a connection has, from its accept, to send its request and take the answer."""
MAX_REQUEST_BYTES = 8192
"""Request line + headers; a longer request is answered 431 and closed."""
_ACCEPTS_PER_ROUND = 8  # a connection accepted in one round is read in the next before more arrive
_MAX_REASON_CHARS = 300
_ENCODER = msgspec.json.Encoder(order="sorted")  # the status file's encoding


# --------------------------------------------------------------------------- probe logic


@dataclass(frozen=True)
class Verdict:
    """The answer of a probe: healthy or not, and why (one line)."""

    ok: bool
    reason: str

    @property
    def http_status(self) -> int:
        """200 when healthy, else 503."""
        return 200 if self.ok else 503


def readiness(status: JobStatus | None) -> Verdict:
    """Ready once connected and neither stopping nor ended.

    Example:
        >>> readiness(JobStatus(flow="f", pid=1, state="running", connected_at=1.0))
        Verdict(ok=True, reason='ready')
        >>> readiness(JobStatus(flow="f", pid=1)).reason
        'starting: importing and compiling the flow'
    """
    if status is None:
        return Verdict(False, "starting: no status record yet")
    if status.state in FINAL_STATES:
        return Verdict(False, _ended(status))
    if status.state == STATE_STOPPING:
        return Verdict(False, "stopping: draining after a stop request")
    if not status.connected:
        if status.state == STATE_STARTING:
            return Verdict(False, "starting: importing and compiling the flow")
        return Verdict(False, "starting: waiting for the first poll of the source")
    return Verdict(True, "ready")


def liveness(status: JobStatus | None, live_timeout_s: float, now: float | None = None) -> Verdict:
    """Alive while heartbeats, and the polls of a connected dataflow, are younger than ``live_timeout_s``.

    Example:
        >>> liveness(JobStatus(flow="f", pid=1, heartbeat_at=100.0), 3.0, now=101.0)
        Verdict(ok=True, reason='alive')
        >>> liveness(JobStatus(flow="f", pid=1, heartbeat_at=100.0), 3.0, now=110.0).reason
        'no heartbeat for 10.0s (limit 3s)'
    """
    if status is None:
        return Verdict(False, "no status record yet")
    now = time.time() if now is None else now
    beat = status.heartbeat_age(now)
    if beat is None:
        return Verdict(False, "no heartbeat yet")
    if beat > live_timeout_s:
        if status.is_final:
            return Verdict(False, f"{_ended(status)}; the process has not exited for {beat:.1f}s")
        return Verdict(False, f"no heartbeat for {beat:.1f}s (limit {live_timeout_s:g}s)")
    poll = _poll_age(status, now)
    if poll is not None and poll > live_timeout_s:
        return Verdict(
            False, f"dataflow stalled: no poll for {poll:.1f}s (limit {live_timeout_s:g}s), heartbeats go on"
        )
    return Verdict(True, "alive")


def _poll_age(status: JobStatus, now: float) -> float | None:
    """Seconds since the last poll, when polls are expected to keep coming (else ``None``).

    Not expected: before connecting, while stopping or ended, in a process that owns no partition
    (it never polls), or when the poll probe is not installed (``partitions`` unknown: the fallback
    ``last_poll_at`` is the first consumed record and never advances).
    """
    if status.state != STATE_RUNNING or not status.connected or not status.partitions:
        return None
    if status.last_poll_at is None:
        return None
    return now - status.last_poll_at


def _ended(status: JobStatus) -> str:
    """``stopped (exit 0)`` / ``failed (exit 3): <first line of the error>``."""
    text = f"{status.state} (exit {status.exit_code})"
    first = (status.error or "").strip().splitlines()
    if first:
        text = f"{text}: {first[0]}"
    return text


# --------------------------------------------------------------------------- metrics


class StatusCollector(Collector):
    """Prometheus collector of one job's live status record (label ``flow``).

    Example:
        >>> registry = CollectorRegistry(auto_describe=False)
        >>> registry.register(StatusCollector(lambda: JobStatus(flow="f", pid=1, records_in=5)))
        >>> registry.get_sample_value("loom_dagster_records_in_total", {"flow": "f"})
        5.0
    """

    def __init__(self, source: StatusSource, clock: Callable[[], float] = time.time) -> None:
        self._source = source
        self._clock = clock

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: the registry must not call :meth:`collect` at registration."""
        return []

    def collect(self) -> Iterable[Metric]:
        """The metrics of the current record (none when there is no record)."""
        status = self._source()
        if status is None:
            return []
        labels = {"flow": status.flow}
        return [
            *_totals(status, labels),
            *_per_sink(status),
            *_ages(status, labels, self._clock()),
            _gauge(
                "loom_dagster_connected",
                "1 once the source completed its first poll.",
                labels,
                status.connected,
            ),
            _states(status),
        ]


def _counter(name: str, doc: str, labels: dict[str, str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), float(value))
    return family


def _gauge(name: str, doc: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), float(value))
    return family


def _totals(status: JobStatus, labels: dict[str, str]) -> list[Metric]:
    return [
        _counter("loom_dagster_records_in", "Records consumed from the source.", labels, status.records_in),
        _counter(
            "loom_dagster_records_out", "Records written, summed over sinks.", labels, status.records_out
        ),
        _counter(
            "loom_dagster_errors",
            "Messages turned into error envelopes plus records of failed sink writes.",
            labels,
            status.errors,
        ),
    ]


def _per_sink(status: JobStatus) -> list[Metric]:
    names = ["flow", "sink"]
    records = CounterMetricFamily("loom_dagster_sink_records", "Records written by one sink.", labels=names)
    failed = CounterMetricFamily(
        "loom_dagster_sink_failed_writes", "Failed write (flush) calls of one sink.", labels=names
    )
    for sink, entry in sorted(status.sinks.items()):
        records.add_metric([status.flow, sink], float(entry.records))
        failed.add_metric([status.flow, sink], float(entry.failed_writes))
    return [records, failed]


def _ages(status: JobStatus, labels: dict[str, str], now: float) -> list[Metric]:
    """Heartbeat and last-poll ages, each only once there was one."""
    ages = [
        (
            "loom_dagster_heartbeat_age_seconds",
            "Seconds since the last status heartbeat.",
            status.heartbeat_at,
        ),
        ("loom_dagster_last_poll_age_seconds", "Seconds since the source's last poll.", status.last_poll_at),
    ]
    return [_gauge(name, doc, labels, max(0.0, now - at)) for name, doc, at in ages if at is not None]


def _states(status: JobStatus) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "loom_dagster_state", "1 for the job's current state, 0 for the others.", labels=["flow", "state"]
    )
    for state in STATES:
        family.add_metric([status.flow, state], 1.0 if state == status.state else 0.0)
    return family


# --------------------------------------------------------------------------- status source


def reporter_source(reporter: StatusReporter, lock_timeout_s: float = 0.25) -> StatusSource:
    """The record ``reporter`` last wrote (or refreshed), copied under its lock; ``None`` if the lock
    stays busy for ``lock_timeout_s`` (the server then answers from its last copy).

    Deliberately not :meth:`StatusReporter.snapshot`, which refreshes ``heartbeat_at``: a probe must
    not fake the heartbeat it is checking.

    Example:
        >>> server = ProbeServer(reporter_source(reporter), port=0).start()  # doctest: +SKIP
    """

    def current() -> JobStatus | None:
        lock = reporter._lock  # private: the reporter has no public read that does not refresh
        if not lock.acquire(timeout=lock_timeout_s):
            return None
        try:
            status = reporter._status
            return replace(status, sinks=dict(status.sinks))
        finally:
            lock.release()

    return current


# --------------------------------------------------------------------------- server


class ProbeServer:
    """Serves ``/readyz``, ``/livez``, ``/status`` and ``/metrics`` from one daemon thread.

    Example:
        >>> server = ProbeServer(lambda: JobStatus(flow="f", pid=1), port=0).start()
        >>> server.port > 0
        True
        >>> server.stop()
    """

    def __init__(
        self,
        source: StatusSource,
        *,
        host: str = DEFAULT_HOST,
        port: int = 0,
        live_timeout_s: float = LIVE_TIMEOUT_HEARTBEATS * DEFAULT_HEARTBEAT_S,
        clock: Callable[[], float] = time.time,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        if max_connections < 1 or request_timeout_s <= 0:
            raise ValueError("max_connections must be at least 1 and request_timeout_s above 0")
        self.host = host
        self.live_timeout_s = live_timeout_s
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self._requested_port = port
        self._source = source
        self._clock = clock
        self._last: JobStatus | None = None
        self._last_lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(self.current, clock))
        self._loop: _Loop | None = None
        self._thread: threading.Thread | None = None

    def current(self) -> JobStatus | None:
        """The source's record, or the last one it gave when it cannot answer now."""
        status = self._source()
        with self._last_lock:
            if status is None:
                return self._last
            self._last = status
            return status

    def readiness(self) -> Verdict:
        """:func:`readiness` of the current record."""
        return readiness(self.current())

    def liveness(self) -> Verdict:
        """:func:`liveness` of the current record."""
        return liveness(self.current(), self.live_timeout_s, self._clock())

    @property
    def port(self) -> int:
        """The bound port (the chosen one when started with port 0)."""
        if self._loop is None:
            raise RuntimeError("the probe server is not started")
        return int(self._loop.listener.getsockname()[1])

    @property
    def url(self) -> str:
        """``http://host:port`` as bound (for log lines)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def open_connections(self) -> int:
        """Connections open right now (at most ``max_connections``)."""
        return len(self._loop.conns) if self._loop is not None else 0

    def start(self) -> ProbeServer:
        """Bind and serve from a daemon thread; returns ``self``.

        Raises:
            OSError: if the address cannot be bound (port in use, unknown host).
        """
        if self._loop is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self._requested_port))
            listener.listen(64)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._loop = _Loop(self, listener)
        self._thread = threading.Thread(target=self._loop.run, name="loom-dagster-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every socket (idempotent)."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        loop.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def answer(self, method: str, target: str, headers: dict[str, str]) -> tuple[int, bytes, str]:
        """``(status code, body, content type)`` of one request (a probe never raises: 500)."""
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed: GET only\n", _TEXT
        path = target.split("?", 1)[0].rstrip("/") or "/"
        try:
            return self._route(path, headers)
        except Exception as exc:  # a probe answers 500, it never kills the server
            log.warning("HTTP %s failed: %s", path, redact_text(str(exc)))
            return 500, f"internal error: {type(exc).__name__}\n".encode(), _TEXT

    def _route(self, path: str, headers: dict[str, str]) -> tuple[int, bytes, str]:
        if path == "/readyz":
            return _verdict(self.readiness())
        if path == "/livez":
            return _verdict(self.liveness())
        if path == "/status":
            status = self.current()
            if status is None:
                return 503, b"no status record yet\n", _TEXT
            return 200, _ENCODER.encode(status) + b"\n", "application/json"
        if path == "/metrics":
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            return 200, encoder(self.registry), content_type
        return 404, b"not found: try /readyz /livez /status /metrics\n", _TEXT


_TEXT = "text/plain; charset=utf-8"


def _verdict(verdict: Verdict) -> tuple[int, bytes, str]:
    reason = redact_text(verdict.reason)[:_MAX_REASON_CHARS]
    return verdict.http_status, f"{reason}\n".encode(), _TEXT


@dataclass(eq=False)
class _Conn:
    """One accepted connection: what it sent so far, what is left to send, when it must be done."""

    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    pending: bytes = b""
    answered: bool = False


class _Loop:
    """The server thread: accepts, reads requests, writes answers, enforces the caps (no locks: only
    this thread touches the connections)."""

    def __init__(self, server: ProbeServer, listener: socket.socket) -> None:
        self.server = server
        self.listener = listener
        self.conns: dict[socket.socket, _Conn] = {}  # in accept order: the first is the oldest
        self.selector = selectors.DefaultSelector()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)

    def stop(self) -> None:
        """Ask the thread to close everything and end."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def run(self) -> None:
        """Serve until :meth:`stop`."""
        self.selector.register(self.listener, selectors.EVENT_READ, "listener")
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                soonest = min((c.deadline for c in self.conns.values()), default=now + 1.0)
                events = self.selector.select(timeout=max(0.0, min(1.0, soonest - now)))
                accept = False
                for key, mask in events:  # connections first: a request already sent is served
                    if key.data == "listener":
                        accept = True
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    elif isinstance(key.data, _Conn):
                        self._serve(key.data, mask)
                if accept:
                    self._accept()
                self._expire(time.monotonic())
        except Exception as exc:  # never take the job down with the probes
            log.error("HTTP server stopped: %s", redact_text(str(exc)))
        finally:
            for conn in list(self.conns.values()):
                self._close(conn)
            self.selector.close()
            for sock in (self.listener, self._wake_r, self._wake_w):
                sock.close()

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_ROUND):
            try:
                sock, _address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: try again next round
                log.warning("HTTP accept failed: %s", exc)
                return
            while len(self.conns) >= self.server.max_connections:
                self._close(self._oldest())
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self.server.request_timeout_s)
            self.conns[sock] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _oldest(self) -> _Conn:
        """The connection to drop for a new one: the oldest still sending its request, else the oldest."""
        unfinished = (c for c in self.conns.values() if not c.answered)
        return next(unfinished, None) or next(iter(self.conns.values()))

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            self._close(conn)

    def _serve(self, conn: _Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and not conn.answered:
                data = conn.sock.recv(4096)
                if not data:
                    self._close(conn)
                    return
                conn.received += data
                self._maybe_answer(conn)
            if conn.answered and conn.pending:
                sent = conn.sock.send(conn.pending)
                conn.pending = conn.pending[sent:]
            if conn.answered and not conn.pending:
                self._close(conn)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset, broken pipe: the client is gone
            self._close(conn)

    def _maybe_answer(self, conn: _Conn) -> None:
        head, found, _rest = bytes(conn.received).partition(b"\r\n\r\n")
        if not found:
            head, found, _rest = bytes(conn.received).partition(b"\n\n")
        if not found:
            if len(conn.received) > MAX_REQUEST_BYTES:
                self._respond(conn, 431, b"request header fields too large\n", _TEXT, head_only=False)
            return
        if len(head) > MAX_REQUEST_BYTES:
            self._respond(conn, 431, b"request header fields too large\n", _TEXT, head_only=False)
            return
        lines = head.decode("latin-1").replace("\r\n", "\n").split("\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._respond(conn, 400, b"bad request\n", _TEXT, head_only=False)
            return
        method, target, _version = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        code, body, content_type = self.server.answer(method, target, headers)
        self._respond(conn, code, body, content_type, head_only=method == "HEAD")

    def _respond(self, conn: _Conn, code: int, body: bytes, content_type: str, *, head_only: bool) -> None:
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = ""
        head = (
            f"HTTP/1.1 {code} {phrase}\r\n"
            f"Server: loom-dagster\r\n"
            f"Date: {formatdate(usegmt=True)}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n" + ("Allow: GET, HEAD\r\n" if code == 405 else "") + "\r\n"
        )
        conn.pending = head.encode("latin-1") + (b"" if head_only else body)
        conn.answered = True
        self.selector.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _close(self, conn: _Conn) -> None:
        if self.conns.pop(conn.sock, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()
