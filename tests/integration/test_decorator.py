"""``@loom_flow_assets``: a user's body around loom's deploy, one multi_asset over the flows.

No ``from __future__ import annotations`` here: Dagster reads the context parameter's annotation as
a class (as for any ``@asset``)."""

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from loom_dagster import (
    LoomDeployConfig,
    LoomDeployResource,
    LoomFlowSpec,
    build_loom_asset_graph,
    deploy_loom_flows,
    loom_flow_assets,
)
from loom_dagster.core.deploy.launch_records import JobState
from loom_dagster.core.job.status import read_status
from loom_dagster.dev.kafka import KafkaBroker
from tests.conftest import shapes_config
from tests.support.deploy_env import DeployBench, bench_fixture

SHAPES = "tests.flows.shapes:make_flow"


def test_decorated_asset_covers_the_flows_with_their_checks(
    tmp_path: Path, sinks_env: pytest.MonkeyPatch
) -> None:
    graph = build_loom_asset_graph(
        [LoomFlowSpec(SHAPES, config=shapes_config(tmp_path / "cfg"), environment="test")], state=False
    )

    @loom_flow_assets(graph=graph)
    def my_flows(context: dg.AssetExecutionContext, loom: LoomDeployResource) -> Iterator[object]:
        """My streaming flows."""
        yield from deploy_loom_flows(context, loom)

    (node,) = graph.flows
    assert my_flows.keys == {node.spec.key}
    assert my_flows.op.name == "my_flows" and my_flows.can_subset
    assert my_flows.specs_by_key[node.spec.key].replace_attributes(skippable=False) == node.spec
    assert {k.name for k in my_flows.check_keys} == {"deploy_checks"}
    assert my_flows.descriptions_by_key[node.spec.key] == node.spec.description
    defs = dg.Definitions(
        assets=[my_flows, *graph.external_specs],
        resources={"loom": LoomDeployResource(state_dir=str(tmp_path))},
    )
    dg.Definitions.validate_loadable(defs)

    with pytest.raises(TypeError, match="one of them"):
        loom_flow_assets()
    with pytest.raises(RuntimeError, match="@loom_flow_assets"):
        next(deploy_loom_flows(None, LoomDeployResource()))  # type: ignore[arg-type]


def test_checks_alone_run_through_the_body_and_deploy_nothing(
    tmp_path: Path, sinks_env: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    @loom_flow_assets(
        flows=[LoomFlowSpec(SHAPES, config=shapes_config(tmp_path / "cfg"), environment="test")], state=False
    )
    def checked(
        context: dg.AssetExecutionContext, loom: LoomDeployResource, config: LoomDeployConfig
    ) -> Iterator[object]:
        calls.append(f"before {config.environment}")
        yield from deploy_loom_flows(context, loom)
        calls.append("after")

    key = dg.AssetKey(["loom", "events"])
    result = dg.materialize(
        [checked],
        selection=dg.AssetSelection.checks(dg.AssetCheckKey(key, "deploy_checks")),
        resources={"loom": LoomDeployResource(state_dir=str(tmp_path / "state"))},
        run_config={"ops": {"checked": {"config": {"environment": "test"}}}},
    )
    assert result.success
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == "deploy_checks" and evaluation.metadata["environment"].value == "test"
    assert calls == ["before test", "after"]
    assert not result.get_asset_materialization_events()
    assert not (tmp_path / "state").exists() or not list((tmp_path / "state").rglob("deployment.json"))


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


@pytest.mark.kafka
@pytest.mark.slow
def test_user_code_runs_before_and_after_the_deploy(bench: DeployBench) -> None:
    seen: list[tuple[str, object]] = []
    graph = build_loom_asset_graph([bench.spec()])

    @loom_flow_assets(graph=graph)
    def ticks_flows(context: dg.AssetExecutionContext, loom: LoomDeployResource) -> Iterator[object]:
        seen.append(("before: deployed", bench.store.current("ticks")))
        results = []
        for result in deploy_loom_flows(context, loom):
            results.append(result)
            yield result
        current = bench.store.current("ticks")
        assert current is not None
        seen.append(("after: healthy", loom.deployer().launcher.report(current.job).state))
        seen.append(("after: results", [type(r).__name__ for r in results]))

    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [ticks_flows, *graph.external_specs],
            resources={"loom": bench.resource()},
            instance=instance,
            raise_on_error=False,
        )
        assert result.success, [e.message for e in result.all_events if e.is_failure]
        assert seen == [
            ("before: deployed", None),
            ("after: healthy", JobState.HEALTHY),
            ("after: results", ["AssetCheckResult", "MaterializeResult"]),
        ]
        (materialization,) = result.asset_materializations_for_node("ticks_flows")
        assert materialization.asset_key == dg.AssetKey(["loom", "ticks"])
        assert materialization.metadata["loom/deployed"].value is True
        deployment = bench.store.current("ticks")
        assert deployment is not None and deployment.run_id == result.run_id
        assert bench.alive_pids() == [p.pid for p in deployment.job.processes]
        statuses = [read_status(p.status_path) for p in deployment.job.processes]
        assert all(s is not None and s.connected and s.state == "running" for s in statuses)
        bench.produce(0, 20)
        bench.wait_for_delta({f"id-{i}" for i in range(20)})
