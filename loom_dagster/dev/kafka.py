"""A real single-node Apache Kafka broker (KRaft mode) for development and tests.

The broker runs from the official jars, which Maven copies from Maven Central into a
cache directory once (see ``kafka-pom.xml`` next to this module). No Docker needed:
only ``java`` (17+) and, for the first run, ``mvn``.

Use it from Python::

    with KafkaBroker() as broker:
        create_topics(broker.bootstrap_servers, ["events"], partitions=3)
        ...

or from a shell::

    python -m loom_dagster.dev.kafka start --state-dir .kafka    # prints the bootstrap
    python -m loom_dagster.dev.kafka status --state-dir .kafka
    python -m loom_dagster.dev.kafka stop --state-dir .kafka

If ``LOOM_DAGSTER_KAFKA_BOOTSTRAP`` is set (e.g. ``127.0.0.1:9092``) nothing is started:
that broker is checked for reachability and used as it is.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import hashlib
import importlib.resources
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.1"
ENV_BOOTSTRAP = "LOOM_DAGSTER_KAFKA_BOOTSTRAP"
ENV_CACHE = "LOOM_DAGSTER_KAFKA_CACHE"
BROKER_MAIN = "kafka.Kafka"
STORAGE_TOOL_MAIN = "kafka.tools.StorageTool"
POM_RESOURCE = "kafka-pom.xml"
MARKER_NAME = "complete.json"
RECORD_NAME = "kafka.json"
LOG_NAME = "kafka.log"
MIN_JAVA = 17

DEFAULT_STARTUP_TIMEOUT = 60.0
DEFAULT_STOP_TIMEOUT = 15.0
MVN_TIMEOUT = 900.0
_RUN_HEADER = "\n=== "
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class KafkaDevError(RuntimeError):
    """The dev broker could not be provisioned, started, reached or stopped."""


class KafkaPortInUseError(KafkaDevError):
    """A port the broker needs is taken by another process."""


# --------------------------------------------------------------------------- small utils


def _tail(path: Path | None, lines: int = 40) -> str:
    """Last ``lines`` lines of the latest run recorded in a broker log (or a note that it is missing)."""
    if path is None or not path.exists():
        return "(no log file)"
    text = path.read_text(errors="replace")
    latest = text.rsplit(_RUN_HEADER, 1)[-1]
    return "\n".join(latest.splitlines()[-lines:])


def _text_tail(text: str, lines: int = 40) -> str:
    """Last ``lines`` lines of ``text``, without ANSI colour codes."""
    return "\n".join(_ANSI.sub("", text).splitlines()[-lines:])


def _which(name: str, hint: str) -> str:
    """Absolute path of executable ``name`` or a KafkaDevError carrying ``hint``."""
    found = shutil.which(name)
    if found is None:
        raise KafkaDevError(f"`{name}` was not found on PATH. {hint}")
    return found


# --------------------------------------------------------------------------- jars


def cache_dir(version: str = KAFKA_VERSION) -> Path:
    """Where the broker jars live: ``$LOOM_DAGSTER_KAFKA_CACHE`` or ``~/.cache/loom-dagster/kafka-<v>``."""
    override = os.environ.get(ENV_CACHE)
    if override:
        return Path(override).expanduser().resolve()
    return Path.home() / ".cache" / "loom-dagster" / f"kafka-{version}"


def _pom_text() -> str:
    """The packaged pom that lists the broker's runtime classpath."""
    return importlib.resources.files("loom_dagster.dev").joinpath(POM_RESOURCE).read_text()


def _fingerprint(version: str) -> str:
    """Identifies a jar set: the Kafka version plus the pom contents."""
    return hashlib.sha256(f"{version}\n{_pom_text()}".encode()).hexdigest()


