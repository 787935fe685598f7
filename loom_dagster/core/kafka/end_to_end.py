"""End-to-end delay of chained flows: how old the data reaching a flow is, counted from the first Kafka
topic of its lineage, from one lag tick's delays (no broker request, no instance read). No Dagster here.

The **flow graph** comes from the flows' records once (``EndToEndTopology.from_flows``): flow B reads
topic T, flow A writes T as an output (``TopicRole.OUTPUT``) -> edge ``A -T-> B``. Dead-letter / error-route
topics (``TopicRole.DLQ``) are not the data path and make no edge. Only Kafka-sourced flows (the ones with
a ``kafka_lag`` check) are hops: a topic written by anything else (a Mongo-sourced flow, a producer outside
the code location) starts a lineage. A cycle (A -> T1 -> B -> T2 -> A) is cut once, at the edge where a
depth-first walk in name order meets it (``EndToEndTopology.cut``): each flow counts once per path.

**Per tick** (``EndToEndTopology.compute``): each flow's delay on each source topic (the largest
``delay_s`` of its partitions of that topic: the age of the oldest message it has not consumed there)
is combined with the end-to-end delay of the flows writing that topic, in topological order (O(flows +
edges)). Two rules:

- ``"max"`` (default): loom keeps each message's origin timestamp through its output topics (the
  envelope's ``produced_at_ms`` becomes the Kafka timestamp of the record it writes), so a downstream
  flow's delay already counts from the first topic: the end-to-end delay is the largest delay along the
  path (the age of the oldest data not yet through it). Adding the hops would count the upstream wait
  twice whenever two hops lag at once.
- ``"sum"``: the hops' delays added up, for topics whose timestamps restart at each hop (a topic with
  ``message.timestamp.type=LogAppendTime``, a writer that stamps its own time).

With one hop lagging and the others caught up (delay 0) both rules give the same number. A hop whose delay
is unknown (not read, over the partition cap, an unreachable cluster) adds nothing and marks the result
incomplete (a lower bound); with no hop known, the delay is ``None``.

Example:
    >>> from loom_dagster.core.flows.records import LoomFlow, LoomOutputTopic, LoomSourceTopic, TopicRole
    >>> def flow(name, source, out):
    ...     return LoomFlow(name, "m:f", "p", "c", "e", "kafka", f"{name}-g", "at_least_once",
    ...         source_topics=(LoomSourceTopic(source, name, f"{name}-g"),),
    ...         output_topics=(LoomOutputTopic(out, name, TopicRole.OUTPUT, out),))
    >>> topology = EndToEndTopology.from_flows([("loom/a", flow("a", "orders", "enriched")),
    ...                                        ("loom/b", flow("b", "enriched", "done"))])
    >>> seen = {"loom/a": {"orders": TopicDelay(40.0)}, "loom/b": {"enriched": TopicDelay(0.0)}}
    >>> found = topology.compute(seen, rule="sum")["loom/b"]
    >>> found.delay_s, found.path_text(), found.complete
    (40.0, 'orders -> [a 40.0 s] -> enriched -> [b 0.0 s]', True)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Literal

import msgspec

from loom_dagster.core.flows.records import LoomFlow, TopicRole
from loom_dagster.core.kafka.lag_eval import FlowLag

Rule = Literal["max", "sum"]
RULES: tuple[Rule, ...] = ("max", "sum")
MAX_UNKNOWN_NAMED = 10
"""Most flows of unknown delay named in one result (the count is always complete)."""


class TopicDelay(msgspec.Struct, frozen=True):
    """One flow's delay on one source topic: the oldest unconsumed message's age over its partitions
    (``None``: none known); ``complete`` is False when some partition's delay is unknown (then
    ``delay_s`` is a lower bound)."""

    delay_s: float | None
    complete: bool = True


class Hop(msgspec.Struct, frozen=True):
    """One step of a path: a topic, then the flow reading it, with that flow's delay on the topic."""

    topic: str
    flow: str
    delay_s: float | None


class EndToEndDelay(msgspec.Struct, frozen=True):
    """A flow's end-to-end delay: its value (``None``: no hop known), the path that gives it (first
    topic first), whether every hop of its whole lineage was known (else a lower bound), and the flows
    whose delay was unknown (at most ``MAX_UNKNOWN_NAMED`` named, ``unknown_count`` of them in all)."""

    delay_s: float | None
    path: tuple[Hop, ...]
    complete: bool
    unknown: tuple[str, ...] = ()
    unknown_count: int = 0
    rule: Rule = "max"

    def path_text(self) -> str:
        """The path as ``topic -> [flow delay] -> topic -> [flow delay]``."""
        parts = []
        for hop in self.path:
            delay = "unknown" if hop.delay_s is None else f"{hop.delay_s:.1f} s"
            parts += [hop.topic, f"[{hop.flow} {delay}]"]
        return " -> ".join(parts)


class _Edge(msgspec.Struct, frozen=True):
    """Source topic *topic* of a flow, and the flows (keys) writing it as an output."""

    topic: str
    writers: tuple[str, ...]


