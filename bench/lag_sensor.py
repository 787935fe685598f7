"""Kafka lag sensor bench: broker requests and wall time of one sensor tick for 1, 10, 50 and 200 flows
(6 partitions each, one consumer group each) on a real broker, offset lag only; then the tick at full size
offset-only vs offset+delay (the delay read: age of the oldest unconsumed message of every lagging
partition, one assign-only consumer per cluster), side by side with the ratio; then the tick with the
delay read, end-to-end delay off vs on (``KafkaLagSettings.end_to_end``: each flow's delay summed or
maxed over the chained flows, from the same tick's observations), with both ticks' broker requests side by
side and the ratio, and the end-to-end computation alone at this size and at 1,000 flows; then
``check_lag`` (the tick's fetch + evaluation, without Dagster events, offset-only) at 200 and 1,000 groups.

    .venv/bin/python bench/lag_sensor.py [--flows 200] [--partitions 6] [--groups 200,1000] [--delay-ticks 10]
    .venv/bin/python bench/lag_sensor.py --smoke       # 2 flows x 2 partitions, 2/4 groups; no figures

The offset-only vs offset+delay comparison alternates the two sensors tick after tick (each with its own
cursor; the first tick of each is a warm-up, left out), so both see the same machine load; half the
partitions lag (30 messages), so at 200 x 6 the delay read covers 600 partitions per tick.

The flows are real: ``tests.flows.shapes`` with only its output topic (no table buffer, so no idle tail),
one config per flow, compiled by loom and laid out by ``build_asset_graph`` like a code location's. They
are chained in runs of ``CHAIN`` (flow i writes the topic flow i+1 reads, except at the end of a run: 200
flows give 50 chains of 4, 150 flow-to-flow edges), so the end-to-end paths have work to do. Each
group is committed 30 messages behind on half its partitions and nothing consumes or produces during the
ticks, so once a window has 3 samples every flow reads STOP. Starts a Kafka broker (``KafkaBroker``) unless
``LOOM_DAGSTER_KAFKA_BOOTSTRAP`` is set. Prints figures measured in this one run; asserts nothing.

Committed offsets come from concurrent AdminClient calls (one ``list_consumer_group_offsets`` per group,
every future in flight at once: one FindCoordinator + one OffsetFetch per group), made in a child process
(``loom_dagster.core.kafka.isolation``: librdkafka#4605); ``bench/broker_restart.py`` prints what that child
adds, next to the same fetch in-process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dagster as dg  # noqa: E402
from confluent_kafka import ConsumerGroupTopicPartitions, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402

from loom_dagster.asset_graph import LoomAssetGraph, build_asset_graph  # noqa: E402
from loom_dagster.core.flows.catalog import CompiledFlow, compile_spec  # noqa: E402
from loom_dagster.core.flows.records import LoomFlow, LoomOutputTopic, LoomSourceTopic, TopicRole  # noqa: E402
from loom_dagster.core.flows.spec import LoomFlowSpec  # noqa: E402
from loom_dagster.core.kafka.cluster import KafkaCluster, LagTarget  # noqa: E402
from loom_dagster.core.kafka.end_to_end import EndToEndTopology, TopicDelay  # noqa: E402
from loom_dagster.core.kafka.lag_check import check_lag  # noqa: E402
from loom_dagster.core.kafka.lag_window import LagWindows  # noqa: E402
from loom_dagster.core.kafka.offsets import fetch_offsets  # noqa: E402
from loom_dagster.core.sensor_settings import KafkaLagSettings  # noqa: E402
from loom_dagster.dev.kafka import KafkaBroker, create_topics  # noqa: E402
from loom_dagster.resource import LoomDeployResource  # noqa: E402
from loom_dagster.sensors.lag import build_kafka_lag_sensor, end_to_end_topology, kafka_lag_targets  # noqa: E402
from loom_dagster.translator import LoomTranslator  # noqa: E402

MESSAGES_PER_PARTITION = 50
SIZES = (1, 10, 50, 200)
GROUP_SIZES = (200, 1000)
GROUP_TICKS = 5
SMOKE_FLOWS, SMOKE_PARTITIONS, SMOKE_GROUP_SIZES = 2, 2, (2, 4)
SHAPES = "tests.flows.shapes:make_flow"
CHAIN = 4
"""Flows per chain: flow i writes flow i+1's source topic unless i+1 starts a new chain."""
CONFIG = """
kafka:
  consumer: {{brokers: ["{bootstrap}"], group_id: {group}, topics: [{topic}], delivery: at_least_once}}
  producer: {{brokers: ["{bootstrap}"]}}
  producers:
    events_out: {{brokers: ["{bootstrap}"], topic: {out}}}
    events_dlq: {{brokers: ["{bootstrap}"], topic: {topic}.dlq}}
"""