def _cache_is_complete(cache: Path, version: str) -> bool:
    """True if ``cache/lib`` was filled by a successful mvn run for this version and pom."""
    marker = cache / MARKER_NAME
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return data.get("fingerprint") == _fingerprint(version) and (cache / "lib").is_dir()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so parallel test processes run mvn only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_mvn(cache: Path, version: str) -> None:
    """Copy the broker jars from Maven Central into ``cache/lib`` (uses the default ~/.m2)."""
    mvn = _which(
        "mvn",
        "Install Maven 3.8+ (e.g. `apt-get install maven`) or point "
        f"{ENV_CACHE} at a directory whose lib/ already holds the Kafka jars.",
    )
    pom = cache / "pom.xml"
    pom.write_text(_pom_text())
    lib = cache / "lib"
    shutil.rmtree(lib, ignore_errors=True)
    cmd = [
        mvn,
        "-q",
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={lib}",
        f"-Dkafka.version={version}",
    ]
    log.info("fetching Kafka %s jars with Maven into %s", version, lib)
    try:
        done = subprocess.run(
            cmd,
            cwd=cache,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=MVN_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise KafkaDevError(f"mvn did not finish within {MVN_TIMEOUT:.0f} s: {' '.join(cmd)}") from exc
    if done.returncode != 0 or not any(lib.glob("kafka_2.13-*.jar")):
        output = _text_tail(done.stdout + done.stderr)
        raise KafkaDevError(
            f"mvn failed (exit {done.returncode}) fetching Kafka {version} jars:\n  {' '.join(cmd)}\n{output}"
        )


def ensure_jars(version: str = KAFKA_VERSION) -> Path:
    """Return the directory holding the broker's jars, running mvn first if the cache is incomplete."""
    cache = cache_dir(version)
    if _cache_is_complete(cache, version):
        return cache / "lib"
    with _file_lock(cache / ".lock"):
        if not _cache_is_complete(cache, version):
            started = time.monotonic()
            _run_mvn(cache, version)
            marker = {
                "fingerprint": _fingerprint(version),
                "version": version,
                "seconds": round(time.monotonic() - started, 2),
            }
            (cache / MARKER_NAME).write_text(json.dumps(marker))
    return cache / "lib"


# --------------------------------------------------------------------------- java


def find_java() -> str:
    """Path of a ``java`` (``$JAVA_HOME/bin/java`` first) that is at least Java 17."""
    home = os.environ.get("JAVA_HOME")
    candidate = Path(home) / "bin" / "java" if home else None
    if candidate is not None and os.access(candidate, os.X_OK):
        java = str(candidate)
    else:
        java = _which(
            "java",
            "Install a Java 17+ runtime (e.g. `apt-get install openjdk-17-jre-headless`) or set JAVA_HOME.",
        )
    major = _java_major(java)
    if major is not None and major < MIN_JAVA:
        raise KafkaDevError(
            f"Kafka {KAFKA_VERSION} needs Java {MIN_JAVA}+, but {java} is Java {major}; "
            "set JAVA_HOME to a newer JDK."
        )
    return java


def _java_major(java: str) -> int | None:
    """Major version reported by ``java -version`` (None if it cannot be parsed)."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KafkaDevError(f"could not run `{java} -version`: {exc}") from exc
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


# --------------------------------------------------------------------------- ports


def pick_free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that are free on ``host`` right now."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a server could bind ``host:port`` now (SO_REUSEADDR, like the JVM does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _require_free(ports: Iterable[int], host: str = "127.0.0.1") -> None:
    """Raise KafkaPortInUseError naming the first taken port."""
    for port in ports:
        if not port_is_free(port, host):
            raise KafkaPortInUseError(
                f"port {host}:{port} is already in use; stop whatever listens there or choose another port"
            )


def _split_bootstrap(bootstrap: str) -> tuple[str, int]:
    """Host and port of the first ``host:port`` entry of a bootstrap list."""
    first = bootstrap.split(",")[0].strip()
    first = first.split("://")[-1]
    host, _, port = first.rpartition(":")
    if not host or not port.isdigit():
        raise KafkaDevError(f"bootstrap servers must look like host:port, got {bootstrap!r}")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- configuration


def new_cluster_id() -> str:
    """A random KRaft cluster id (Kafka's base64 Uuid form; never starts with '-')."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def server_properties(
    log_dir: Path,
    port: int,
    controller_port: int,
    initial_rebalance_delay_ms: int | None = 0,
    host: str = "127.0.0.1",
) -> str:
    """``server.properties`` for a combined broker+controller node listening (and advertised) on *host*
    (loopback by default; a machine address lets containers on a local node reach it too).

    ``initial_rebalance_delay_ms``: the broker's ``group.initial.rebalance.delay.ms``, 0 for tests (an
    empty group's first join is not delayed); ``None`` keeps Kafka's default (3000).
    """
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "num.network.threads": "2",
        "num.io.threads": "2",
        "num.recovery.threads.per.data.dir": "1",
        "log.retention.hours": "168",
    }
    if initial_rebalance_delay_ms is not None:
        settings["group.initial.rebalance.delay.ms"] = str(initial_rebalance_delay_ms)
    return "".join(f"{key}={value}\n" for key, value in settings.items())


