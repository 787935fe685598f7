"""A deploy test bench: a topic prefix on the session broker, a config dir, a state dir, and readers
for what the flow wrote (Delta ids, output-topic messages). Every job it deployed is stopped by PID."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
from confluent_kafka import Consumer, TopicPartition

from loom_dagster import DeploymentStore, LoomDeployResource, LoomFlowSpec, build_loom_defs
from loom_dagster.core import procfs
from loom_dagster.dev.produce import produce
from tests.conftest import make_topics, ticks_config
from tests.flows.delta_only import Tick

TICKS = "tests.flows.delta_only:ticks_flow"


def runtime_argv(config: Path, status_file: Path, *extra: str) -> list[str]:
    """``python -m loom_dagster.runtime`` for the ticks flow with *config* in the ``test`` environment,
    as a test starts it by hand (*extra*: more runtime flags)."""
    return [
        sys.executable,
        "-m",
        "loom_dagster.runtime",
        "--import-path",
        TICKS,
        "--config",
        str(config),
        "--environment",
        "test",
        "--status-file",
        str(status_file),
        *extra,
    ]


@dataclass
class DeployBench:
    """Everything one deploy test needs, on a unique topic prefix."""

    bootstrap: str
    prefix: str
    root: Path
    partitions: int = 3
    produced: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        make_topics(self.bootstrap, self.prefix, ["ticks", "ticks.out", "ticks.dlq"], self.partitions)
        self.delta_uri = str(self.root / "delta" / "ticks")
        self.config = ticks_config(
            self.root / "config", brokers=self.bootstrap, prefix=self.prefix, delta_uri=self.delta_uri
        )
        self.state_dir = self.root / "state"
        self.store = DeploymentStore(self.state_dir)

    def resource(self, **overrides: Any) -> LoomDeployResource:
        """The deploy resource on this bench's state dir."""
        return LoomDeployResource(state_dir=str(self.state_dir), **{"health_timeout_s": 60.0, **overrides})

    def spec(self, **env: str) -> LoomFlowSpec:
        """The ticks flow spec; *env* goes to the job's environment (e.g. LOOM_TEST_VERSION)."""
        return LoomFlowSpec(TICKS, config=self.config, environment="test", env=env)

    def defs(self, **env: str) -> dg.Definitions:
        """Definitions for the ticks flow."""
        return build_loom_defs([self.spec(**env)])

    def materialize(
        self,
        instance: dg.DagsterInstance,
        resource: LoomDeployResource | None = None,
        spec: LoomFlowSpec | None = None,
        **env: str,
    ) -> dg.ExecuteInProcessResult:
        """Materialize (deploy) the ticks flow asset (or *spec*'s flow) on *instance*."""
        defs = build_loom_defs([spec]) if spec is not None else self.defs(**env)
        return dg.materialize(
            list(defs.assets or []),
            selection=[dg.AssetKey(["loom", "ticks"])],
            resources={"loom": resource or self.resource()},
            instance=instance,
            raise_on_error=False,
        )

    def produce(self, start: int, count: int) -> None:
        """Produce ticks ``start .. start+count-1``."""
        ids = [f"id-{i}" for i in range(start, start + count)]
        produce(
            self.bootstrap,
            f"{self.prefix}.ticks",
            [Tick(id=i, seq=n) for n, i in enumerate(ids, start)],
            key=lambda t: t.id,
        )
        self.produced.extend(ids)

    def delta_ids(self) -> Counter[str]:
        """Ids in the Delta table, with multiplicity."""
        from deltalake import DeltaTable

        try:
            table = DeltaTable(self.delta_uri).to_pyarrow_table(columns=["id"])
        except Exception:
            return Counter()
        return Counter(table.column("id").to_pylist())

    def wait_for_delta(self, expected: set[str], timeout_s: float = 90.0, nudge: bool = True) -> Counter[str]:
        """Wait until every expected id is in Delta. loom flushes table buffers only when new data arrives,
        so a tail can sit in the buffer on an idle topic; *nudge* produces one marker message per second to
        keep data arriving (markers are excluded from loss/duplicate counts)."""
        deadline = time.monotonic() + timeout_s
        marker = 0
        while time.monotonic() < deadline:
            ids = self.delta_ids()
            if expected <= set(ids):
                return ids
            if nudge:
                produce(
                    self.bootstrap,
                    f"{self.prefix}.ticks",
                    [Tick(id=f"nudge-{time.time_ns()}-{marker}", seq=-1)],
                )
                marker += 1
            time.sleep(1.0)
        missing = expected - set(self.delta_ids())
        raise AssertionError(f"{len(missing)} id(s) never reached Delta, e.g. {sorted(missing)[:5]}")

    def output_messages(self, timeout_s: float = 10.0) -> int:
        """How many messages the output topic holds (end offsets summed)."""
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"{self.prefix}-probe"})
        try:
            topic = f"{self.prefix}.ticks.out"
            meta = consumer.list_topics(topic, timeout=timeout_s)
            total = 0
            for p in meta.topics[topic].partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
                total += high - low
            return total
        finally:
            consumer.close()

    def alive_pids(self) -> list[int]:
        """PIDs of the recorded deployment's processes that are alive."""
        current = self.store.current("ticks")
        if current is None:
            return []
        return [p.pid for p in current.job.processes if procfs.is_alive(p.pid, p.start_ticks)]

    def stop_everything(self) -> None:
        """Stop every job this bench launched (by PID + start time), from the records and their history."""
        kill_deployed_jobs(self.store, ["ticks"])


def runtime_pids_for(state_dir: Path) -> list[int]:
    """Every live ``loom_dagster.runtime`` process whose status file lives under *state_dir*."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = procfs.cmdline(int(entry.name))
        if "loom_dagster.runtime" in argv and any(str(state_dir) in a for a in argv):
            if procfs.is_alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def kill_deployed_jobs(store: DeploymentStore, flows: Iterable[str], state_dir: Path | None = None) -> None:
    """SIGKILL every process of *flows*' current and past deployments in *store* (by PID + start time,
    waiting until each is dead), then any job runtime left under *state_dir* (by PID)."""
    for flow in flows:
        current = store.current(flow)
        for deployment in [*store.history(flow), *([current] if current else [])]:
            for proc in deployment.job.processes:
                if procfs.is_alive(proc.pid, proc.start_ticks):
                    os.kill(proc.pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while procfs.is_alive(proc.pid, proc.start_ticks) and time.monotonic() < deadline:
                    time.sleep(0.02)  # a SIGKILL is delivered asynchronously: wait until it is dead
    for pid in runtime_pids_for(state_dir) if state_dir is not None else ():
        os.kill(pid, signal.SIGKILL)


def bench_fixture(kafka: Any, tmp_path: Path, prefix: str) -> Iterator[DeployBench]:
    """Yield a bench; stop whatever it launched afterwards."""
    bench = DeployBench(kafka.bootstrap_servers, prefix, tmp_path)
    try:
        yield bench
    finally:
        kill_deployed_jobs(bench.store, ["ticks"], bench.state_dir)
