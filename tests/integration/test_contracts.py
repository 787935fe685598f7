"""Contracts between chained flows, on the real broker: ``chain_a`` (ticks -> rows topic) and ``chain_b``
(rows -> Delta) deployed through Dagster ``materialize`` with the real resource, then deploys of A with a
breaking struct (refused before anything is drained), a compatible one (passes, listed) and the breaking
one accepted by the run config (deploys; B's dead-letter topic then receives what it cannot decode, as the
refusal predicted). Flow modules: ``tests/flows/chained.py``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from confluent_kafka import Consumer, TopicPartition

from loom_dagster import DeploymentStore, LoomDeployResource, LoomFlowSpec, build_loom_defs
from loom_dagster.core import procfs
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.dev.produce import produce
from tests.conftest import make_topics, write_yaml
from tests.flows.delta_only import Tick
from tests.support.deploy_env import kill_deployed_jobs, runtime_pids_for
from tests.support.helpers import materialization_metadata, step_failure_message, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

A = dg.AssetKey(["loom", "chain_a"])
B = dg.AssetKey(["loom", "chain_b"])
ACCEPT = {"ops": {"loom_deploy": {"config": {"accept_contract_change": True}}}}


@dataclass
class Chain:
    """Configs for both flows on a unique prefix, a state dir, and readers of what B wrote."""

    bootstrap: str
    prefix: str
    root: Path

    def __post_init__(self) -> None:
        make_topics(self.bootstrap, self.prefix, ["ticks", "rows", "a.dlq", "b.dlq"])
        b, p = self.bootstrap, self.prefix
        self.delta_uri = str(self.root / "delta" / "rows")
        self.config_a = write_yaml(
            self.root / "a" / "base.yaml",
            f"""
            kafka:
              consumer: {{brokers: ["{b}"], group_id: {p}-a, topics: [{p}.ticks], delivery: at_least_once,
                          auto_offset_reset: earliest}}
              producer: {{brokers: ["{b}"]}}
              producers:
                rows: {{brokers: ["{b}"], topic: {p}.rows}}
                chain_a_dlq: {{brokers: ["{b}"], topic: {p}.a.dlq}}
            streaming:
              runtime: {{epoch_interval_ms: 200}}
            """,
        ).parent
        self.config_b = write_yaml(
            self.root / "b" / "base.yaml",
            f"""
            kafka:
              consumer: {{brokers: ["{b}"], group_id: {p}-b, topics: [{p}.rows], delivery: at_least_once,
                          auto_offset_reset: earliest}}
              producer: {{brokers: ["{b}"]}}
              producers:
                chain_b_dlq: {{brokers: ["{b}"], topic: {p}.b.dlq}}
            streaming:
              runtime: {{epoch_interval_ms: 200}}
              sinks:
                rows_delta: {{uri: "{self.delta_uri}", table: rows, buffer_max_records: 1, buffer_max_age_s: 0.2}}
            """,
        ).parent
        self.state_dir = self.root / "state"
        self.store = DeploymentStore(self.state_dir)
        self.sent = 0

    def specs(self, a: str = "chain_a", b: str = "chain_b") -> list[LoomFlowSpec]:
        """The code location: variant *a* of flow A and *b* of flow B."""
        return [
            LoomFlowSpec(f"tests.flows.chained:{a}", config=self.config_a, environment="test"),
            LoomFlowSpec(f"tests.flows.chained:{b}", config=self.config_b, environment="test"),
        ]

    def materialize(
        self,
        selection: Any,
        a: str = "chain_a",
        b: str = "chain_b",
        run_config: dict[str, Any] | None = None,
    ) -> dg.ExecuteInProcessResult:
        defs = build_loom_defs(self.specs(a, b))
        with dg.instance_for_test() as instance:
            return dg.materialize(
                list(defs.assets or []),
                selection=selection,
                resources={"loom": LoomDeployResource(state_dir=str(self.state_dir), health_timeout_s=60.0)},
                instance=instance,
                run_config=run_config or {},
                raise_on_error=False,
            )

    def produce(self, count: int) -> None:
        ticks = [Tick(id=f"id-{i}", seq=i) for i in range(self.sent, self.sent + count)]
        produce(self.bootstrap, f"{self.prefix}.ticks", ticks, key=lambda t: t.id)
        self.sent += count

    def delta_rows(self) -> int:
        from deltalake import DeltaTable

        try:
            return DeltaTable(self.delta_uri).to_pyarrow_table(columns=["id"]).num_rows
        except Exception:
            return 0

    def messages(self, topic: str) -> int:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"{self.prefix}-probe"})
        try:
            name = f"{self.prefix}.{topic}"
            low, high = consumer.get_watermark_offsets(TopicPartition(name, 0), timeout=10)
            return int(high - low)
        finally:
            consumer.close()

    def pid(self, flow: str) -> int:
        current = self.store.current(flow)
        assert current is not None, f"flow {flow!r} is not deployed"
        return current.job.processes[0].pid

    def stop_everything(self) -> None:
        kill_deployed_jobs(self.store, ["chain_a", "chain_b"], self.state_dir)


@pytest.fixture()
def chain(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[Chain]:
    bench = Chain(kafka.bootstrap_servers, topic_prefix, tmp_path)
    try:
        yield bench
    finally:
        bench.stop_everything()


def _check_evaluation(result: dg.ExecuteInProcessResult) -> Any:
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def test_a_breaking_struct_is_refused_before_drain_a_compatible_one_passes_an_accepted_one_deploys(
    chain: Chain,
) -> None:
    # B and A deployed, data flows A -> rows -> B -> Delta
    first = chain.materialize([B, A])
    assert first.success, step_failure_message(first)
    chain.produce(5)
    wait_for(lambda: chain.delta_rows() >= 5, timeout_s=60)
    pid_a, pid_b = chain.pid("chain_a"), chain.pid("chain_b")
    record_a = chain.store.current("chain_a")
    assert record_a is not None and "contracts" in record_a.extra  # the struct A writes, recorded
    jobs = sorted(runtime_pids_for(chain.state_dir))

    # A renames `amount` (B requires it): refused before anything is drained or launched
    started = time.monotonic()
    refused = chain.materialize([A], a="chain_a_breaking")
    refused_s = time.monotonic() - started
    message = step_failure_message(refused)
    assert "Deploy of flow 'chain_a' refused" in message and "flow 'chain_b' reads" in message, message
    assert (
        "amount: missing from the writer (BREAKING)" in message
        and "Renamed? the writer has `total`" in message
    )
    assert "accept_contract_change: true" in message and "nothing was drained or launched" in message
    assert "another code location" in message
    failure = next(e for e in refused.all_events if e.event_type_value == "STEP_FAILURE")
    failure_metadata = failure.event_specific_data.user_failure_data.metadata
    assert failure_metadata["loom/error"].value == "ContractBroken"
    assert failure_metadata["loom/contracts"].value["pairs"][0]["reader_flow"] == "chain_b"
    assert chain.store.current("chain_a") == record_a  # record untouched
    assert procfs.is_alive(pid_a) and chain.pid("chain_a") == pid_a  # A keeps its job
    assert sorted(runtime_pids_for(chain.state_dir)) == jobs  # nothing launched, nothing stopped
    print(f"refused in {refused_s:.2f}s")

    # the same comparison on demand: only A's deploy_checks check, nothing deployed
    checked = chain.materialize(
        dg.AssetSelection.checks(dg.AssetCheckKey(A, "deploy_checks")), a="chain_a_breaking"
    )
    evaluation = _check_evaluation(checked)
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert "amount: missing from the writer (BREAKING)" in evaluation.metadata["contracts"].value
    assert evaluation.metadata["loom/contracts"].value["pairs"][0]["compatible"] is False
    assert chain.pid("chain_a") == pid_a and sorted(runtime_pids_for(chain.state_dir)) == jobs

    # a compatible change (a new field with a default) passes, and is listed
    compatible = chain.materialize([A], a="chain_a_compatible")
    assert compatible.success, step_failure_message(compatible)
    metadata = materialization_metadata(compatible)
    report = metadata["loom/contracts"]
    (pair,) = report["pairs"]
    assert pair["reader_flow"] == "chain_b" and pair["compatible"] is True
    assert any(c.startswith("region: added in the writer (compatible)") for c in pair["compatible_changes"])
    (changed,) = report["changes_since_deployed"]
    assert changed["previous"].endswith(".Row") and changed["current"].endswith(".RowRegion")
    assert chain.pid("chain_a") != pid_a and chain.pid("chain_b") == pid_b
    chain.produce(5)
    wait_for(lambda: chain.delta_rows() >= 10, timeout_s=60)

    # the breaking change, accepted: it deploys, and B then sends what it cannot decode to its DLQ
    dlq_before = chain.messages("b.dlq")
    accepted = chain.materialize([A], a="chain_a_breaking", run_config=ACCEPT)
    assert accepted.success, step_failure_message(accepted)
    assert materialization_metadata(accepted)["loom/contracts"]["accepted"] is True
    rows_before = chain.delta_rows()
    chain.produce(3)
    wait_for(lambda: chain.messages("b.dlq") >= dlq_before + 3, timeout_s=60)
    assert chain.delta_rows() == rows_before  # nothing decoded into B's table


def test_a_reader_requiring_a_new_field_is_refused_naming_the_writer(chain: Chain) -> None:
    """B's new struct requires ``currency``, which A does not send: refused with A named; the topic asset
    of the code location shows the same verdict (``loom/contract``)."""
    result = chain.materialize([B], b="chain_b_strict")
    message = step_failure_message(result)
    assert "Deploy of flow 'chain_b' refused" in message and "flow 'chain_a' writes" in message, message
    assert "currency: missing from the writer (BREAKING)" in message
    assert chain.store.current("chain_b") is None and runtime_pids_for(chain.state_dir) == []

    defs = build_loom_defs(chain.specs(b="chain_b_strict"))
    spec = next(
        s for s in defs.assets or [] if isinstance(s, dg.AssetSpec) and s.key.path[-1].endswith(".rows")
    )
    contract = spec.metadata["loom/contract"].value
    assert contract["writers"][0]["flow"] == "chain_a" and contract["compatible"] is False
    assert contract["readers"][0]["reader_flow"] == "chain_b"
