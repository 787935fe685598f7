"""The job's HTTP probes and metrics (``--http-port``, :mod:`loom_dagster.runtime.http_server`) and
``--process-id auto``: probe logic on records, the server on a fake status source, and one real job
against the session Kafka broker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from loom_dagster.core.job.status import (
    EXIT_BAD_INPUT,
    EXIT_STARTUP_FAILED,
    EXIT_STOPPED,
    JobStatus,
    SinkStatus,
    read_status,
)
from loom_dagster.dev.kafka import KafkaBroker, pick_free_ports
from loom_dagster.dev.produce import produce
from loom_dagster.runtime.args import parse_options
from loom_dagster.runtime.http_server import ProbeServer, liveness, readiness, reporter_source
from loom_dagster.runtime.reporter import StatusReporter
from tests.conftest import make_topics, ticks_config
from tests.flows.delta_only import Tick
from tests.support.deploy_env import runtime_argv
from tests.support.helpers import http_get, wait_for

REPO = Path(__file__).resolve().parents[2]
NOW = 1_000_000.0


def _status(**fields: Any) -> JobStatus:
    return JobStatus(**{"flow": "orders", "pid": 7, "started_at": NOW - 60, "heartbeat_at": NOW, **fields})


def _running(**fields: Any) -> JobStatus:
    """A connected job polling one partition, all fresh at ``NOW``."""
    return _status(
        **{"state": "running", "connected_at": NOW - 30, "last_poll_at": NOW, "partitions": 1, **fields}
    )


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a text exposition, keyed by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# --------------------------------------------------------------------------- probe logic


@pytest.mark.parametrize(
    ("status", "ready", "reason"),
    [
        (None, False, "starting: no status record yet"),
        (_status(), False, "starting: importing and compiling the flow"),
        (_status(state="running"), False, "starting: waiting for the first poll of the source"),
        (_running(), True, "ready"),
        (_running(state="stopping"), False, "stopping: draining after a stop request"),
        (_running(state="stopped", exit_code=0), False, "stopped (exit 0)"),
        (
            _status(state="failed", exit_code=3, error="failed before its first poll: no broker\nmore"),
            False,
            "failed (exit 3): failed before its first poll: no broker",
        ),
    ],
)
def test_readiness(status: JobStatus | None, ready: bool, reason: str) -> None:
    verdict = readiness(status)
    assert (verdict.ok, verdict.reason) == (ready, reason)
    assert verdict.http_status == (200 if ready else 503)


@pytest.mark.parametrize(
    ("status", "now", "alive", "reason_part"),
    [
        (_status(), NOW + 2.9, True, "alive"),  # starting: heartbeats only
        (_status(), NOW + 3.5, False, "no heartbeat for 3.5s (limit 3s)"),
        (_status(heartbeat_at=None), NOW, False, "no heartbeat yet"),
        (None, NOW, False, "no status record yet"),
        (_running(), NOW + 2.0, True, "alive"),
        (_running(heartbeat_at=NOW + 10), NOW + 10, False, "dataflow stalled: no poll for 10.0s"),
        (_running(state="stopping", heartbeat_at=NOW + 10), NOW + 10, True, "alive"),  # draining
        (_running(partitions=0, last_poll_at=None, heartbeat_at=NOW + 10), NOW + 10, True, "alive"),
        (_running(partitions=None, heartbeat_at=NOW + 10), NOW + 10, True, "alive"),  # no poll probe
        (_status(state="running", heartbeat_at=NOW + 10), NOW + 10, True, "alive"),  # not connected yet
        (_running(state="stopped", exit_code=0), NOW + 1, True, "alive"),  # exiting
        (_running(state="stopped", exit_code=0), NOW + 5, False, "stopped (exit 0); the process has not"),
    ],
)
def test_liveness(status: JobStatus | None, now: float, alive: bool, reason_part: str) -> None:
    verdict = liveness(status, 3.0, now)
    assert verdict.ok is alive and reason_part in verdict.reason, verdict


def test_reporter_source_reads_the_record_without_faking_a_heartbeat(tmp_path: Path) -> None:
    reporter = StatusReporter(tmp_path / "s.json", _status(records_in=3))
    reporter.write()
    source = reporter_source(reporter, lock_timeout_s=0.05)
    first = source()
    assert first is not None and first == read_status(tmp_path / "s.json")
    time.sleep(0.05)
    again = source()
    assert again is not None and again.heartbeat_at == first.heartbeat_at, "a read must not refresh"
    server = ProbeServer(source)
    assert server.current() == first
    with reporter._lock:  # the reporter is busy (writing): the server answers from its last copy
        assert source() is None
        assert server.current() == first


# --------------------------------------------------------------------------- the server


class FakeSource:
    """A status source the test changes at will."""

    def __init__(self, status: JobStatus | None) -> None:
        self.status = status

    def __call__(self) -> JobStatus | None:
        return self.status


@pytest.fixture
def served() -> Iterator[tuple[ProbeServer, FakeSource]]:
    source = FakeSource(None)
    server = ProbeServer(source, host="127.0.0.1", port=0, live_timeout_s=3.0).start()
    try:
        yield server, source
    finally:
        server.stop()


def test_server_endpoints(served: tuple[ProbeServer, FakeSource]) -> None:
    server, source = served
    base = f"http://127.0.0.1:{server.port}"
    assert server.url == base
    assert http_get(f"{base}/readyz") == (503, "starting: no status record yet\n")
    assert http_get(f"{base}/status")[0] == 503
    assert http_get(f"{base}/metrics")[0] == 200

    now = time.time()
    source.status = _status(started_at=now - 1, heartbeat_at=now)
    assert http_get(f"{base}/readyz") == (503, "starting: importing and compiling the flow\n")
    assert http_get(f"{base}/livez") == (200, "alive\n")

    sinks = {"orders_delta": SinkStatus(last_write_at=now, records=40, failed_writes=2)}
    source.status = _running(
        started_at=now - 9,
        heartbeat_at=now,
        connected_at=now - 5,
        last_poll_at=now - 1,
        records_in=42,
        sinks=sinks,
    )
    assert http_get(f"{base}/readyz") == (200, "ready\n")
    assert http_get(f"{base}/readyz?verbose=1") == (200, "ready\n")
    assert http_get(f"{base}/livez") == (200, "alive\n")
    code, body = http_get(f"{base}/status")
    assert code == 200 and json.loads(body) == source.status.to_dict()

    code, body = http_get(f"{base}/metrics")
    samples = metric_samples(body)
    flow = (("flow", "orders"),)
    assert samples[("loom_dagster_records_in_total", flow)] == 42
    assert samples[("loom_dagster_records_out_total", flow)] == 0
    assert samples[("loom_dagster_errors_total", flow)] == 0
    sink = (("flow", "orders"), ("sink", "orders_delta"))
    assert samples[("loom_dagster_sink_records_total", sink)] == 40
    assert samples[("loom_dagster_sink_failed_writes_total", sink)] == 2
    assert samples[("loom_dagster_connected", flow)] == 1
    assert 0.5 < samples[("loom_dagster_last_poll_age_seconds", flow)] < 30
    assert 0 <= samples[("loom_dagster_heartbeat_age_seconds", flow)] < 30
    states = {
        dict(labels)["state"]: v for (name, labels), v in samples.items() if name == "loom_dagster_state"
    }
    assert states == {"starting": 0, "running": 1, "stopping": 0, "stopped": 0, "failed": 0}
    assert not [m for m in REGISTRY.collect() if m.name.startswith("loom_dagster")], (
        "global registry untouched"
    )

    source.status = _running(heartbeat_at=time.time() - 10)
    code, body = http_get(f"{base}/livez")
    assert code == 503 and body.startswith("no heartbeat for ")
    source.status = _status(state="failed", exit_code=1, error="failed at run time: password=hunter2 bad")
    code, body = http_get(f"{base}/readyz")
    assert code == 503 and "hunter2" not in body and body.startswith("failed (exit 1)")
    assert http_get(f"{base}/nope")[0] == 404


def test_server_stop_frees_the_port() -> None:
    server = ProbeServer(FakeSource(_status()), host="127.0.0.1", port=0).start()
    url = f"http://127.0.0.1:{server.port}/livez"
    assert http_get(url)[0] == 503  # heartbeat at NOW: long ago
    server.stop()
    server.stop()
    assert http_get(url, timeout=2) == (None, "")


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send *data* as is and read the whole answer (the server closes the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_server_speaks_only_get_and_head(served: tuple[ProbeServer, FakeSource]) -> None:
    server, source = served
    source.status = _running(heartbeat_at=time.time(), last_poll_at=time.time())
    head = raw_request(server.port, b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n"), head
    assert b"Content-Length: 6\r\n" in head and b"Connection: close\r\n" in head
    post = raw_request(server.port, b"POST /readyz HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in post, post
    assert raw_request(server.port, b"hello\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET /readyz HTTP/1.1\r\nX-Pad: " + b"a" * 10_000 + b"\r\n\r\n"
    assert raw_request(server.port, huge).startswith(b"HTTP/1.1 431 ")
    assert raw_request(server.port, b"GET /livez HTTP/1.0\n\n").endswith(b"\r\n\r\nalive\n")


def test_slow_clients_are_capped_and_cut_off_while_probes_answer() -> None:
    """No thread per connection: 50 clients that never finish their request leave the server's thread
    count as it was, at most ``max_connections`` stay open, each for at most ``request_timeout_s``, and a
    probe is answered meanwhile."""
    server = ProbeServer(
        FakeSource(_status(heartbeat_at=time.time())),
        host="127.0.0.1",
        port=0,
        live_timeout_s=3600,
        max_connections=4,
        request_timeout_s=1.0,
    ).start()
    slow: list[socket.socket] = []
    try:
        threads = threading.active_count()
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"GET /readyz HTTP/1.1\r\n")  # and never the blank line
            slow.append(sock)
        assert http_get(f"http://127.0.0.1:{server.port}/livez", timeout=2) == (200, "alive\n")
        assert threading.active_count() == threads
        wait_for(lambda: server.open_connections <= 4, 5, "at most 4 open connections")

        def closed(sock: socket.socket) -> bool:
            try:
                sock.settimeout(0.02)
                return sock.recv(1) == b""
            except TimeoutError:
                return False
            except OSError:
                return True

        started = time.monotonic()
        wait_for(lambda: all(closed(s) for s in slow), 5, "the slow clients to be cut off")
        assert time.monotonic() - started < 2.5
        assert server.open_connections == 0
    finally:
        for sock in slow:
            sock.close()
        server.stop()


# --------------------------------------------------------------------------- command line


BASE_ARGS = ["--import-path", "a.b:c", "--config", "cfg", "--status-file", "s.json"]
CLUSTER = "orders-0.orders.ns.svc.cluster.local:2101,orders-1.orders.ns.svc.cluster.local:2101,orders-2.orders.ns.svc.cluster.local:2101"


def test_process_id_auto_takes_the_pod_ordinal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTNAME", "orders-2")
    options = parse_options([*BASE_ARGS, "--process-id", "auto", "--addresses", CLUSTER])
    assert options.process_id == 2
    assert (
        options.addresses is not None and options.addresses[0] == "orders-0.orders.ns.svc.cluster.local:2101"
    )
    assert parse_options([*BASE_ARGS, "--process-id", "1", "--addresses", CLUSTER]).process_id == 1


@pytest.mark.parametrize(
    ("host", "process_id", "message"),
    [
        ("orders", "auto", "--process-id auto: host name 'orders' does not end in an ordinal"),
        ("orders-7", "auto", "--process-id 7 is not an index of the 3 --addresses"),
        ("orders-2", "two", "--process-id must be an integer or 'auto', not 'two'"),
    ],
)
def test_process_id_refusals_exit_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    host: str,
    process_id: str,
    message: str,
) -> None:
    monkeypatch.setenv("HOSTNAME", host)
    with pytest.raises(SystemExit) as exited:
        parse_options([*BASE_ARGS, "--process-id", process_id, "--addresses", CLUSTER])
    assert exited.value.code == EXIT_BAD_INPUT
    assert f"exit 2: bad arguments: {message}" in capsys.readouterr().err


def test_http_flags_and_env(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("LOOM_DAGSTER_HTTP_PORT", "LOOM_DAGSTER_HTTP_HOST", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    options = parse_options(BASE_ARGS)
    assert (options.http_port, options.http_host, options.live_timeout_s) == (None, "127.0.0.1", None)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")  # in a pod: the kubelet probes the pod IP
    assert parse_options(BASE_ARGS).http_host == "0.0.0.0"
    monkeypatch.setenv("LOOM_DAGSTER_HTTP_HOST", "127.0.0.2")
    assert parse_options(BASE_ARGS).http_host == "127.0.0.2"
    monkeypatch.setenv("LOOM_DAGSTER_HTTP_PORT", "8080")
    assert parse_options(BASE_ARGS).http_port == 8080
    options = parse_options([*BASE_ARGS, "--http-port", "0", "--http-host", "::", "--live-timeout", "30"])
    assert (options.http_port, options.http_host, options.live_timeout_s) == (0, "::", 30.0)
    monkeypatch.setenv("LOOM_DAGSTER_HTTP_PORT", "http")
    with pytest.raises(SystemExit) as exited:
        parse_options(BASE_ARGS)
    assert exited.value.code == EXIT_BAD_INPUT and "LOOM_DAGSTER_HTTP_PORT='http'" in capsys.readouterr().err


# --------------------------------------------------------------------------- real job processes


def test_port_in_use_fails_the_start_retryably(tmp_path: Path) -> None:
    """A port taken now may be free at the next start: exit 3 (retryable), not 2 (bad input)."""
    blocker = ProbeServer(FakeSource(None), host="127.0.0.1", port=0).start()
    try:
        done = subprocess.run(
            runtime_argv(
                tmp_path,
                tmp_path / "s.json",
                *("--sys-path", str(REPO), "--http-host", "127.0.0.1", "--http-port", str(blocker.port)),
            ),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        blocker.stop()
    assert done.returncode == EXIT_STARTUP_FAILED, done.stderr
    status = read_status(tmp_path / "s.json")
    assert status is not None and status.state == "failed" and status.exit_code == EXIT_STARTUP_FAILED
    assert status.error is not None and "cannot serve HTTP on 127.0.0.1:" in status.error


@pytest.fixture
def job_process(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Started job processes; any still alive at teardown is killed by PID."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)


def _watch_readyz(url: str, seen: list[tuple[int | None, str]], stop: threading.Event) -> None:
    """Record each distinct /readyz answer, from the job's first instants."""
    while not stop.is_set():
        answer = http_get(url, timeout=2)
        if answer[0] is not None and (not seen or seen[-1] != answer):
            seen.append(answer)
        time.sleep(0.02)