LOG4J2_PROPERTIES = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def _jvm_options(heap: str, log4j_config: Path) -> list[str]:
    """JVM flags for a small dev broker."""
    return [
        f"-Xmx{heap}",
        "-Xms64m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j_config}",
    ]


def format_storage(java: str, lib: Path, config: Path, log4j_config: Path, cluster_id: str) -> None:
    """Run Kafka's StorageTool to format a fresh KRaft log directory."""
    cmd = [
        java,
        "-Xmx256m",
        f"-Dlog4j2.configurationFile={log4j_config}",
        "-cp",
        str(lib / "*"),
        STORAGE_TOOL_MAIN,
        "format",
        "--cluster-id",
        cluster_id,
        "--config",
        str(config),
    ]
    try:
        done = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise KafkaDevError("formatting Kafka storage timed out after 120 s") from exc
    if done.returncode != 0:
        raise KafkaDevError(
            f"formatting Kafka storage failed (exit {done.returncode}):\n"
            f"{_text_tail(done.stdout + done.stderr)}"
        )


# --------------------------------------------------------------------------- clients / readiness


def _client_conf(bootstrap: str, **extra: Any) -> dict[str, Any]:
    """Quiet, quickly reconnecting admin-client settings."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "log_level": 0,
        "reconnect.backoff.max.ms": 500,
        "socket.connection.setup.timeout.ms": 5000,
    }
    conf.update(extra)
    return conf


def _tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def metadata_ok(bootstrap: str, timeout: float = 5.0) -> bool:
    """True if a broker answers a metadata request (AdminClient.list_topics) and lists itself."""
    admin = AdminClient(_client_conf(bootstrap))
    try:
        return bool(admin.list_topics(timeout=timeout).brokers)
    except KafkaException:
        return False


def check_reachable(bootstrap: str, timeout: float = 15.0) -> str:
    """Return ``bootstrap`` if a Kafka broker answers there within ``timeout`` s, else raise."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if metadata_ok(bootstrap, max(1.0, min(5.0, remaining))):
            return bootstrap
        if time.monotonic() >= deadline:
            raise KafkaDevError(f"no Kafka broker answered at {bootstrap} within {timeout:.0f} s")
        time.sleep(0.5)


def wait_until_ready(
    bootstrap: str, timeout: float, is_alive: Callable[[], bool], log_path: Path | None = None
) -> float:
    """Block until the broker answers metadata requests; return the seconds waited."""
    started = time.monotonic()
    deadline = started + timeout
    host, port = _split_bootstrap(bootstrap)
    while True:
        if not is_alive():
            _raise_startup_failure("Kafka broker exited during startup", log_path)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _raise_startup_failure(f"Kafka broker not ready at {bootstrap} after {timeout:.0f} s", log_path)
        if _tcp_open(host, port) and metadata_ok(bootstrap, max(1.0, min(5.0, remaining))):
            return time.monotonic() - started
        time.sleep(0.2)


def _raise_startup_failure(message: str, log_path: Path | None) -> None:
    """Raise a startup error with the log tail; a port clash gets its own exception type."""
    tail = _tail(log_path)
    error = KafkaPortInUseError if "Address already in use" in tail else KafkaDevError
    raise error(f"{message}; log {log_path}:\n{tail}")


# --------------------------------------------------------------------------- topics


