"""Broker restarts under the Kafka coordinator requests of the sensors and deploy checks, and what running
those requests in a child process costs (``loom_dagster.core.kafka.isolation``, librdkafka#4605).

1. Cost, side by side on one broker: the lag fetch of 1 and ``--groups`` consumer groups (6 partitions
   each) and one fence describe, made in this process (``.in_process``, as before) and through the child
   process (as now), alternating, medians of ``--repeat`` calls.
2. Restarts: a process makes those requests in a loop (2 threads per request) while the broker is
   stopped (SIGKILL, then SIGTERM, alternating) for ``--outage`` seconds and started again on the same
   ports, ``--restarts`` times: first with the requests in-process (the process dies when librdkafka
   aborts: the restart it died at is printed), then through child processes (it must live through all).

    .venv/bin/python bench/broker_restart.py [--restarts 5] [--outage 8] [--groups 200] [--repeat 7]
    .venv/bin/python bench/broker_restart.py --smoke      # 1 restart, 4 groups: checks the bench runs

Always starts its own broker (it restarts it). Prints figures measured in this run; asserts nothing but
that the isolated process survived.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402

from loom_dagster.core.checks.fence import describe_fences  # noqa: E402
from loom_dagster.core.kafka.cluster import KafkaCluster, LagTarget  # noqa: E402
from loom_dagster.core.kafka.offsets import _fetch_cluster_requests  # noqa: E402
from loom_dagster.dev.kafka import ENV_BOOTSTRAP, KafkaBroker, create_topics  # noqa: E402
from tests.support.broker_restart import RestartReport, run_restarts  # noqa: E402

PARTITIONS = 6


def _commit_groups(bootstrap: str, topic: str, groups: list[str]) -> None:
    """Give every group a committed offset (0) on every partition, as running flows have."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for group in groups:
        request = [
            ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        ]
        next(iter(admin.alter_consumer_group_offsets(request, request_timeout=120).values())).result()


def _median_s(call: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_cost(broker: KafkaBroker, groups: int, repeat: int) -> None:
    topic = f"cost-{uuid.uuid4().hex[:6]}"
    create_topics(broker.bootstrap_servers, [topic], partitions=PARTITIONS)
    names = [f"{topic}-g{i}" for i in range(groups)]
    _commit_groups(broker.bootstrap_servers, topic, names)
    cluster = KafkaCluster(broker.bootstrap_servers)
    targets = [LagTarget(name=g, group=g, topics=(topic,), cluster=cluster) for g in names]
    in_process: Any = _fetch_cluster_requests.in_process  # type: ignore[attr-defined]
    fences_here: Any = describe_fences.in_process  # type: ignore[attr-defined]
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        (
            "lag fetch, 1 group",
            lambda: in_process(cluster, targets[:1], 10.0),
            lambda: _fetch_cluster_requests(cluster, targets[:1], 10.0),
        ),
        (
            f"lag fetch, {groups} groups",
            lambda: in_process(cluster, targets, 10.0),
            lambda: _fetch_cluster_requests(cluster, targets, 10.0),
        ),
        (
            "fence describe, 1 group",
            lambda: fences_here(cluster, [names[0]], 10.0),
            lambda: describe_fences(cluster, [names[0]], 10.0),
        ),
    ]
    print(
        f"{'request':<26} {'in-process s':>13} {'child s':>9} {'added s':>8} {'ratio':>6} {'kafka-python s':>15}"
    )
    for label, here, isolated in cases:
        pure = _kafka_python_fetch(
            broker.bootstrap_servers, topic, names[:1] if "1 group" in label else names
        )
        calls = [here, isolated, *([pure] if pure and label.startswith("lag") else [])]
        for call in calls:
            call()  # warm-up: coordinators and leaders known
        times: list[list[float]] = [[] for _ in calls]
        for _ in range(repeat):  # interleaved, so every variant sees the same machine load
            for i, call in enumerate(calls):
                times[i].append(_median_s(call, 1))
        a, b, *c = (statistics.median(t) for t in times)
        pure_text = f"{c[0]:>15.3f}" if c else f"{'-':>15}"
        print(f"{label:<26} {a:>13.3f} {b:>9.3f} {b - a:>8.3f} {b / a:>6.2f} {pure_text}")
    if _kafka_python_fetch(broker.bootstrap_servers, topic, names[:1]) is None:
        print("(kafka-python not installed: `pip install kafka-python` adds its lag fetch to the comparison)")


def _kafka_python_fetch(bootstrap: str, topic: str, groups: list[str]) -> Callable[[], Any] | None:
    """The same lag fetch (committed offsets of every group, end offsets) with the pure-Python client
    kafka-python 3 (one batched OffsetFetch v8), when it is installed; it is no dependency of ours."""
    try:
        from kafka import KafkaAdminClient
        from kafka import TopicPartition as PureTopicPartition
        from kafka.admin import OffsetSpec as PureOffsetSpec
    except ImportError:
        return None
    parts = [PureTopicPartition(topic, p) for p in range(PARTITIONS)]

    def fetch() -> Any:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            committed = admin.list_group_offsets({g: parts for g in groups})
            return committed, admin.list_partition_offsets({tp: PureOffsetSpec.LATEST for tp in parts})
        finally:
            admin.close()

    return fetch


def _describe(report: RestartReport) -> str:
    aborts = sum(1 for t in report.ticks if "SIGABRT" in t.error)
    fate = (
        f"DIED (exit {report.exit_code}) at restart {report.restarts + 1 if report.restarts == 0 else report.restarts}"
        if report.died
        else f"alive after {report.restarts} restart(s)"
    )
    return (
        f"{report.mode:<11} {fate}; {len(report.ticks)} calls, {report.failed_during_outage()} reported the "
        f"broker unreachable, {aborts} child abort(s) reported as errors; calls after the last return all "
        f"clean: {report.clean_after_last_return(3.0)}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench/broker_restart.py")
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--outage", type=float, default=8.0)
    parser.add_argument("--groups", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="1 restart, 4 groups, 2 repeats")
    args = parser.parse_args(argv)
    if args.smoke:
        args.restarts, args.outage, args.groups, args.repeat = 1, 4.0, 4, 2
    os.environ.pop(ENV_BOOTSTRAP, None)
    with KafkaBroker() as broker:
        print(f"broker {broker.bootstrap_servers} (own, restarted by this bench)\n")
        measure_cost(broker, args.groups, args.repeat)
        print()
        topic = f"restart-{uuid.uuid4().hex[:6]}"
        create_topics(broker.bootstrap_servers, [topic], partitions=3)
        reports = [
            run_restarts(
                broker,
                group=f"{topic}-g",
                topic=topic,
                mode=mode,
                restarts=args.restarts,
                outage_s=args.outage,
                log=lambda line: print(f"  {line}", flush=True),
            )
            for mode in ("in-process", "isolated")
        ]
        print()
        for report in reports:
            print(_describe(report))
        if reports[1].died:
            raise SystemExit("the process whose Kafka requests run in child processes died")


if __name__ == "__main__":
    main()
