"""The ops behind the sensors' declared checks: chunked, with inputs only where a check follows its asset,
several kinds of checks on one asset in one op."""

from collections.abc import Iterator
from pathlib import Path

import dagster as dg

from loom_dagster.resource import LoomDeployResource
from loom_dagster.sensors.check_ops import CHECKS_PER_OP, CheckKind, declared_check_ops, flow_check_ops


def _passing(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
    for key in sorted(context.selected_asset_check_keys, key=str):
        yield dg.AssetCheckResult(asset_key=key.asset_key, check_name=key.name, passed=True)


def test_checks_are_split_into_ops_of_at_most_checks_per_op() -> None:
    specs = [dg.AssetCheckSpec("fresh", asset=["t", str(i)]) for i in range(2 * CHECKS_PER_OP + 1)]
    defs = declared_check_ops("fresh_checks", specs, _passing, after_targets=False)
    assert [d.node_def.name for d in defs] == ["fresh_checks", "fresh_checks_2", "fresh_checks_3"]
    assert [len(list(d.check_keys)) for d in defs] == [CHECKS_PER_OP, CHECKS_PER_OP, 1]
    assert {k for d in defs for k in d.check_keys} == {s.key for s in specs}
    assert all(not d.node_def.input_defs for d in defs)


def test_checks_after_their_targets_wait_for_them_in_one_run() -> None:
    seen: list[bool] = []

    @dg.multi_asset(specs=[dg.AssetSpec(["loom", "a-b"])], name="a_dash_b")
    def a_dash_b() -> None:
        return None

    @dg.multi_asset(specs=[dg.AssetSpec(["loom", "a_b"])], name="a_underscore_b")
    def a_underscore_b() -> None:
        return None

    def body(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        for key in context.selected_asset_check_keys:
            event = context.instance.get_latest_materialization_event(key.asset_key)
            seen.append(event is not None and event.run_id == context.run.run_id)
            yield dg.AssetCheckResult(asset_key=key.asset_key, check_name=key.name, passed=True)

    specs = [
        dg.AssetCheckSpec("running", asset=a_dash_b.key),
        dg.AssetCheckSpec("running", asset=a_underscore_b.key),
    ]
    (checks,) = declared_check_ops("running_checks", specs, body)
    # two keys with one Python identifier ("loom__a_b") still get an input each
    assert sorted(checks.keys_by_input_name.values()) == sorted([a_dash_b.key, a_underscore_b.key])

    with dg.instance_for_test() as instance:
        result = dg.materialize([a_dash_b, a_underscore_b, checks], instance=instance)
    assert result.success
    assert [e.passed for e in result.get_asset_check_evaluations()] == [True, True]
    assert seen == [True, True]  # each check ran after its asset materialized, in the same run


def test_a_selected_check_runs_alone_in_its_op() -> None:
    specs = [dg.AssetCheckSpec("fresh", asset=["t", str(i)]) for i in range(CHECKS_PER_OP + 5)]
    defs = declared_check_ops("fresh_checks", specs, _passing, after_targets=False)
    wanted = specs[CHECKS_PER_OP + 2].key
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [*(dg.AssetSpec(["t", str(i)]) for i in range(len(specs))), *defs],
            instance=instance,
            selection=dg.AssetSelection.checks(wanted),
        )
    assert [(e.asset_key, e.check_name) for e in result.get_asset_check_evaluations()] == [
        (wanted.asset_key, wanted.name)
    ]


def test_two_kinds_of_checks_on_a_flow_share_its_op_and_its_input(tmp_path: Path) -> None:
    """``flow_check_ops``: a target's checks of every kind in one op (one input each target, the chunks
    ending between targets), and a run evaluates only the kinds it selected."""
    calls: list[tuple[str, list[str]]] = []

    def kind(name: str, count: int) -> CheckKind:
        def evaluate(context: dg.AssetCheckExecutionContext, loom: object) -> Iterator[dg.AssetCheckResult]:
            assert isinstance(loom, LoomDeployResource)
            keys = sorted(
                k.asset_key.to_user_string() for k in context.selected_asset_check_keys if k.name == name
            )
            calls.append((name, keys))
            for key in keys:
                yield dg.AssetCheckResult(
                    asset_key=dg.AssetKey.from_user_string(key), check_name=name, passed=True
                )

        return CheckKind(name, [dg.AssetCheckSpec(name, asset=["f", str(i)]) for i in range(count)], evaluate)

    flows = CHECKS_PER_OP // 2 + 3
    kinds = [kind("job_running", flows), kind("kafka_lag", flows - 1)]  # the last flow: no Kafka source
    defs = flow_check_ops("flow_checks", kinds)
    assert [d.node_def.name for d in defs] == ["flow_checks", "flow_checks_2"]
    assert [len(d.check_keys) for d in defs] == [CHECKS_PER_OP, 5]
    for d in defs:  # one input a flow, and every flow's checks in one op
        assert sorted(d.keys_by_input_name.values()) == sorted({k.asset_key for k in d.check_keys})

    wanted = dg.AssetCheckKey(dg.AssetKey(["f", "1"]), "job_running")
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [*(dg.AssetSpec(["f", str(i)]) for i in range(flows)), *defs],
            instance=instance,
            selection=dg.AssetSelection.checks(wanted),
            resources={"loom": LoomDeployResource(state_dir=str(tmp_path))},
        )
    assert result.success
    assert [(e.asset_key, e.check_name) for e in result.get_asset_check_evaluations()] == [
        (wanted.asset_key, wanted.name)
    ]
    assert calls == [("job_running", ["f/1"])]  # kafka_lag not evaluated: none of its checks selected