@contextmanager
def broker() -> Iterator[str]:
    """Bootstrap servers of the bench broker (ours, stopped afterwards, or LOOM_DAGSTER_KAFKA_BOOTSTRAP)."""
    with KafkaBroker() as kafka:
        yield kafka.bootstrap_servers


def prepare(bootstrap: str, prefix: str, flows: int, partitions: int, first: int = 0) -> list[str]:
    """Topics ``<prefix>.flow<i>`` with data and groups ``<prefix>-g<i>`` with committed offsets (half the
    partitions 30 behind), for ``first <= i < flows``."""
    topics = [f"{prefix}.flow{i}" for i in range(first, flows)]
    started = time.perf_counter()
    create_topics(bootstrap, topics, partitions=partitions, timeout=600)
    created = time.perf_counter()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for topic in topics:
        for p in range(partitions):
            for n in range(MESSAGES_PER_PARTITION):
                produce(producer, topic, p, b"m%d" % n)
            producer.poll(0)
    producer.flush(120)
    produced = time.perf_counter()
    commit_groups(bootstrap, prefix, topics, partitions, first)
    print(
        f"setup: {len(topics)} topics x {partitions} partitions created in {created - started:.1f} s, "
        f"{len(topics) * partitions * MESSAGES_PER_PARTITION} messages in {produced - created:.1f} s, "
        f"{len(topics)} groups committed in {time.perf_counter() - produced:.1f} s"
    )
    return topics


def produce(producer: Producer, topic: str, partition: int, value: bytes) -> None:
    """Produce one message, waiting for deliveries while the client's queue is full."""
    while True:
        try:
            producer.produce(topic, value=value, partition=partition)
            return
        except BufferError:
            producer.poll(0.1)