def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    *,
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> None:
    """Create the topics that do not exist yet and wait until all ``names`` have partition leaders.

    Idempotent: existing topics are left as they are (their partition count is not changed).
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return
    deadline = time.monotonic() + timeout
    admin = AdminClient(_client_conf(bootstrap))
    try:
        existing = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise KafkaDevError(f"cannot list topics on {bootstrap}: {exc}") from exc
    missing = [
        NewTopic(name, num_partitions=partitions, replication_factor=replication_factor)
        for name in wanted
        if name not in existing
    ]
    if missing:
        futures = admin.create_topics(missing, operation_timeout=timeout, request_timeout=timeout)
        for name, future in futures.items():
            _await_topic_creation(name, future, timeout)
    _wait_for_topics(admin, wanted, deadline)


def _await_topic_creation(name: str, future: Any, timeout: float) -> None:
    """Wait for one CreateTopics result; 'already exists' counts as success."""
    try:
        future.result(timeout=timeout)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return
        raise KafkaDevError(f"creating topic {name!r} failed: {exc}") from exc


def _wait_for_topics(admin: AdminClient, names: list[str], deadline: float) -> None:
    """Poll metadata until every topic in ``names`` exists and each partition has a leader."""
    pending = names
    while True:
        try:
            topics = admin.list_topics(timeout=max(1.0, min(5.0, deadline - time.monotonic()))).topics
            pending = [name for name in names if not _topic_ready(topics.get(name))]
        except KafkaException:
            pass
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise KafkaDevError(f"topics not ready in time: {', '.join(pending)}")
        time.sleep(0.2)


def _topic_ready(meta: Any) -> bool:
    """True if topic metadata is error-free and all partitions have a leader."""
    if meta is None or meta.error is not None or not meta.partitions:
        return False
    return all(part.leader >= 0 for part in meta.partitions.values())


# --------------------------------------------------------------------------- processes by pid


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (index 0 is field 3, the state), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    fields = _proc_stat_fields(pid)
    return int(fields[22 - 3]) if fields else None


def pid_is_broker(pid: int, start_ticks: int | None) -> bool:
    """True if ``pid`` is a live (non-zombie) java process started at ``start_ticks``."""
    fields = _proc_stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    if start_ticks is not None and int(fields[22 - 3]) != start_ticks:
        return False
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return comm == "java" and BROKER_MAIN.encode() in cmdline


def _wait_gone(pid: int, start_ticks: int | None, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the broker process to disappear; True if it did."""
    deadline = time.monotonic() + timeout
    while pid_is_broker(pid, start_ticks):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def terminate_pid(pid: int, start_ticks: int | None, grace: float = DEFAULT_STOP_TIMEOUT) -> bool:
    """SIGTERM a broker we did not spawn, SIGKILL after ``grace`` s; False if it was not running."""
    if not pid_is_broker(pid, start_ticks):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, start_ticks, grace) and pid_is_broker(pid, start_ticks):
        log.warning("Kafka broker pid %s ignored SIGTERM for %.0f s; sending SIGKILL", pid, grace)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, start_ticks, 10.0)
    return True