@pytest.mark.kafka
def test_real_job_serves_probes_and_metrics(
    tmp_path: Path, kafka: KafkaBroker, topic_prefix: str, job_process: list[subprocess.Popen[str]]
) -> None:
    bootstrap = kafka.bootstrap_servers
    make_topics(bootstrap, topic_prefix, ["ticks", "ticks.out", "ticks.dlq"])
    config = ticks_config(
        tmp_path / "config", brokers=bootstrap, prefix=topic_prefix, delta_uri=str(tmp_path / "delta")
    )
    (port,) = pick_free_ports(1)
    base = f"http://127.0.0.1:{port}"
    log_file = tmp_path / "job.log"
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            runtime_argv(
                config,
                tmp_path / "job.status.json",
                *("--sys-path", str(REPO), "--http-port", str(port), "--heartbeat", "0.5"),
            ),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    job_process.append(proc)
    seen: list[tuple[int | None, str]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_readyz, args=(f"{base}/readyz", seen, stop), daemon=True)
    watcher.start()
    try:
        wait_for(lambda: seen and seen[-1][0] == 200 or proc.poll() is not None, 90, "/readyz 200")
    finally:
        stop.set()
        watcher.join(5)
    assert proc.poll() is None, log_file.read_text()
    assert seen[0][0] == 503 and seen[0][1].startswith("starting"), seen
    assert seen[-1] == (200, "ready\n"), seen
    assert http_get(f"{base}/livez") == (200, "alive\n")

    def records_in() -> float:
        samples = metric_samples(http_get(f"{base}/metrics")[1])
        return samples[("loom_dagster_records_in_total", (("flow", "ticks"),))]

    before = records_in()
    produce(bootstrap, f"{topic_prefix}.ticks", [Tick(id=f"id-{i}", seq=i) for i in range(25)])
    wait_for(lambda: records_in() >= before + 25, 60, "records_in to grow by 25 in /metrics")
    code, body = http_get(f"{base}/status")
    record = json.loads(body)
    assert code == 200 and record["flow"] == "ticks" and record["records_in"] >= 25
    assert record["connected_at"] is not None and record["pid"] == proc.pid

    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == EXIT_STOPPED, log_file.read_text()
    assert http_get(f"{base}/readyz", timeout=2) == (None, ""), "the server stops with the job"