def commit_groups(bootstrap: str, prefix: str, topics: list[str], partitions: int, first: int = 0) -> None:
    """Commit offsets for every flow's group (one AdminClient call per group, concurrent), retrying the
    groups a fresh broker refused (``__consumer_offsets`` still loading)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    pending = dict(enumerate(topics, start=first))
    for _ in range(10):
        futures = {}
        for i, topic in pending.items():
            offsets = [
                TopicPartition(topic, p, MESSAGES_PER_PARTITION - (30 if p % 2 else 0))
                for p in range(partitions)
            ]
            request = [ConsumerGroupTopicPartitions(f"{prefix}-g{i}", offsets)]
            futures[i] = next(iter(admin.alter_consumer_group_offsets(request, request_timeout=60).values()))
        failed = {}
        for i, future in futures.items():
            try:
                if any(tp.error for tp in future.result().topic_partitions):
                    failed[i] = pending[i]
            except Exception:
                failed[i] = pending[i]
        if not failed:
            return
        pending = failed
        time.sleep(0.5)
    raise RuntimeError(f"could not commit offsets for {len(pending)} group(s)")


def compile_flows(bootstrap: str, prefix: str, topics: list[str], root: Path) -> list[CompiledFlow]:
    """One real compiled flow per topic (``shapes`` writing only its output topic), group ``<prefix>-g<i>``."""
    os.environ["LOOM_TEST_SINKS"] = "topic"  # no table buffer: no idle tail, so a stuck group is a STOP
    started = time.perf_counter()
    compiled = []
    for i, topic in enumerate(topics):
        cfg = root / f"flow{i}"
        cfg.mkdir(parents=True, exist_ok=True)
        text = CONFIG.format(
            bootstrap=bootstrap, group=f"{prefix}-g{i}", topic=topic, out=output_topic(topics, i)
        )
        (cfg / "base.yaml").write_text(textwrap.dedent(text).lstrip())
        os.environ["LOOM_TEST_FLOW_NAME"] = f"flow{i}"  # read by the factory each time it is imported
        compiled.append(compile_spec(LoomFlowSpec(SHAPES, config=cfg, environment="test")))
    print(f"setup: {len(topics)} flows compiled in {time.perf_counter() - started:.1f} s")
    return compiled


def output_topic(topics: list[str], i: int) -> str:
    """Flow i's output topic: the next flow's source topic inside a chain of ``CHAIN``, else its own."""
    chained = (i + 1) % CHAIN != 0 and i + 1 < len(topics)
    return topics[i + 1] if chained else f"{topics[i]}.out"


def graph_of(compiled: list[CompiledFlow]) -> LoomAssetGraph:
    """The asset graph of *compiled* flows, as a code location lays it out."""
    return build_asset_graph(compiled, LoomTranslator())


def tick(
    sensor: dg.SensorDefinition, instance: dg.DagsterInstance, cursor: str | None, state_dir: Path
) -> tuple[float, int, str, dict[str, int], dict[str, Any]]:
    """One sensor evaluation: wall seconds, broker requests, the new cursor, flows per status and the
    metadata of the first flow's evaluation (plain values).

    The sensor reads each flow's deployment record through the ``loom`` resource (for ``STARTING``);
    here none of the flows is deployed, so every read finds no record."""
    resources = {"loom": LoomDeployResource(state_dir=str(state_dir))}
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    started = time.perf_counter()
    data = sensor.evaluate_tick(context)
    elapsed = time.perf_counter() - started
    events = cast(list[dg.AssetCheckEvaluation], data.asset_events)
    if not events:
        raise RuntimeError(f"the sensor reported no check evaluation: {data.skip_message or data}")
    requests = int(cast(int, events[0].metadata["broker_requests"].value))
    statuses: dict[str, int] = {}
    for event in events:
        status = str(event.metadata["status"].value)
        statuses[status] = statuses.get(status, 0) + 1
    first = {k: getattr(v, "value", v) for k, v in events[0].metadata.items()}
    return elapsed, requests, data.cursor or "", statuses, first


def measure(
    graph: LoomAssetGraph, instance: dg.DagsterInstance, ticks: int, state_dir: Path
) -> dict[str, Any]:
    """*ticks* consecutive sensor ticks on *graph* (offset lag only), and one plain fetch of its targets."""
    settings = KafkaLagSettings(window=10, read_delay=False)
    sensor = build_kafka_lag_sensor(graph, settings, default_status=dg.DefaultSensorStatus.STOPPED)
    cursor: str | None = None
    times, requests = [], set()
    statuses: dict[str, int] = {}
    for _ in range(ticks):
        elapsed, count, cursor, statuses, _ = tick(sensor, instance, cursor, state_dir)
        times.append(elapsed)
        requests.add(count)
    targets = [t for _, t in kafka_lag_targets(graph)]
    fetched = fetch_offsets(targets, timeout_s=settings.request_timeout_s)
    return {
        "flows": len(graph.flows),
        "partitions": sum(len(t.partitions) for t in fetched.targets.values()),
        "requests": sorted(requests),
        "by_api": fetched.by_api(),
        "first_s": times[0],
        "warm_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "warm_min_s": min(times[1:]) if len(times) > 1 else times[0],
        "fetch_s": fetched.seconds,
        "group_s": sum(c.group_offsets_s for c in fetched.clusters),
        "cursor": len(cursor or ""),
        "ticks": ticks,
        "statuses": statuses,
    }


def group_targets(bootstrap: str, prefix: str, groups: int) -> list[LagTarget]:
    """The lag targets of the first *groups* prepared flows (what the sensor builds from their records)."""
    cluster = KafkaCluster(bootstrap)
    return [LagTarget(f"flow{i}", f"{prefix}-g{i}", (f"{prefix}.flow{i}",), cluster) for i in range(groups)]


def group_ticks(targets: list[LagTarget], ticks: int) -> dict[str, Any]:
    """*ticks* consecutive ``check_lag`` calls (fetch + evaluation, what a tick does before building
    Dagster events) on *targets*, after one warm-up fetch."""
    settings = KafkaLagSettings(window=10, request_timeout_s=60.0, read_delay=False)
    fetch_offsets(targets, timeout_s=settings.request_timeout_s)  # coordinators and leaders known
    windows, times, fetches = LagWindows(), [], []
    for _ in range(ticks):
        started = time.perf_counter()
        report = check_lag(targets, settings, windows)
        times.append(time.perf_counter() - started)
        windows = report.windows
        fetches.append(report.fetch)
    return {
        "groups": len(targets),
        "tick_s": statistics.median(times),
        "tick_min_s": min(times),
        "group_s": statistics.median(sum(c.group_offsets_s for c in f.clusters) for f in fetches),
        "requests": sorted({f.requests for f in fetches}),
        "coordinators": sorted({f.by_api().get("FindCoordinator", 0) for f in fetches}),
        "total_lag": sum(flow.total_lag for flow in report.flows),
    }


DELAY_PATHS = {
    "offset-only": KafkaLagSettings(window=10, read_delay=False, end_to_end=False),
    "offset+delay": KafkaLagSettings(window=10, end_to_end=False),
}
END_TO_END_PATHS = {
    "e2e off": KafkaLagSettings(window=10, end_to_end=False),
    "e2e on": KafkaLagSettings(window=10, end_to_end=True),
}


def compare_delay(
    graph: LoomAssetGraph, instance: dg.DagsterInstance, ticks: int, state_dir: Path
) -> dict[str, Any]:
    """The sensor tick offset-only vs offset+delay (``alternate``); then the delay readers' broker
    requests, counted once."""
    row = alternate(graph, instance, ticks, state_dir, DELAY_PATHS)
    targets = [t for _, t in kafka_lag_targets(graph)]
    counted = check_lag(targets, DELAY_PATHS["offset+delay"], count_requests=True).delays
    row["delay_requests"] = counted.requests if counted is not None else 0
    row["delay_by_api"] = counted.by_api() if counted is not None else {}
    return row


def alternate(
    graph: LoomAssetGraph,
    instance: dg.DagsterInstance,
    ticks: int,
    state_dir: Path,
    paths: dict[str, KafkaLagSettings],
) -> dict[str, Any]:
    """The sensor tick with each of the two *paths*' settings: the two sensors alternate (who goes first
    alternates too) for 1 warm-up + *ticks* ticks each. Per path: median and min tick, the broker requests
    of each tick's offset fetch and its delay read (partitions read/asked), statuses, the first flow's
    metadata; the ratio second / first of the medians."""
    names = list(paths)
    sensors = {
        name: build_kafka_lag_sensor(graph, settings, default_status=dg.DefaultSensorStatus.STOPPED)
        for name, settings in paths.items()
    }
    cursors: dict[str, str | None] = dict.fromkeys(names)
    times: dict[str, list[float]] = {name: [] for name in names}
    requests: dict[str, set[int]] = {name: set() for name in names}
    read_s: dict[str, list[float]] = {name: [] for name in names}
    read: dict[str, set[str]] = {name: set() for name in names}
    statuses: dict[str, dict[str, int]] = {}
    firsts: dict[str, dict[str, Any]] = {}
    for i in range(ticks + 1):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            elapsed, count, cursors[name], statuses[name], firsts[name] = tick(
                sensors[name], instance, cursors[name], state_dir
            )
            if i == 0:
                continue
            times[name].append(elapsed)
            requests[name].add(count)
            first = firsts[name]
            if "delay_read_seconds" in first:
                read_s[name].append(float(first["delay_read_seconds"]))
                read[name].add(f"{first['delay_partitions_read']}/{first['delay_partitions_asked']}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "ticks": ticks,
        "median": medians,
        "min": {name: min(values) for name, values in times.items()},
        "requests": {name: sorted(values) for name, values in requests.items()},
        "statuses": statuses,
        "read_s": {name: statistics.median(v) if v else 0.0 for name, v in read_s.items()},
        "read": {name: sorted(v) for name, v in read.items()},
        "first": firsts,
        "ratio": medians[names[1]] / medians[names[0]],
    }


def compare_end_to_end(
    graph: LoomAssetGraph, instance: dg.DagsterInstance, ticks: int, state_dir: Path
) -> dict[str, Any]:
    """The sensor tick with the delay read, end-to-end delay off vs on (``alternate``); the end-to-end
    figures of the flows; and ``EndToEndTopology.compute`` alone, at this size and for 1,000 chained
    flows (median of 20)."""
    row = alternate(graph, instance, ticks, state_dir, END_TO_END_PATHS)
    events = last_events(graph, instance, state_dir)
    delays = [e["loom/end_to_end_delay_s"] for e in events if e.get("loom/end_to_end_delay_s") is not None]
    longest = max(events, key=lambda e: str(e.get("loom/end_to_end_path", "")).count("->"), default={})
    row["e2e_flows"] = len(delays)
    row["e2e_complete"] = sum(bool(e.get("loom/end_to_end_complete")) for e in events)
    row["e2e_max"] = max(delays, default=None)
    row["e2e_example"] = longest.get("loom/end_to_end_path", "")
    row["compute"] = {len(graph.flows): compute_seconds(graph), 1000: compute_seconds(synthetic_chain(1000))}
    return row


def last_events(graph: LoomAssetGraph, instance: dg.DagsterInstance, state_dir: Path) -> list[dict[str, Any]]:
    """The metadata (plain values) of every flow's evaluation in one more tick with end-to-end on."""
    sensor = build_kafka_lag_sensor(
        graph, END_TO_END_PATHS["e2e on"], default_status=dg.DefaultSensorStatus.STOPPED
    )
    context = dg.build_sensor_context(
        instance=instance, resources={"loom": LoomDeployResource(state_dir=str(state_dir))}
    )
    data = sensor.evaluate_tick(context)
    return [
        {k: getattr(v, "value", v) for k, v in event.metadata.items()}
        for event in cast(list[dg.AssetCheckEvaluation], data.asset_events)
    ]