# --------------------------------------------------------------------------- the broker


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the starting process dies (even by SIGKILL), so a
    killed test run never leaves a broker behind. Linux only; harmless elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class KafkaBroker:
    """A single-node KRaft Kafka broker run as a child ``java`` process (or an external one).

    ``bootstrap`` (or ``$LOOM_DAGSTER_KAFKA_BOOTSTRAP``) selects an existing broker instead.
    ``data_dir`` defaults to a fresh temp dir that ``stop()`` removes unless ``keep_data``.
    ``port``/``controller_port`` default to free ports picked at start on ``host`` (loopback by default;
    the broker listens and advertises there).
    ``initial_rebalance_delay_ms`` is the broker's ``group.initial.rebalance.delay.ms`` (0 here; ``None``
    keeps Kafka's default, 3000).
    """

    def __init__(
        self,
        *,
        data_dir: str | Path | None = None,
        port: int | None = None,
        controller_port: int | None = None,
        keep_data: bool = False,
        heap: str = "512m",
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        bootstrap: str | None = None,
        version: str = KAFKA_VERSION,
        die_with_parent: bool = True,
        initial_rebalance_delay_ms: int | None = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.die_with_parent = die_with_parent
        self.initial_rebalance_delay_ms = initial_rebalance_delay_ms
        self.external_bootstrap = bootstrap or os.environ.get(ENV_BOOTSTRAP) or None
        self.data_dir: Path | None = Path(data_dir).resolve() if data_dir is not None else None
        self._owns_data_dir = data_dir is None
        self.port = port
        self.controller_port = controller_port
        self._explicit_ports = port is not None or controller_port is not None
        self.keep_data = keep_data
        self.heap = heap
        self.startup_timeout = startup_timeout
        self.version = version
        self.start_ticks: int | None = None
        self.timings: dict[str, float] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = False

    # ----- public properties

    @property
    def external(self) -> bool:
        """True if this wraps an already running broker (nothing is spawned)."""
        return self.external_bootstrap is not None

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for clients; only valid once started."""
        if self.external_bootstrap is not None:
            return self.external_bootstrap
        if self.port is None or not self._started:
            raise KafkaDevError("KafkaBroker is not started")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the broker's java process (None when external or stopped)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """File receiving the broker's stdout/stderr (None when external)."""
        return self.data_dir / LOG_NAME if self.data_dir is not None else None

    @property
    def start_seconds(self) -> float | None:
        """Wall time of the last ``start()``, jar provisioning included."""
        return self.timings.get("start")

    # ----- lifecycle

    def start(self) -> KafkaBroker:
        """Start (or, when external, check) the broker and wait until it answers metadata requests."""
        if self._started:
            return self
        began = time.monotonic()
        if self.external_bootstrap is not None:
            check_reachable(self.external_bootstrap)
        else:
            self._start_managed()
        self._started = True
        self.timings["start"] = time.monotonic() - began
        log.info("Kafka broker ready at %s in %.1f s", self.bootstrap_servers, self.timings["start"])
        return self

    def stop(self) -> None:
        """Stop the child process (SIGTERM, then SIGKILL) and remove an owned temp data dir."""
        self._started = False
        if self.external:
            return
        self._terminate()
        atexit.unregister(self._atexit_stop)
        if self._owns_data_dir and not self.keep_data and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def restart(self) -> KafkaBroker:
        """Stop the broker and start it again on the same ports with the same data (simulates a bounce)."""
        if self.external:
            raise KafkaDevError(
                f"cannot restart an external broker ({ENV_BOOTSTRAP}={self.external_bootstrap})"
            )
        if not self._started or self.port is None or self.controller_port is None:
            raise KafkaDevError("restart() needs a started KafkaBroker")
        began = time.monotonic()
        self._terminate()
        self.timings["stop"] = time.monotonic() - began
        _require_free([self.port, self.controller_port])
        self._launch(find_java(), ensure_jars(self.version))
        self._await_ready()
        self.timings["restart"] = time.monotonic() - began
        log.info("Kafka broker restarted at %s in %.1f s", self.bootstrap_servers, self.timings["restart"])
        return self

    def detach(self) -> None:
        """Forget the child so it keeps running after this Python process exits (CLI ``start``)."""
        atexit.unregister(self._atexit_stop)
        if self._proc is not None:
            self._proc.returncode = 0  # suppress Popen's "still running" warning; we never wait on it
        self._proc = None

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.external_bootstrap or (f"{self.host}:{self.port}" if self.port else "not started")
        return f"KafkaBroker({where}, pid={self.pid})"

    # ----- internals

    def _start_managed(self) -> None:
        """Provision jars, prepare the data dir and boot the broker (retrying a lost port race)."""
        t0 = time.monotonic()
        lib = ensure_jars(self.version)
        java = find_java()
        self.timings["jars"] = time.monotonic() - t0
        self._prepare_data_dir()
        attempts = 1 if self._explicit_ports else 3
        for attempt in range(1, attempts + 1):
            try:
                self._boot(java, lib)
                return
            except KafkaPortInUseError:
                self._terminate()
                if attempt == attempts:
                    raise
                log.info("port race lost, retrying Kafka start with new ports")
                self.port = self.controller_port = None
            except BaseException:
                self._terminate()
                raise

    def _prepare_data_dir(self) -> None:
        """Create the data dir (a fresh temp dir unless one was given) and remember to stop at exit."""
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="loom-kafka-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self._atexit_stop)

    def _boot(self, java: str, lib: Path) -> None:
        """Pick/check ports, write config, format storage if needed, launch and wait."""
        assert self.data_dir is not None
        if self.port is None or self.controller_port is None:
            picked = pick_free_ports(2, self.host)
            self.port = self.port or picked[0]
            self.controller_port = self.controller_port or picked[1]
        _require_free([self.port, self.controller_port], self.host)
        log_dir = self.data_dir / "kraft-logs"
        (self.data_dir / "server.properties").write_text(
            server_properties(
                log_dir, self.port, self.controller_port, self.initial_rebalance_delay_ms, self.host
            )
        )
        (self.data_dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES)
        if not (log_dir / "meta.properties").exists():
            t0 = time.monotonic()
            format_storage(
                java,
                lib,
                self.data_dir / "server.properties",
                self.data_dir / "log4j2.properties",
                new_cluster_id(),
            )
            self.timings["format"] = time.monotonic() - t0
        self._launch(java, lib)
        self._await_ready()

    def _launch(self, java: str, lib: Path) -> None:
        """Spawn ``java kafka.Kafka server.properties`` in its own session, logging to ``log_path``."""
        assert self.data_dir is not None and self.log_path is not None
        cmd = [
            java,
            *_jvm_options(self.heap, self.data_dir / "log4j2.properties"),
            "-cp",
            str(lib / "*"),
            BROKER_MAIN,
            str(self.data_dir / "server.properties"),
        ]
        with self.log_path.open("ab") as out:
            out.write(
                f"{_RUN_HEADER}{time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode()
            )
            out.flush()
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        self.start_ticks = process_start_ticks(self._proc.pid)

    def _await_ready(self) -> None:
        """Wait for the spawned broker to answer; record the boot time."""
        proc = self._proc
        assert proc is not None and self.port is not None
        self.timings["boot"] = wait_until_ready(
            f"{self.host}:{self.port}", self.startup_timeout, lambda: proc.poll() is None, self.log_path
        )

    def _terminate(self, grace: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop our child by PID: SIGTERM, wait up to ``grace`` s, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("Kafka broker pid %s ignored SIGTERM for %.0f s; sending SIGKILL", proc.pid, grace)
            proc.kill()
            proc.wait(timeout=10)

    def _atexit_stop(self) -> None:
        """Interpreter-exit safety net: never leave an orphaned broker behind."""
        with contextlib.suppress(Exception):
            self.stop()


# --------------------------------------------------------------------------- CLI


def _record_path(state_dir: Path) -> Path:
    return state_dir / RECORD_NAME


def read_record(state_dir: Path) -> dict[str, Any] | None:
    """The ``kafka.json`` written by ``start`` (None if absent or unreadable)."""
    try:
        data = json.loads(_record_path(state_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_record(state_dir: Path, record: dict[str, Any]) -> None:
    """Atomically write ``kafka.json``."""
    tmp = state_dir / f".{RECORD_NAME}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, _record_path(state_dir))


def _record_alive(record: dict[str, Any]) -> bool:
    """True if the record's pid is still the broker it started."""
    pid = record.get("pid")
    return isinstance(pid, int) and pid_is_broker(pid, record.get("start_ticks"))


def cli_start(state_dir: Path, port: int | None, heap: str, timeout: float) -> int:
    """Start a detached broker and record it in ``state_dir/kafka.json``; print the bootstrap."""
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    old = read_record(state_dir)
    if old is not None and (old.get("external") or _record_alive(old)):
        print(
            f"a broker is already recorded in {_record_path(state_dir)} (pid {old.get('pid')}, "
            f"bootstrap {old.get('bootstrap')}); stop it first",
            file=sys.stderr,
        )
        return 1
    external = os.environ.get(ENV_BOOTSTRAP)
    if external:
        check_reachable(external)
        _write_record(state_dir, {"external": True, "bootstrap": external})
        print(external)
        return 0
    data_dir = Path(tempfile.mkdtemp(prefix="kafka-data-", dir=state_dir))
    broker = KafkaBroker(
        data_dir=data_dir, port=port, heap=heap, startup_timeout=timeout, die_with_parent=False
    )
    try:
        broker.start()
    except BaseException:
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    _write_record(
        state_dir,
        {
            "external": False,
            "pid": broker.pid,
            "start_ticks": broker.start_ticks,
            "bootstrap": broker.bootstrap_servers,
            "log_path": str(broker.log_path),
            "data_dir": str(data_dir),
            "owns_data_dir": True,
            "port": broker.port,
            "controller_port": broker.controller_port,
            "kafka_version": broker.version,
            "started_at": time.time(),
            "start_seconds": round(broker.start_seconds or 0.0, 2),
        },
    )
    print(
        f"Kafka {broker.version} (pid {broker.pid}) ready in {broker.start_seconds:.1f} s; "
        f"log {broker.log_path}; stop with: python -m loom_dagster.dev.kafka stop --state-dir {state_dir}",
        file=sys.stderr,
    )
    broker.detach()
    print(broker.bootstrap_servers)
    return 0


def cli_stop(state_dir: Path, keep_data: bool, grace: float) -> int:
    """Stop the recorded broker by pid (after checking pid + start time) and clean up."""
    state_dir = state_dir.resolve()
    record = read_record(state_dir)
    if record is None:
        print(f"no broker recorded in {state_dir}; nothing to stop", file=sys.stderr)
        return 0
    if record.get("external"):
        print(f"external broker {record.get('bootstrap')} left running", file=sys.stderr)
    else:
        pid = record.get("pid")
        if isinstance(pid, int) and terminate_pid(pid, record.get("start_ticks"), grace):
            print(f"stopped Kafka broker pid {pid}", file=sys.stderr)
        else:
            print(
                f"Kafka broker pid {pid} was not running (or the pid now belongs to another "
                "process); nothing signalled",
                file=sys.stderr,
            )
        data_dir = record.get("data_dir")
        if data_dir and record.get("owns_data_dir") and not keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
    _record_path(state_dir).unlink(missing_ok=True)
    return 0


def cli_status(state_dir: Path) -> int:
    """Print the recorded broker's state as JSON; exit 0 only if it is running and reachable."""
    record = read_record(state_dir.resolve())
    if record is None:
        print(json.dumps({"running": False, "reason": f"no {RECORD_NAME} in {state_dir}"}))
        return 1
    running = True if record.get("external") else _record_alive(record)
    reachable = running and metadata_ok(str(record["bootstrap"]), 5.0)
    print(json.dumps({**record, "running": running, "reachable": reachable}, indent=2))
    return 0 if running and reachable else 1


def _parser() -> argparse.ArgumentParser:
    """Argument parser for ``python -m loom_dagster.dev.kafka``."""
    parser = argparse.ArgumentParser(
        prog="python -m loom_dagster.dev.kafka", description="Run a local single-node Kafka broker (KRaft)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a detached broker and print its bootstrap servers")
    start.add_argument("--port", type=int, default=None, help="broker port (default: a free one)")
    start.add_argument("--heap", default="512m", help="JVM max heap (default 512m)")
    start.add_argument("--timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT, help="startup timeout, s")
    stop = sub.add_parser("stop", help="stop the broker recorded in the state dir")
    stop.add_argument("--keep-data", action="store_true", help="keep the broker's data dir")
    stop.add_argument("--timeout", type=float, default=DEFAULT_STOP_TIMEOUT, help="SIGTERM grace, s")
    status = sub.add_parser("status", help="show the recorded broker and whether it answers")
    for child in (start, stop, status):
        child.add_argument(
            "--state-dir",
            type=Path,
            required=True,
            help=f"directory holding {RECORD_NAME} and the broker's data dir",
        )
    sub.add_parser("jars", help="fetch the broker jars if needed and print their directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    args = _parser().parse_args(argv)
    try:
        if args.command == "start":
            return cli_start(args.state_dir, args.port, args.heap, args.timeout)
        if args.command == "stop":
            return cli_stop(args.state_dir, args.keep_data, args.timeout)
        if args.command == "status":
            return cli_status(args.state_dir)
        print(ensure_jars())
        return 0
    except KafkaDevError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
