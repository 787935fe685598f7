"""The ``contracts`` pre-launch step without a broker: the chained flows (``tests/flows/chained.py``)
compiled against an unreachable one, the checks that connect answered as a healthy broker would
(``tests.core.deploy.test_steps.connected``), jobs started by a launcher that starts nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loom_dagster import LoomFlowSpec
from loom_dagster.core.contracts.chain import ContractBroken, contracts_extra, flow_contracts, writer_changes
from loom_dagster.core.deploy.deployer import DeployOptions, FlowDeployer
from loom_dagster.core.deploy.steps import Contracts, DeployContext
from loom_dagster.core.deploy.store import DeploymentStore
from loom_dagster.core.flows.catalog import CompiledFlow, compile_spec
from loom_dagster.core.flows.records import LoomFlow
from tests.conftest import write_yaml
from tests.core.deploy.test_steps import StubLauncher, connected  # noqa: F401 (fixture)

BROKER = "127.0.0.1:9"


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("chain")
    a = write_yaml(
        root / "a" / "base.yaml",
        f"""
        kafka:
          consumer: {{brokers: ["{BROKER}"], group_id: a, topics: [ticks], delivery: at_least_once}}
          producer: {{brokers: ["{BROKER}"]}}
          producers: {{rows: {{brokers: ["{BROKER}"], topic: rows}}, chain_a_dlq: {{brokers: ["{BROKER}"], topic: a.dlq}}}}
        """,
    ).parent
    b = write_yaml(
        root / "b" / "base.yaml",
        f"""
        kafka:
          consumer: {{brokers: ["{BROKER}"], group_id: b, topics: [rows], delivery: at_least_once}}
          producer: {{brokers: ["{BROKER}"]}}
          producers: {{chain_b_dlq: {{brokers: ["{BROKER}"], topic: b.dlq}}}}
        streaming:
          sinks: {{rows_delta: {{uri: "{root / "delta"}", table: rows}}}}
        """,
    ).parent
    return a, b


def compiled(variant: str, config: Path) -> CompiledFlow:
    return compile_spec(
        LoomFlowSpec(f"tests.flows.chained:{variant}", config=str(config), environment="test")
    )


@pytest.fixture(scope="module")
def flows(configs: tuple[Path, Path]) -> dict[str, CompiledFlow]:
    a, b = configs
    names = ["chain_a", "chain_a_compatible", "chain_a_breaking"]
    found = {n: compiled(n, a) for n in names}
    found.update({n: compiled(n, b) for n in ["chain_b", "chain_b_strict"]})
    return found


def ctx_for(flow: CompiledFlow, others: list[LoomFlow], tmp_path: Path, **kwargs: Any) -> DeployContext:
    deployer = FlowDeployer(StubLauncher(), DeploymentStore(tmp_path / "state"))
    return DeployContext(
        deployer, flow.spec, flow, location_flows=tuple(others), log=lambda _: None, **kwargs
    )


def test_records_carry_the_structs(flows: dict[str, CompiledFlow]) -> None:
    (rows,) = [t for t in flows["chain_a"].flow.output_topics if t.role.value == "output"]
    assert rows.topic == "rows" and rows.contract is not None and rows.contract.struct.endswith(".Row")
    (dlq,) = [t for t in flows["chain_a"].flow.output_topics if t.role.value == "dlq"]
    assert dlq.contract is None  # error envelopes: no payload contract
    (source,) = flows["chain_b"].flow.source_topics
    assert [c.struct.rsplit(".", 1)[-1] for c in source.contracts] == ["Row"]


def test_breaking_writer_is_refused_and_accepted_on_request(
    flows: dict[str, CompiledFlow], tmp_path: Path
) -> None:
    reader = flows["chain_b"].flow
    ctx = ctx_for(flows["chain_a_breaking"], [reader, flows["chain_a"].flow], tmp_path)
    with pytest.raises(ContractBroken) as refused:
        Contracts().run(ctx)
    text = str(refused.value)
    assert "flow 'chain_b' reads" in text and "amount: missing from the writer" in text
    assert refused.value.contracts.blocks and ctx.contracts is refused.value.contracts

    accepted = ctx_for(flows["chain_a_breaking"], [reader], tmp_path, accept_contract_change=True)
    outcome = Contracts().run(accepted)
    assert "1 broken (accepted by the run config)" in outcome.note and not outcome.skipped


def test_compatible_writer_passes_and_is_listed(flows: dict[str, CompiledFlow], tmp_path: Path) -> None:
    lines: list[str] = []
    ctx = ctx_for(flows["chain_a_compatible"], [flows["chain_b"].flow], tmp_path)
    ctx.log = lines.append
    outcome = Contracts().run(ctx)
    assert outcome.note == "1 contract(s) checked, 0 broken" and not outcome.skipped
    assert any("region: added in the writer (compatible)" in line for line in lines)


def test_reader_with_a_new_required_field_is_refused(flows: dict[str, CompiledFlow], tmp_path: Path) -> None:
    ctx = ctx_for(flows["chain_b_strict"], [flows["chain_a"].flow], tmp_path)
    with pytest.raises(ContractBroken, match="currency: missing from the writer"):
        Contracts().run(ctx)


def test_no_shared_topic_is_skipped(flows: dict[str, CompiledFlow], tmp_path: Path) -> None:
    outcome = Contracts().run(ctx_for(flows["chain_a"], [], tmp_path))
    assert outcome.skipped and outcome.note == "no topic shared with another flow of this code location"


def test_changes_since_the_deployed_struct(flows: dict[str, CompiledFlow]) -> None:
    old, new = flows["chain_a"].flow, flows["chain_a_breaking"].flow
    extra = contracts_extra(old)
    assert writer_changes(old, extra) == ()
    (change,) = writer_changes(new, extra)
    assert change.previous.endswith(".Row") and change.current.endswith(".RowRenamed")
    assert {f.path: f.breaking for f in change.findings} == {"amount": True, "total": False}
    report = flow_contracts(new, [], extra)
    assert report.changes == (change,) and not report.blocks


def test_a_deploy_records_the_struct_and_lists_what_changed_next_time(
    flows: dict[str, CompiledFlow],
    tmp_path: Path,
    connected: dict[str, list[Any]],  # noqa: F811
) -> None:
    deployer = FlowDeployer(
        StubLauncher(), DeploymentStore(tmp_path / "state"), DeployOptions(preflight=False)
    )
    location = [flows["chain_b"].flow]
    first = flows["chain_a"]
    result = deployer.deploy(first.spec, first.flow, location_flows=location, log=lambda _: None)
    assert result.deployment is not None and "rows" in result.deployment.extra["contracts"]
    assert result.contracts is not None and result.contracts.changes == ()
    second = flows["chain_a_compatible"]
    lines: list[str] = []
    again = deployer.deploy(second.spec, second.flow, location_flows=location, log=lines.append)
    assert again.contracts is not None
    (change,) = again.contracts.changes
    assert change.current.endswith(".RowRegion") and [f.path for f in change.findings] == ["region"]
    assert any(line.startswith("payload struct changed since the deployed version") for line in lines)
    assert [r.name for r in again.steps][:3] == ["deploy_checks", "job_view", "contracts"]
    # on demand: the same comparison, nothing deployed
    report = deployer.check_contracts(compiled("chain_a_breaking", Path(first.spec.config)), location)
    assert report.blocks and deployer.store.current("chain_a") == again.deployment