def compute_seconds(graph: LoomAssetGraph | EndToEndTopology, repeat: int = 20) -> float:
    """Median seconds of one ``EndToEndTopology.compute`` over *graph*'s flows, every hop 1 s delayed."""
    topology = graph if isinstance(graph, EndToEndTopology) else end_to_end_topology(graph)
    seen = {key: {edge.topic: TopicDelay(1.0) for edge in edges} for key, edges in topology.edges.items()}
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        topology.compute(seen)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def synthetic_chain(flows: int) -> EndToEndTopology:
    """The topology of *flows* records chained in runs of ``CHAIN`` (no compile, no broker)."""
    records = []
    for i in range(flows):
        out = f"t{i + 1}" if (i + 1) % CHAIN else f"t{i}.out"
        record = LoomFlow(
            f"f{i}", "m:f", "p", "c", "bench", "kafka", f"g{i}", "at_least_once",
            source_topics=(LoomSourceTopic(f"t{i}", f"f{i}", f"g{i}"),),
            output_topics=(LoomOutputTopic(out, f"f{i}", TopicRole.OUTPUT, "out"),),
        )  # fmt: skip
        records.append((f"loom/f{i}", record))
    return EndToEndTopology.from_flows(records)


def print_end_to_end_table(row: dict[str, Any], flows: int, partitions: int) -> None:
    """End-to-end off vs on sensor ticks, side by side, the ratio of the medians, and the computation."""
    print(
        f"\nsensor tick with the delay read, {flows} flows x {partitions} partitions ({CHAIN}-flow chains): "
        f"end-to-end off vs on, {row['ticks']} warm ticks each, alternating"
    )
    print(f"{'path':>8} {'tick med s':>11} {'tick min s':>11} {'requests':>9} {'delay read':>11}")
    for name in END_TO_END_PATHS:
        requests = "/".join(map(str, row["requests"][name]))
        read = ",".join(row["read"][name]) or "-"
        print(f"{name:>8} {row['median'][name]:>11.3f} {row['min'][name]:>11.3f} {requests:>9} {read:>11}")
    compute = ", ".join(f"{n} flows {s * 1000:.2f} ms" for n, s in row["compute"].items())
    print(
        f"ratio e2e on / off (medians): {row['ratio']:.3f}x; broker requests per tick (offset fetch) "
        f"{row['requests']['e2e off']} vs {row['requests']['e2e on']}, delay partitions read "
        f"{row['read']['e2e off']} vs {row['read']['e2e on']} (the end-to-end delay reads nothing); "
        f"end-to-end computation alone: {compute}"
    )
    print(
        f"end-to-end: {row['e2e_flows']} flows with a value ({row['e2e_complete']} complete), largest "
        f"{row['e2e_max']} s; the longest path: {row['e2e_example']}"
    )


