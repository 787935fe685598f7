"""The end-to-end delay over the flow graph (``loom_dagster.core.kafka.end_to_end``): chains, fan-in,
per-topic hops, cycles, unknown delays, dead-letter and non-Kafka writers, both rules, and a long chain."""

from __future__ import annotations

import time

import pytest

from loom_dagster.core.flows.records import LoomFlow, LoomOutputTopic, LoomSourceTopic, TopicRole
from loom_dagster.core.kafka.end_to_end import EndToEndTopology, TopicDelay, topic_delays
from loom_dagster.core.kafka.lag_eval import FlowLag, PartitionLag
from loom_dagster.core.kafka.lag_status import LagStatus
from loom_dagster.core.sensor_settings import KafkaLagSettings


def _flow(
    name: str,
    sources: tuple[str, ...],
    outputs: tuple[str, ...] = (),
    *,
    dlq: tuple[str, ...] = (),
    kind: str = "kafka",
) -> tuple[str, LoomFlow]:
    group = f"{name}-g" if kind == "kafka" else None
    outs = tuple(LoomOutputTopic(t, name, TopicRole.OUTPUT, t) for t in outputs)
    outs += tuple(LoomOutputTopic(t, name, TopicRole.DLQ, f"dlq:{t}") for t in dlq)
    record = LoomFlow(
        name, "m:f", "p", "c", "test", kind, group, "at_least_once",
        source_topics=tuple(LoomSourceTopic(t, name, group or "") for t in sources) if kind == "kafka" else (),
        output_topics=outs,
    )  # fmt: skip
    return f"loom/{name}", record


def _seen(**flows: dict[str, float | None]) -> dict[str, dict[str, TopicDelay]]:
    """``flow name -> {topic: delay}`` as the tick's per-topic delays (``None``: unknown)."""
    return {
        f"loom/{name}": {t: TopicDelay(d, d is not None) for t, d in topics.items()}
        for name, topics in flows.items()
    }


CHAIN = [_flow("a", ("orders",), ("enriched",), dlq=("orders.dlq",)), _flow("b", ("enriched",), ("done",))]


def test_chain_max_and_sum() -> None:
    topology = EndToEndTopology.from_flows(CHAIN)
    assert topology.order == ("loom/a", "loom/b") and topology.cut == ()
    seen = _seen(a={"orders": 40.0}, b={"enriched": 7.0})
    by_sum = topology.compute(seen, rule="sum")
    assert by_sum["loom/a"].delay_s == 40.0 and by_sum["loom/a"].path_text() == "orders -> [a 40.0 s]"
    b = by_sum["loom/b"]
    assert b.delay_s == 47.0 and b.complete and b.unknown == () and b.rule == "sum"
    assert b.path_text() == "orders -> [a 40.0 s] -> enriched -> [b 7.0 s]"
    by_max = topology.compute(seen)["loom/b"]
    assert by_max.delay_s == 40.0 and by_max.rule == "max" and by_max.path == b.path
    # one hop lagging, the other caught up: both rules agree (what the chained-flow tests measure)
    for seen in (
        _seen(a={"orders": 40.0}, b={"enriched": 0.0}),
        _seen(a={"orders": 0.0}, b={"enriched": 40.0}),
    ):
        assert {topology.compute(seen, rule=r)["loom/b"].delay_s for r in ("max", "sum")} == {40.0}


def test_fan_in_takes_the_largest_path_and_each_topic_is_its_own_hop() -> None:
    """C reads two topics written by A and B, and a third topic nobody in the code location writes."""
    flows = [
        _flow("a", ("x",), ("ax",)),
        _flow("b", ("y",), ("by",)),
        _flow("c", ("ax", "by", "raw"), ("out",)),
    ]
    topology = EndToEndTopology.from_flows(flows)
    seen = _seen(a={"x": 10.0}, b={"y": 50.0}, c={"ax": 5.0, "by": 1.0, "raw": 30.0})
    c = topology.compute(seen, rule="sum")["loom/c"]
    assert c.delay_s == 51.0 and c.path_text() == "y -> [b 50.0 s] -> by -> [c 1.0 s]"
    # C's 30 s on "raw" is not added to B's path: the hops are per topic
    seen = _seen(a={"x": 10.0}, b={"y": 2.0}, c={"ax": 5.0, "by": 1.0, "raw": 30.0})
    c = topology.compute(seen, rule="sum")["loom/c"]
    assert c.delay_s == 30.0 and c.path_text() == "raw -> [c 30.0 s]"
    assert topology.compute(seen)["loom/c"].delay_s == 30.0


def test_two_writers_of_one_topic() -> None:
    flows = [_flow("a", ("x",), ("shared",)), _flow("b", ("y",), ("shared",)), _flow("c", ("shared",))]
    topology = EndToEndTopology.from_flows(flows)
    c = topology.compute(_seen(a={"x": 3.0}, b={"y": 9.0}, c={"shared": 1.0}), rule="sum")["loom/c"]
    assert c.delay_s == 10.0 and [h.flow for h in c.path] == ["b", "c"]


