"""Shared fixtures: a real Kafka broker (KRaft, official jars), a real ClickHouse engine behind its HTTP
interface, loom config writers and Dagster instances."""

from __future__ import annotations

import os
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from loom_dagster.dev.kafka import KafkaBroker, create_topics


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaBroker]:
    """A real single-node Kafka broker for the whole session (or ``LOOM_DAGSTER_KAFKA_BOOTSTRAP``)."""
    with KafkaBroker() as broker:
        yield broker


class _ClickHouse:
    """Where the session's ClickHouse answers."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="session")
def clickhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_ClickHouse]:
    """A real ClickHouse engine (chdb) behind our HTTP front on loopback, in a process of its own
    (``python -m loom_dagster.dev.clickhouse serve``), stopped by its PID at the end.

    It speaks the part of ClickHouse's HTTP interface that clickhouse-connect uses, which is what
    loom's ClickHouse sink and our checks talk to. Not in the test process: chdb runs one engine per
    process, and tests/dev/test_dev_clickhouse.py opens engines of its own there, in whatever order.
    """
    import subprocess
    import sys

    data_dir = tmp_path_factory.mktemp("clickhouse")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loom_dagster.dev.clickhouse",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=(data_dir / "server.log").open("wb"),
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(
                f"the ClickHouse server did not start: {(data_dir / 'server.log').read_text()[-2000:]}"
            )
        yield _ClickHouse(url)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


@pytest.fixture()
def topic_prefix() -> str:
    """A unique prefix, so tests sharing the session broker never share topics or groups."""
    return f"t{uuid.uuid4().hex[:8]}"


def write_yaml(path: Path, text: str) -> Path:
    """Write dedented YAML, creating parent directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def shapes_config(
    directory: Path,
    *,
    brokers: str = "127.0.0.1:9",
    prefix: str = "t",
    delta_uri: str | None = None,
    ch_table: str = "analytics.events",
    ch_url: str = "http://default:hunter2@127.0.0.1:8123",
    sql_url: str | None = None,
) -> Path:
    """A config directory for ``tests.flows.shapes`` (base.yaml only)."""
    delta = delta_uri or str(directory / "delta" / "events")
    sql = sql_url or f"sqlite+aiosqlite:///{directory / 'warehouse.db'}"
    write_yaml(
        directory / "base.yaml",
        f"""
        kafka:
          consumer:
            brokers: ["{brokers}"]
            group_id: {prefix}-events
            topics: [{prefix}.events]
            delivery: at_least_once
          producer:
            brokers: ["{brokers}"]
          producers:
            events_out: {{brokers: ["{brokers}"], topic: {prefix}.events.out}}
            events_dlq: {{brokers: ["{brokers}"], topic: {prefix}.events.dlq}}
        streaming:
          sinks:
            events_delta: {{uri: "{delta}", table: events}}
            events_ch: {{database: ch, table: {ch_table}}}
            events_sql: {{database: warehouse, table: events}}
        database:
          ch: {{url: "{ch_url}"}}
          warehouse: {{url: "{sql}"}}
        """,
    )
    return directory


@pytest.fixture()
def sinks_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Monkeypatch preset to the default sinks of ``tests.flows.shapes``."""
    monkeypatch.setenv("LOOM_TEST_SINKS", "delta,ch,topic")
    return monkeypatch


def ticks_config(
    directory: Path,
    *,
    brokers: str,
    prefix: str,
    delta_uri: str,
    buffer_max_records: int = 1000,
    buffer_max_age_s: float = 1.0,
    extra_sink: str = "",
) -> Path:
    """A config directory for ``tests.flows.delta_only`` (Kafka -> Delta + topic)."""
    write_yaml(
        directory / "base.yaml",
        f"""
        kafka:
          consumer:
            brokers: ["{brokers}"]
            group_id: {prefix}-ticks
            topics: [{prefix}.ticks]
            delivery: at_least_once
            auto_offset_reset: earliest
          producer:
            brokers: ["{brokers}"]
          producers:
            ticks_out: {{brokers: ["{brokers}"], topic: {prefix}.ticks.out}}
            ticks_dlq: {{brokers: ["{brokers}"], topic: {prefix}.ticks.dlq}}
        streaming:
          runtime: {{epoch_interval_ms: 200}}
          sinks:
            ticks_delta:
              uri: "{delta_uri}"
              table: ticks
              buffer_max_records: {buffer_max_records}
              buffer_max_age_s: {buffer_max_age_s}{extra_sink}
        """,
    )
    return directory


def make_topics(bootstrap: str, prefix: str, names: list[str], partitions: int = 1) -> list[str]:
    """Create ``<prefix>.<name>`` topics; return their names."""
    topics = [f"{prefix}.{n}" for n in names]
    create_topics(bootstrap, topics, partitions=partitions)
    return topics


@pytest.fixture(scope="session", autouse=True)
def _defs_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Definitions loads keep their defs state (``loom_dagster.core.flows.defs_state``) in a directory of the
    test session, not in ``~/.loom-dagster``; subprocesses (dagster dev, code servers) inherit it."""
    before = os.environ.get("LOOM_DAGSTER_DEFS_STATE")
    os.environ["LOOM_DAGSTER_DEFS_STATE"] = str(tmp_path_factory.mktemp("defs-state"))
    yield
    if before is None:
        os.environ.pop("LOOM_DAGSTER_DEFS_STATE", None)
    else:
        os.environ["LOOM_DAGSTER_DEFS_STATE"] = before


@pytest.fixture(autouse=True)
def _no_loom_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their loom environment explicitly."""
    monkeypatch.delenv("LOOM_ENV", raising=False)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def _no_leaked_defs_state_storage() -> Iterator[None]:
    """Each test starts without a defs-state storage left behind by another test's Dagster instance
    (a yield fixture's instance can leave a dead one in Dagster's context variable)."""
    from dagster._core.storage.defs_state.base import set_defs_state_storage

    with set_defs_state_storage(None):
        yield


from tests.support.k8s.fixtures import k8s_namespace, k8s_node, kube_cluster  # noqa: E402, F401
from tests.support.k8s.job_image import job_image_fixture  # noqa: E402, F401