def print_delay_table(row: dict[str, Any], flows: int, partitions: int) -> None:
    """Offset-only vs offset+delay sensor ticks, side by side, and the ratio of the medians."""
    print(
        f"\nsensor tick, {flows} flows x {partitions} partitions: offset-only vs offset+delay, "
        f"{row['ticks']} warm ticks each, alternating"
    )
    print(
        f"{'path':>13} {'tick med s':>11} {'tick min s':>11} {'requests':>9} {'delay read s':>13} {'read':>9}"
    )
    for name in DELAY_PATHS:
        delay = name == "offset+delay"
        read_s = f"{row['read_s'][name]:.3f}" if delay else "-"
        read = ",".join(row["read"][name]) if delay else "-"
        requests = "/".join(map(str, row["requests"][name]))
        print(
            f"{name:>13} {row['median'][name]:>11.3f} {row['min'][name]:>11.3f} {requests:>9} "
            f"{read_s:>13} {read:>9}"
        )
    print(
        f"ratio offset+delay / offset-only (medians): {row['ratio']:.2f}x; delay readers' broker requests "
        f"{row['delay_requests']} {row['delay_by_api']} (counted once, on top of the offset fetch's); "
        f"statuses {row['statuses']['offset+delay']}"
    )


def print_group_table(rows: list[dict[str, Any]], partitions: int, ticks: int) -> None:
    """``check_lag`` per number of groups (medians over *ticks* ticks)."""
    print(
        f"\ncheck_lag for N groups ({partitions} partitions each), {ticks} ticks; committed offsets by one "
        "list_consumer_group_offsets per group, all in flight at once; group s = that phase of the fetch"
    )
    columns = [
        ("groups", 6, lambda r: r["groups"]),
        ("tick med s", 11, lambda r: f"{r['tick_s']:.3f}"),
        ("tick min s", 11, lambda r: f"{r['tick_min_s']:.3f}"),
        ("group s", 8, lambda r: f"{r['group_s']:.3f}"),
        ("requests", 9, lambda r: "/".join(map(str, r["requests"]))),
        ("FindCoordinator", 16, lambda r: "/".join(map(str, r["coordinators"]))),
        ("total lag", 10, lambda r: r["total_lag"]),
    ]
    print(" ".join(f"{name:>{width}}" for name, width, _ in columns))
    for row in rows:
        print(" ".join(f"{str(get(row)):>{width}}" for _, width, get in columns))


