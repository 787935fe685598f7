"""Kafka coordinator requests run in a child process (``loom_dagster.core.kafka.isolation``): the child's
answer comes back as is, and its death (an abort, as librdkafka#4605 causes) becomes a clear,
retryable error in the caller, which lives on. The abort is real: the child process calls ``os.abort()``
at start-up (a ``sitecustomize`` on its path)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from loom_dagster.core.checks.fence import describe_fences
from loom_dagster.core.kafka.cluster import KafkaCluster, LagTarget
from loom_dagster.core.kafka.isolation import KafkaClientCrashed, in_child_process
from loom_dagster.core.kafka.offsets import fetch_offsets
from loom_dagster.core.kafka.snapshot import OffsetSnapshotError, snapshot_offsets
from loom_dagster.dev.kafka import KafkaBroker
from tests.support.helpers import silent_listener


@pytest.fixture()
def aborting_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Python child started from here aborts (SIGABRT) as soon as it starts."""
    (tmp_path / "sitecustomize.py").write_text("import os\nos.abort()\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))


def test_an_aborted_child_is_a_retryable_connection_error(aborting_children: None) -> None:
    with silent_listener() as port:
        cluster = KafkaCluster(f"127.0.0.1:{port}")
        with pytest.raises(KafkaClientCrashed) as caught:
            describe_fences(cluster, ["g.loom-fence"], 1.0)
        assert isinstance(caught.value, ConnectionError)
        text = str(caught.value)
        assert (
            "died of SIGABRT" in text and "librdkafka#4605" in text and "this process is unaffected" in text
        )

        with pytest.raises(OffsetSnapshotError, match="died of SIGABRT"):
            snapshot_offsets(cluster, ["t"], ["g"], timeout_s=1.0)

        target = LagTarget(name="f", group="g", topics=("t",), cluster=cluster)
        fetch = fetch_offsets([target], timeout_s=1.0)  # never raises: every target unreachable, with why
        assert "died of SIGABRT" in (fetch.targets["f"].unreachable or "")
        assert fetch.clusters[0].error is not None


def test_only_registered_modules_run_in_a_child() -> None:
    @in_child_process()
    def elsewhere(timeout_s: float = 1.0) -> int:
        return 1

    with pytest.raises(ValueError, match="not a Kafka call that runs in a child process"):
        elsewhere()
    assert elsewhere.in_process() == 1  # type: ignore[attr-defined]


@pytest.mark.kafka
def test_the_child_answers_as_the_caller_would(kafka: KafkaBroker, topic_prefix: str) -> None:
    cluster = KafkaCluster(kafka.bootstrap_servers)
    groups = [f"{topic_prefix}.loom-fence"]
    deadline = time.monotonic() + 60
    while True:  # a fresh broker answers NOT_COORDINATOR until its offsets topic is ready
        try:
            describe_fences.in_process(cluster, groups, 10.0)  # type: ignore[attr-defined]
            break
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert describe_fences(cluster, groups, 10.0) == describe_fences.in_process(cluster, groups, 10.0)  # type: ignore[attr-defined]
    assert os.environ.get("LOOM_DAGSTER_KAFKA_CHILD") is None  # the caller itself is not the child
    with pytest.raises(OffsetSnapshotError):  # the child's own exception comes back with its type
        snapshot_offsets(KafkaCluster("127.0.0.1:9"), ["t"], ["g"], timeout_s=1.0)
