"""A first production deploy: a flow with SQL + ClickHouse + Delta sinks in the default environment
(no ``environment=``, ``LOOM_ENV`` unset: production, where loom enforces its deploy checks).

With loom's finding present the materialization fails before anything is launched, listing the finding
in full (id, message, hint, how to silence it) and reporting the ``deploy_checks`` check; with it
silenced (or resolved), the job deploys and rows arrive in every sink.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from loom_dagster import LoomDeployResource, LoomFlowSpec, build_loom_defs
from loom_dagster.asset_check_names import DEPLOY_CHECKS
from loom_dagster.core import procfs
from loom_dagster.core.checks.loom_checks import run_flow_deploy_checks
from loom_dagster.core.deploy.store import DeploymentStore
from loom_dagster.dev.produce import produce
from tests.conftest import make_topics, shapes_config, write_yaml
from tests.flows.shapes import Event
from tests.support.deploy_env import runtime_pids_for

FLOW_KEY = dg.AssetKey(["loom", "events"])
SINKS = "delta,ch,sql,topic"
CURSOR_CHECK = "loom.cursors.E001"


@pytest.fixture()
def prod(kafka: Any, clickhouse: Any, tmp_path: Path, topic_prefix: str, monkeypatch: pytest.MonkeyPatch):
    """A production-shaped setup: topics, a ClickHouse database, a SQLite warehouse, a state dir."""
    monkeypatch.setenv("LOOM_TEST_SINKS", SINKS)
    make_topics(kafka.bootstrap_servers, topic_prefix, ["events", "events.out", "events.dlq"], 2)
    import clickhouse_connect

    client = clickhouse_connect.get_client(host="127.0.0.1", port=clickhouse.port, username="default")
    client.command(f"CREATE DATABASE IF NOT EXISTS {topic_prefix}")
    client.close()
    config = shapes_config(
        tmp_path / "config",
        brokers=kafka.bootstrap_servers,
        prefix=topic_prefix,
        ch_table=f"{topic_prefix}.events",
        ch_url=f"http://default:@127.0.0.1:{clickhouse.port}",
    )
    state = tmp_path / "state"
    yield _Prod(kafka.bootstrap_servers, topic_prefix, config, state, clickhouse.port, tmp_path)
    for pid in runtime_pids_for(state):
        import os
        import signal

        os.kill(pid, signal.SIGKILL)


class _Prod:
    def __init__(self, bootstrap: str, prefix: str, config: Path, state: Path, ch_port: int, root: Path):
        self.bootstrap, self.prefix, self.config, self.state = bootstrap, prefix, config, state
        self.ch_port, self.root = ch_port, root

    def spec(self) -> LoomFlowSpec:
        return LoomFlowSpec(
            "tests.flows.shapes:make_flow", config=self.config, env={"LOOM_TEST_SINKS": SINKS}
        )

    def materialize(self, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
        defs = build_loom_defs([self.spec()])
        resource = LoomDeployResource(
            state_dir=str(self.state), health_timeout_s=60, create_missing_tables=True
        )
        return dg.materialize(
            list(defs.assets or []),
            selection=[FLOW_KEY],
            resources={"loom": resource},
            instance=instance,
            raise_on_error=False,
        )

    def silence(self, *ids: str) -> None:
        base = (self.config / "base.yaml").read_text()
        write_yaml(self.config / "base.yaml", base + f"checks:\n  silenced: [{', '.join(ids)}]\n")

    def delta_raw_rows(self) -> int:
        from deltalake import DeltaTable

        try:
            ids = DeltaTable(str(self.config / "delta" / "events")).to_pyarrow_table().column("event_id")
        except Exception:
            return 0
        return sum(1 for i in ids.to_pylist() if str(i).startswith("raw"))

    def counts(self) -> dict[str, int]:
        import clickhouse_connect
        from deltalake import DeltaTable

        out: dict[str, int] = {}
        try:
            out["delta"] = DeltaTable(str(self.config / "delta" / "events")).to_pyarrow_table().num_rows
        except Exception:
            out["delta"] = 0
        client = clickhouse_connect.get_client(host="127.0.0.1", port=self.ch_port, username="default")
        try:
            out["clickhouse"] = int(client.command(f"SELECT count() FROM {self.prefix}.events"))
        finally:
            client.close()
        with sqlite3.connect(self.config / "warehouse.db") as db:
            out["sql"] = db.execute("SELECT count(*) FROM events").fetchone()[0]
        return out


def _check_evaluation(result: dg.ExecuteInProcessResult) -> Any:
    evaluations = [
        e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.event_specific_data.check_name == DEPLOY_CHECKS  # type: ignore[union-attr]
    ]
    assert len(evaluations) == 1, evaluations
    return evaluations[0]


def _failure_text(result: dg.ExecuteInProcessResult) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "the materialization was expected to fail"
    data = failures[0].step_failure_data  # type: ignore[union-attr]
    if data.user_failure_data is not None:
        return data.user_failure_data.description or ""
    return data.error.message if data.error else ""


@pytest.mark.kafka
@pytest.mark.slow
def test_production_deploy_blocked_then_silenced_writes_every_sink(prod: _Prod) -> None:
    """Finding present: fails before launch with the finding in full. Silenced: deploys, rows everywhere."""
    with dg.instance_for_test() as instance:
        blocked = prod.materialize(instance)
        assert not blocked.success
        text = _failure_text(blocked)
        assert CURSOR_CHECK in text
        assert "Hint:" in text and "current_key_id" in text  # loom's remedy, not cut
        assert "checks.silenced" in text
        assert "nothing was launched" in text
        assert DeploymentStore(prod.state).current("events") is None
        assert runtime_pids_for(prod.state) == []
        evaluation = _check_evaluation(blocked)
        assert evaluation.passed is False
        assert evaluation.severity == dg.AssetCheckSeverity.ERROR
        assert CURSOR_CHECK in evaluation.metadata["errors"].value

        prod.silence(CURSOR_CHECK)
        deployed = prod.materialize(instance)
        assert deployed.success, _failure_text(deployed)
        evaluation = _check_evaluation(deployed)
        assert evaluation.metadata["silenced"].value == CURSOR_CHECK
        assert DeploymentStore(prod.state).current("events") is not None

        sent = 0
        deadline = time.monotonic() + 120
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            batch = [Event(event_id=f"e{sent + i}", value=i) for i in range(50)]
            produce(prod.bootstrap, f"{prod.prefix}.events", batch, key=lambda e: e.event_id)
            # The README's wire format, as a producer in another language writes it: a msgpack map,
            # no loom library involved.
            produce(prod.bootstrap, f"{prod.prefix}.events", [plain_envelope(f"raw{sent}", 7)], raw=True)
            sent += len(batch) + 1
            time.sleep(1.0)
            counts = prod.counts()
            if all(counts[k] > 0 for k in ("delta", "clickhouse", "sql")) and prod.delta_raw_rows():
                break
        assert all(counts[k] > 0 for k in ("delta", "clickhouse", "sql")), counts
        assert prod.delta_raw_rows(), "no message written in the documented plain-msgpack format arrived"

        # Versions that cannot reach what they need are refused before the drain: the job keeps its pid.
        (pid,) = [p.pid for p in DeploymentStore(prod.state).current("events").job.processes]  # type: ignore[union-attr]
        base = prod.config / "base.yaml"
        good = base.read_text()
        for broken, expected in (
            (good.replace(f"127.0.0.1:{prod.ch_port}", "127.0.0.1:9"), "unreachable"),
            (
                good.replace(f"topics: [{prod.prefix}.events]", f"topics: [{prod.prefix}.nope]"),
                "does not exist",
            ),
            (good.replace(prod.bootstrap, "127.0.0.1:9"), "127.0.0.1:9"),
        ):
            base.write_text(broken)
            refused = prod.materialize(instance)
            assert not refused.success
            assert expected in _failure_text(refused), _failure_text(refused)
            current = DeploymentStore(prod.state).current("events")
            assert current is not None and [p.pid for p in current.job.processes] == [pid]
            assert procfs.is_alive(pid)
        base.write_text(good)


def plain_envelope(event_id: str, value: int) -> bytes:
    """One message in loom's wire format built with msgpack alone (see the README's wire format)."""
    import msgspec

    return msgspec.msgpack.encode(
        {
            "meta": {"descriptor": {"message_type": Event.loom_message_type(), "message_version": 1}},
            "payload": {"event_id": event_id, "value": value},
        }
    )


def test_deploy_checks_report_resolved_and_development(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same config with the cursor keys set passes; in development the finding is reported, not enforced."""
    monkeypatch.setenv("LOOM_TEST_SINKS", SINKS)
    config = shapes_config(tmp_path / "config")
    spec = LoomFlowSpec("tests.flows.shapes:make_flow", config=config)
    report = run_flow_deploy_checks(spec)
    assert report.environment == "production" and report.enforced and report.blocks
    assert [f.id for f in report.errors] == [CURSOR_CHECK]

    development = run_flow_deploy_checks(spec, "development")
    assert not development.enforced and not development.blocks
    assert [f.id for f in development.errors] == [CURSOR_CHECK]

    base = (config / "base.yaml").read_text()
    write_yaml(
        config / "base.yaml",
        base
        + "persistence:\n  cursors:\n    current_key_id: k1\n"
        + "    keys: {k1: {env: LOOM_TEST_CURSOR_KEY}}\n",
    )
    resolved = run_flow_deploy_checks(spec)
    assert resolved.enforced and not resolved.findings and not resolved.blocks


def test_invalid_checks_section_is_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A silenced id outside loom's scheme fails clearly (loom would refuse it at start-up too)."""
    from loom_dagster.core.errors import FlowLoadError

    monkeypatch.setenv("LOOM_TEST_SINKS", SINKS)
    config = shapes_config(tmp_path / "config")
    base = (config / "base.yaml").read_text()
    write_yaml(config / "base.yaml", base + "checks:\n  silenced: [not-an-id]\n")
    with pytest.raises(FlowLoadError, match="not-an-id"):
        run_flow_deploy_checks(LoomFlowSpec("tests.flows.shapes:make_flow", config=config))