def main(argv: list[str] | None = None) -> None:
    """Run the bench and print the tables."""
    parser = argparse.ArgumentParser(prog="bench/lag_sensor.py")
    parser.add_argument("--flows", type=int, default=200)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--groups", default=",".join(map(str, GROUP_SIZES)), help="group counts to time")
    parser.add_argument("--delay-ticks", type=int, default=10, help="warm ticks per path, offset vs delay")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the bench still runs")
    args = parser.parse_args(argv)
    group_sizes = sorted({int(n) for n in args.groups.split(",") if n.strip()})
    ticks_per_size = GROUP_TICKS
    if args.smoke:
        args.flows, args.partitions = SMOKE_FLOWS, SMOKE_PARTITIONS
        group_sizes, ticks_per_size = list(SMOKE_GROUP_SIZES), 2
        args.delay_ticks = 2
    sizes = sorted({n for n in SIZES if n < args.flows} | {args.flows})
    headline_ticks = 3 if args.smoke else 10
    prefix = f"lagbench{uuid.uuid4().hex[:6]}"
    with (
        broker() as bootstrap,
        dg.instance_for_test() as instance,
        tempfile.TemporaryDirectory(prefix="lag-bench-") as tmp,
    ):
        print(f"broker {bootstrap}; {args.flows} flows x {args.partitions} partitions, one group per flow")
        topics = prepare(bootstrap, prefix, args.flows, args.partitions)
        compiled = compile_flows(bootstrap, prefix, topics, Path(tmp))
        full = graph_of(compiled)
        fetch_offsets([t for _, t in kafka_lag_targets(full)])  # warm-up: leaders and coordinator ready
        state_dir = Path(tmp) / "state"
        headline = measure(full, instance, headline_ticks, state_dir)
        print(
            f"\none sensor tick, {headline['flows']} flows x {args.partitions} partitions "
            f"({headline['partitions']} partitions): {headline['warm_s']:.3f} s warm median, "
            f"{headline['warm_min_s']:.3f} s warm min "
            f"({headline['first_s']:.3f} s first), broker requests {headline['requests']} "
            f"{headline['by_api']}; cursor after {headline_ticks} ticks (window 10): {headline['cursor']} "
            f"chars; statuses {headline['statuses']}"
        )
        rows = [measure(graph_of(compiled[:n]), instance, 3, state_dir) for n in sizes[:-1]]
        print_table([*rows, headline])
        print_delay_table(
            compare_delay(full, instance, args.delay_ticks, state_dir), args.flows, args.partitions
        )
        print_end_to_end_table(
            compare_end_to_end(full, instance, args.delay_ticks, state_dir), args.flows, args.partitions
        )
        if group_sizes:
            if max(group_sizes) > args.flows:
                prepare(bootstrap, prefix, max(group_sizes), args.partitions, first=args.flows)
            timed = [group_ticks(group_targets(bootstrap, prefix, n), ticks_per_size) for n in group_sizes]
            print_group_table(timed, args.partitions, ticks_per_size)


def print_table(rows: list[dict[str, Any]]) -> None:
    """The per-size table (one sensor tick = one fetch + evaluation + check events)."""
    columns = [
        ("flows", 5, lambda r: r["flows"]),
        ("parts", 6, lambda r: r["partitions"]),
        ("requests", 9, lambda r: "/".join(map(str, r["requests"]))),
        ("tick first s", 13, lambda r: f"{r['first_s']:.3f}"),
        ("tick warm med s", 16, lambda r: f"{r['warm_s']:.3f}"),
        ("tick warm min s", 16, lambda r: f"{r['warm_min_s']:.3f}"),
        ("fetch s", 8, lambda r: f"{r['fetch_s']:.3f}"),
        ("group s", 8, lambda r: f"{r['group_s']:.3f}"),
        ("cursor chars", 13, lambda r: r["cursor"]),
        ("after ticks", 12, lambda r: r["ticks"]),
    ]
    print("\n" + " ".join(f"{name:>{width}}" for name, width, _ in columns))
    for row in rows:
        print(" ".join(f"{str(get(row)):>{width}}" for _, width, get in columns))


if __name__ == "__main__":
    main()