def test_dead_letter_and_non_kafka_writers_make_no_edge() -> None:
    flows = [
        _flow("a", ("orders",), dlq=("orders.dlq",)),
        _flow("replay", ("orders.dlq",)),
        _flow("watch", (), ("changes",), kind="mongo"),
        _flow("b", ("changes",)),
    ]
    topology = EndToEndTopology.from_flows(flows)
    assert set(topology.order) == {"loom/a", "loom/replay", "loom/b"}  # the Mongo flow is no hop
    found = topology.compute(_seen(a={"orders": 100.0}, replay={"orders.dlq": 2.0}, b={"changes": 4.0}))
    assert found["loom/replay"].path_text() == "orders.dlq -> [replay 2.0 s]"
    assert found["loom/b"].path_text() == "changes -> [b 4.0 s]" and found["loom/b"].complete


def test_unknown_delays_make_a_lower_bound_or_none() -> None:
    topology = EndToEndTopology.from_flows(CHAIN)
    partial = {
        "loom/a": {"orders": TopicDelay(30.0, complete=False)},
        "loom/b": {"enriched": TopicDelay(5.0)},
    }
    b = topology.compute(partial, rule="sum")["loom/b"]
    assert b.delay_s == 35.0 and not b.complete and b.unknown == ("a",) and b.unknown_count == 1
    b = topology.compute(_seen(a={"orders": None}, b={"enriched": 5.0}), rule="sum")["loom/b"]
    assert b.delay_s == 5.0 and not b.complete and b.unknown == ("a",)
    assert b.path_text() == "orders -> [a unknown] -> enriched -> [b 5.0 s]"
    # a flow missing from the tick (its cluster did not answer) is unknown too
    b = topology.compute(_seen(b={"enriched": 5.0}))["loom/b"]
    assert b.delay_s == 5.0 and not b.complete
    nothing = topology.compute({})["loom/b"]
    assert nothing.delay_s is None and not nothing.complete and nothing.unknown == ("a", "b")


def test_a_cycle_is_cut_once_and_every_flow_counts_once() -> None:
    """a -> t1 -> b -> t2 -> a (a also reads the outside topic t0)."""
    flows = [_flow("a", ("t0", "t2"), ("t1",)), _flow("b", ("t1",), ("t2",))]
    topology = EndToEndTopology.from_flows(flows)
    # the walk starts at a (name order), goes upstream to b, meets a again: the edge a -t1-> b is cut
    assert topology.cut == (("loom/a", "t1", "loom/b"),) and topology.order == ("loom/b", "loom/a")
    found = topology.compute(_seen(a={"t0": 4.0, "t2": 6.0}, b={"t1": 1.0}), rule="sum")
    assert found["loom/b"].delay_s == 1.0 and found["loom/b"].path_text() == "t1 -> [b 1.0 s]"
    assert (
        found["loom/a"].delay_s == 7.0 and found["loom/a"].path_text() == "t1 -> [b 1.0 s] -> t2 -> [a 6.0 s]"
    )
    assert topology.compute(_seen(a={"t0": 40.0, "t2": 6.0}, b={"t1": 1.0}))["loom/a"].delay_s == 40.0
    loop = EndToEndTopology.from_flows([_flow("self", ("t",), ("t",))])
    assert loop.cut == (("loom/self", "t", "loom/self"),)
    assert loop.compute(_seen(self={"t": 3.0}), rule="sum")["loom/self"].delay_s == 3.0


def test_a_long_chain_is_linear_and_needs_no_recursion() -> None:
    n = 2000
    flows = [_flow(f"f{i:05d}", (f"t{i}",), (f"t{i + 1}",)) for i in range(n)]
    started = time.perf_counter()
    topology = EndToEndTopology.from_flows(reversed(flows))
    laid_out = time.perf_counter() - started
    seen = {f"loom/f{i:05d}": {f"t{i}": TopicDelay(1.0)} for i in range(n)}
    started = time.perf_counter()
    found = topology.compute(seen, rule="sum")
    computed = time.perf_counter() - started
    last = found[f"loom/f{n - 1:05d}"]
    assert last.delay_s == float(n) and len(last.path) == n and last.complete
    print(f"\n[end-to-end] chain of {n}: layout {laid_out * 1000:.0f} ms, compute {computed * 1000:.0f} ms")


def test_topic_delays_of_a_flow() -> None:
    def part(topic: str, p: int, delay: float | None) -> PartitionLag:
        return PartitionLag(topic, p, 10, 5, 5, LagStatus.OK, "", delay_s=delay)

    flow = FlowLag(
        "loom/a", "g", LagStatus.OK, "", 10,
        partitions=(part("x", 0, 3.0), part("x", 1, 8.0), part("y", 0, None), part("y", 1, 2.0)),
        delay_read=True,
    )  # fmt: skip
    assert topic_delays(flow) == {"x": TopicDelay(8.0), "y": TopicDelay(2.0, complete=False)}
    import msgspec

    assert topic_delays(msgspec.structs.replace(flow, delay_read=False)) == {}
    only_unknown = msgspec.structs.replace(flow, partitions=(part("y", 0, None),))
    assert topic_delays(only_unknown) == {"y": TopicDelay(None, complete=False)}


def test_bad_rule_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="unknown end-to-end rule 'avg': use one of max, sum"):
        EndToEndTopology.from_flows(CHAIN).compute({}, rule="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"end_to_end_rule is 'add': use 'max' .* or 'sum'"):
        KafkaLagSettings(end_to_end_rule="add")
