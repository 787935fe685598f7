"""HTTP probes and metrics of a running job: ``/readyz``, ``/livez``, ``/status``, ``/metrics``.

``python -m loom_dagster.runtime ... --http-port 8080`` (or ``LOOM_DAGSTER_HTTP_PORT=8080``) serves
them for a kubelet and a Prometheus scraper. The server starts right after the first status record,
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

Why the standard library's ``ThreadingHTTPServer`` and no web framework: four small GET endpoints at
probe rate need no routing or async stack; a daemon thread shares nothing with bytewax's run loop or
loom's async bridge, adds no dependency and is listening within milliseconds of start.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import TYPE_CHECKING

import msgspec
from msgspec.structs import replace
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from loom_dagster.redact import redact_text
from loom_dagster.runtime.status import (
    DEFAULT_HEARTBEAT_S,
    FINAL_STATES,
    STATE_RUNNING,
    STATE_STARTING,
    STATE_STOPPING,
    STATES,
    JobStatus,
)

if TYPE_CHECKING:
    from loom_dagster.runtime.reporter import StatusReporter

log = logging.getLogger("loom_dagster.runtime")

StatusSource = Callable[[], JobStatus | None]
"""Returns the current record, or ``None`` when it cannot be read right now."""

LIVE_TIMEOUT_HEARTBEATS = 3.0
"""Default live timeout, in heartbeat intervals (``--live-timeout`` overrides it)."""
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
    """Serves ``/readyz``, ``/livez``, ``/status`` and ``/metrics`` from a daemon thread.

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
        host: str = "0.0.0.0",
        port: int = 0,
        live_timeout_s: float = LIVE_TIMEOUT_HEARTBEATS * DEFAULT_HEARTBEAT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.live_timeout_s = live_timeout_s
        self._requested_port = port
        self._source = source
        self._clock = clock
        self._last: JobStatus | None = None
        self._last_lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(self.current, clock))
        self._httpd: _HTTPServer | None = None
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
        if self._httpd is None:
            raise RuntimeError("the probe server is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """``http://host:port`` as bound (for log lines)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> ProbeServer:
        """Bind and serve from a daemon thread; returns ``self``.

        Raises:
            OSError: if the address cannot be bound (port in use, unknown host).
        """
        if self._httpd is not None:
            return self
        server_class = _HTTPServer6 if ":" in self.host else _HTTPServer
        httpd = server_class((self.host, self._requested_port), _Handler)
        httpd.probes = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="loom-dagster-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _HTTPServer(ThreadingHTTPServer):
    """One thread per request (daemon threads: an exiting job never waits for a probe)."""

    daemon_threads = True
    probes: ProbeServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the bound address's FQDN (a DNS lookup); not needed here.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = 10  # a client that stalls mid-request gives its thread back
    server_version = "loom-dagster"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            self._route(path)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client hung up
        except Exception as exc:  # a probe answers 500, it never kills the server thread
            log.warning("HTTP %s failed: %s", path, redact_text(str(exc)))
            self._send(500, f"internal error: {type(exc).__name__}\n".encode(), "text/plain; charset=utf-8")

    def _route(self, path: str) -> None:
        probes = self.server.probes
        if path == "/readyz":
            self._verdict(probes.readiness())
        elif path == "/livez":
            self._verdict(probes.liveness())
        elif path == "/status":
            self._status(probes.current())
        elif path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encoder(probes.registry), content_type)
        else:
            self._send(404, b"not found: try /readyz /livez /status /metrics\n", "text/plain; charset=utf-8")

    def _verdict(self, verdict: Verdict) -> None:
        reason = redact_text(verdict.reason)[:_MAX_REASON_CHARS]
        self._send(verdict.http_status, f"{reason}\n".encode(), "text/plain; charset=utf-8")

    def _status(self, status: JobStatus | None) -> None:
        if status is None:
            self._send(503, b"no status record yet\n", "text/plain; charset=utf-8")
            return
        self._send(200, _ENCODER.encode(status) + b"\n", "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """No access log: probes every few seconds would drown the job log."""