class EndToEndTopology(msgspec.Struct, frozen=True):
    """The flow graph of a code location, laid out once: every Kafka-sourced flow's source topics with
    their writing flows, a topological order, the flow names, and the edges cut to break cycles
    (``(writer, topic, reader)`` keys)."""

    edges: Mapping[str, tuple[_Edge, ...]]
    order: tuple[str, ...]
    names: Mapping[str, str]
    cut: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def from_flows(cls, flows: Iterable[tuple[str, LoomFlow]]) -> EndToEndTopology:
        """The topology of *flows* (``(flow key, record)``; every flow of the code location, so that the
        writers of each topic are known). Hops are the Kafka-sourced flows with a consumer group."""
        flows = sorted(flows, key=lambda pair: pair[0])
        names = {key: flow.name for key, flow in flows}
        hops = {key for key, flow in flows if _is_hop(flow)}
        writers: dict[str, list[str]] = defaultdict(list)
        for key, flow in flows:
            for out in flow.output_topics:
                if out.role is TopicRole.OUTPUT and key in hops and key not in writers[out.topic]:
                    writers[out.topic].append(key)
        edges = {
            key: tuple(
                _Edge(topic, tuple(writers.get(topic, ())))
                for topic in sorted({t.topic for t in flow.source_topics})
            )
            for key, flow in flows
            if key in hops
        }
        order, cut = _layout(edges)
        return cls({k: edges[k] for k in order}, order, names, cut)

    def compute(
        self, delays: Mapping[str, Mapping[str, TopicDelay]], *, rule: Rule = "max"
    ) -> dict[str, EndToEndDelay]:
        """Every flow's end-to-end delay from its per-topic delays of one tick (flow key -> topic ->
        ``TopicDelay``; a flow or topic missing from it is unknown), by *rule* (``"max"`` or ``"sum"``).

        Raises:
            ValueError: for another *rule*.
        """
        if rule not in RULES:
            raise ValueError(f"unknown end-to-end rule {rule!r}: use one of {', '.join(RULES)}")
        cut = {(w, t, r) for w, t, r in self.cut}
        done: dict[str, EndToEndDelay] = {}
        for key in self.order:
            own = delays.get(key, {})
            best: tuple[tuple[bool, float, bool, int], EndToEndDelay] | None = None
            complete, unknown = True, set[str]()
            for edge in self.edges[key]:
                hop_delay = own.get(edge.topic, TopicDelay(None, False))
                if not hop_delay.complete:
                    complete = False
                    unknown.add(self.names[key])
                hop = Hop(edge.topic, self.names[key], hop_delay.delay_s)
                upstream = [done[w] for w in edge.writers if (w, edge.topic, key) not in cut]
                starts: list[EndToEndDelay | None] = [*upstream] if upstream else [None]
                for before in starts:
                    found = _extend(before, hop, rule)
                    rank = _rank(found)
                    if best is None or rank > best[0]:
                        best = (rank, found)
                for before in upstream:
                    complete = complete and before.complete
                    unknown.update(before.unknown)
            if best is None:  # a flow with no source topic: nothing to measure
                done[key] = EndToEndDelay(None, (), False, (self.names[key],), 1, rule)
                continue
            named = tuple(sorted(unknown))
            done[key] = msgspec.structs.replace(
                best[1],
                complete=complete,
                unknown=named[:MAX_UNKNOWN_NAMED],
                unknown_count=len(named),
            )
        return done


def topic_delays(flow: FlowLag) -> dict[str, TopicDelay]:
    """One tick's delay of *flow* on each of its source topics, from its partitions: the largest known
    ``delay_s``, complete when every partition's is known. Nothing when the delay was not read; a missing
    or unreachable topic is left out (unknown)."""
    if not flow.delay_read:
        return {}
    known: dict[str, float] = {}
    partial: set[str] = set()
    for part in flow.partitions:
        if part.delay_s is None:
            partial.add(part.topic)
        else:
            known[part.topic] = max(known.get(part.topic, 0.0), part.delay_s)
    return {
        topic: TopicDelay(known.get(topic), topic not in partial)
        for topic in sorted(known.keys() | partial)
        if topic not in flow.missing_topics
    }


def _is_hop(flow: LoomFlow) -> bool:
    return flow.source_kind == "kafka" and bool(flow.consumer_group) and bool(flow.source_topics)


def _layout(
    edges: Mapping[str, tuple[_Edge, ...]],
) -> tuple[tuple[str, ...], tuple[tuple[str, str, str], ...]]:
    """A topological order of the flows (writers before readers) and the edges cut to break cycles: an
    iterative depth-first walk in key order, upstream first; an edge back to a flow still on the walk's
    stack is cut."""
    order: list[str] = []
    cut: list[tuple[str, str, str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for root in sorted(edges):
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter([(w, e.topic) for e in edges[root] for w in e.writers]))]
        while stack:
            key, pending = stack[-1]
            step = next(pending, None)
            if step is None:
                stack.pop()
                state[key] = 2
                order.append(key)
                continue
            writer, topic = step
            if writer not in edges:
                continue
            seen = state.get(writer)
            if seen == 1:
                cut.append((writer, topic, key))
            elif seen is None:
                state[writer] = 1
                stack.append((writer, iter([(w, e.topic) for e in edges[writer] for w in e.writers])))
    return tuple(order), tuple(cut)


def _extend(before: EndToEndDelay | None, hop: Hop, rule: Rule) -> EndToEndDelay:
    """The path *before* (``None``: the hop's topic starts the lineage) followed by *hop*."""
    if before is None:
        return EndToEndDelay(hop.delay_s, (hop,), True, rule=rule)
    value = _combine(before.delay_s, hop.delay_s, rule)
    return EndToEndDelay(value, (*before.path, hop), True, rule=rule)


def _combine(a: float | None, b: float | None, rule: Rule) -> float | None:
    if a is None or b is None:
        return b if a is None else a
    return a + b if rule == "sum" else max(a, b)


def _rank(found: EndToEndDelay) -> tuple[bool, float, bool, int]:
    """Which candidate path wins: a known value, the largest, every hop known, the longest."""
    known = [h.delay_s is not None for h in found.path]
    return (found.delay_s is not None, found.delay_s or 0.0, all(known), len(found.path))
