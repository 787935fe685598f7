"""The decisions of ``loom_dagster.core.deploy.progress`` on hand-made readings (no broker; the real-broker tests are
``tests/integration/test_progress_gate.py``)."""

from __future__ import annotations

import msgspec

from loom_dagster.core.deploy.progress import (
    KafkaInput,
    PartitionProgress,
    ProgressGate,
    ProgressReading,
    WatchState,
    observe_tick,
    previous_deployment,
    watch_eligibility,
)
from loom_dagster.core.deploy.store import Deployment
from loom_dagster.core.kafka.cluster import KafkaCluster
from loom_dagster.core.kafka.lag_eval import FlowLag
from loom_dagster.core.kafka.lag_status import LagStatus

KAFKA = KafkaInput(KafkaCluster("127.0.0.1:9"), "g", ("t",))


def _gate(**kwargs: object) -> ProgressGate:
    return ProgressGate("f", KAFKA, {"t": {0: 10, 1: 20}}, 60, **kwargs)  # type: ignore[arg-type]


def _reading(
    end: tuple[int, int], committed: tuple[int | None, int | None], **kwargs: object
) -> ProgressReading:
    parts = (
        PartitionProgress("t", 0, 10, end[0], committed[0]),
        PartitionProgress("t", 1, 20, end[1], committed[1]),
    )
    return ProgressReading(at=0.0, partitions=parts, job_state="healthy", **kwargs)  # type: ignore[arg-type]


def test_gate_passes_on_commits_rows_or_no_input() -> None:
    gate = _gate()
    moved = gate.judge(_reading((15, 30), (12, 20)), 2.0)
    assert moved is not None and moved.passed and moved.signal == "commits"
    assert moved.committed_past == {"t[0]": 2}
    rows = gate.judge(_reading((15, 30), (10, 20), sink_rows={"out": 5}), 2.0)
    assert rows is not None and rows.passed and rows.signal == "sink_rows"
    idle = gate.judge(_reading((10, 20), (10, 20)), 0.1)
    assert idle is not None and idle.passed and idle.signal == "no_input"
    assert "no input to consume" in idle.message


def test_gate_waits_then_fails_naming_the_signals() -> None:
    gate = _gate()
    reading = _reading((15, 20), (10, 20), records_in=3)
    assert gate.judge(reading, 5.0) is None
    failed = gate.judge(reading, 60.0, final=True)
    assert failed is not None and not failed.passed and failed.signal == "none"
    assert failed.message == (
        "no commit past the start offsets on t[0] and no sink rows in 60 s while 5 messages were waiting "
        "(the job read 3 record(s) and moved none)"
    )
    dead = gate.judge(msgspec.structs.replace(reading, job_state="dead", job_reason="exit 1"), 1.0)
    assert dead is not None and not dead.passed and dead.signal == "dead"


def test_gate_forgives_a_table_buffer_only_for_table_only_flows() -> None:
    reading = _reading((15, 20), (10, 20), records_in=5)
    buffered = _gate(tables_only=True, buffer_rows=1000).judge(reading, 60.0, final=True)
    assert buffered is not None and buffered.passed and buffered.signal == "buffered"
    with_topic = _gate(tables_only=False, buffer_rows=1000).judge(reading, 60.0, final=True)
    assert with_topic is not None and not with_topic.passed


def _lag(status: LagStatus, total: int) -> FlowLag:
    return FlowLag("f", "g", status, f"{status.value} reason", total)


def test_watch_sees_burrow_stalls_and_silent_sinks() -> None:
    assert observe_tick(WatchState(), _lag(LagStatus.STALL, 50), 10) == "Kafka lag STALL: STALL reason"
    assert observe_tick(WatchState(), _lag(LagStatus.OK, 0), 10) is None
    state = WatchState()
    verdicts = [observe_tick(state, _lag(LagStatus.OK, lag), 7) for lag in (5, 9, 14)]
    assert verdicts[:2] == [None, None]
    assert verdicts[2] is not None and "lag grew from 5 to 14" in verdicts[2]
    steady = WatchState()
    assert [observe_tick(steady, _lag(LagStatus.OK, 5), rows) for rows in (1, 2, 3)] == [None] * 3


def _record(plan: str, at: float, previous: str | None = None, **extra: object) -> Deployment:
    raw = {
        "flow_name": "f",
        "plan_hash": plan,
        "config_hash": "c",
        "deployed_at": at,
        "previous_plan_hash": previous,
        "extra": extra,
        "job": {
            "flow_name": "f",
            "launcher": "local",
            "host": "h",
            "processes": [],
            "log_path": "",
            "started_at": at,
            "request": {
                "flow_name": "f",
                "import_path": "m:f",
                "config_files": [],
                "environment": "test",
                "plan_hash": plan,
                "config_hash": "c",
            },
        },
    }
    return Deployment.decode(msgspec.json.encode(raw))


def test_previous_deployment_and_eligibility() -> None:
    v1, v1_restarted = _record("p1", 1.0), msgspec.structs.replace(_record("p1", 1.0), restarts=1)
    v2 = _record("p2", 2.0, "p1", previous_progress={"moving": True})
    assert previous_deployment([v1, v1_restarted, v2], v2) == v1_restarted
    assert previous_deployment([v1, v2], v1) is None
    assert watch_eligibility(v2) is None
    assert "not moving" in str(
        watch_eligibility(_record("p2", 2.0, "p1", previous_progress={"moving": False}))
    )
    restored = _record("p1", 1.0, rolled_back_from={"plan_hash": "p2", "reason": "stall"})
    assert "not watched until a new deploy" in str(watch_eligibility(restored))
