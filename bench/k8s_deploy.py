"""Kubernetes deploy bench on a REAL node: the Kubernetes launcher running the ticks flow as real containers
(the test harness's control plane + ``RealNode``: kubelet, containerd, runc, a CNI bridge, CoreDNS; the job
image built from ``docs/kubernetes/Dockerfile`` by ``scripts/k8s-image``), next to the local process launcher,
in one run. Needs root (the node makes cgroups, a bridge and mounts) and the node's machine-wide lock: if a
test run (or another bench) has a ``RealNode`` up, this fails at once, saying so.

    .venv/bin/python bench/k8s_deploy.py [--rounds 3] [--messages 20000]     # as root
    .venv/bin/python bench/k8s_deploy.py --smoke     # one round, 2,000 messages; no figures asserted

One control plane, one node, one import of the job image and one Kafka broker (on the node's bridge address,
so pods reach it; a shared ``LOOM_DAGSTER_KAFKA_BOOTSTRAP`` broker on loopback is not reachable from pods and
is ignored) serve the whole run; everything is torn down at the end, also on an error, Ctrl-C or SIGTERM.
Pods use the probes the manifests ship (readiness every 2 s, liveness every 10 s): no test-only settings.

1. Deploy: each round is a fresh flow (new topics; on Kubernetes a new namespace enforcing the
   ``restricted`` Pod Security level, the Delta dir a PersistentVolume) deployed (version 1), then
   redeployed (version 2), on each launcher (the two alternate which goes first). Columns: ``deploy`` =
   the whole materialization (compile, checks, snapshot, preflight, drain, launch, health gate, record),
   ``gate`` = launch -> healthy (``loom/gate_s``; on Kubernetes the pod Ready from the kubelet's readiness
   probe), ``drain`` = stop of the previous version (``loom/drain_s``), ``preflight`` = the new version
   checked before anything is drained (from the "preflight passed: ..." deploy log line: a one-off pod of
   the new template on Kubernetes, a fresh local process on the local launcher; none on a first deploy of
   one process). Medians over ``--rounds``.
2. Throughput on the real node: the ticks flow (Kafka -> Delta) on a 6-partition topic with ``processes`` 1
   vs 2 (two pods). The ticks are those ``DeployBench.produce`` sends, encoded beforehand (loom's encoding
   in Python, ~4,000 messages/s, would otherwise pace the flow). Right after the deploy, a warm-up of two
   full buffers a process: ``first commit`` = healthy -> the first Delta commit (group join, first poll,
   the first 1,000-row flush). Then ``--rounds`` timed batches of ``--messages``: ``batch`` = first message
   sent -> the Delta commit that completes the batch, its tail included (loom flushes a partial buffer
   when a record arrives and the buffer is 1 s old: markers go to every partition every 0.25 s once all
   but the tail is written, instead of ``wait_for_delta``'s one a second, which would put the end on a 1 s
   grid; ``wait_for_delta`` then confirms every id), ``msgs/s`` = messages / batch, and ``steady`` = the
   rate in the Delta commit log between the commits that reach 10% and 90% of the batch (no tail).
   Medians over the batches.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
from _common import ROOT

from loom_dagster import LoomDeployResource, LoomFlowSpec, build_loom_defs
from loom_dagster.dev.kafka import ENV_BOOTSTRAP, KafkaBroker
from tests.support.deploy_env import TICKS, DeployBench, bench_fixture
from tests.support.k8s.cluster import KubeCluster, build_binaries
from tests.support.k8s.job_image import JobImage, job_image
from tests.support.k8s.node import MACHINE_LOCK, MACHINE_STATE, RealNode, build_node_binaries
from tests.support.k8s.real_env import real_node_bench, real_node_config

PARTITIONS = 6  # the throughput topic
BUFFER = 1000  # the ticks config's buffer_max_records (DeployBench's default): the unflushed tail per process
SMOKE_MESSAGES = 2000
PREFLIGHT_TOOK = re.compile(r"(\d+(?:\.\d+)?) s\)?\s*$")  # "... in 12.3 s" (kubernetes), "(1.2 s)" (local)


def check_machine() -> None:
    """Fail at once, with the reason, where no real node can start: not root, or one already up."""
    if os.geteuid() != 0:
        raise SystemExit("k8s_deploy: run as root (the real node makes cgroups, a bridge and mounts)")
    try:
        fd = os.open(MACHINE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SystemExit(f"k8s_deploy: cannot open the real node's lock {MACHINE_LOCK}: {e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(node_busy()) from None
    finally:
        os.close(fd)  # released: RealNode.start() takes it for the run


def node_busy() -> str:
    try:
        holder = json.loads(MACHINE_STATE.read_text()).get("owner_pid", "unknown")
    except (OSError, ValueError):
        holder = "unknown"
    return (
        f"k8s_deploy: another real Kubernetes node runs on this machine (process {holder}, e.g. a test "
        f"run of tests/k8s/test_real_node.py; lock {MACHINE_LOCK}): only one kubelet can run at a time. "
        "Run the bench again when it has finished."
    )


def on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwind through every context manager: tear down


class Interrupts:
    """SIGINT/SIGTERM noted by the interpreter's wakeup fd. Outside the step's own code, a materialization
    holds interrupts until its checkpoints and forgets them when the run ends (dagster's
    ``capture_interrupts``): a Ctrl-C landing there would be lost, and the bench would go on. The wakeup
    fd is written for every signal, whoever's handler runs; ``check`` raises after the materialization."""

    def __init__(self) -> None:
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def seen(self) -> bool:
        try:
            data = os.read(self.read_fd, 4096)
        except BlockingIOError:
            return False
        return signal.SIGINT in data or signal.SIGTERM in data

    def check(self) -> None:
        if self.seen():
            raise KeyboardInterrupt("interrupted during a materialization")


INTERRUPTS: Interrupts | None = None  # installed by main()


def deploy(
    spec: LoomFlowSpec, resource: LoomDeployResource, instance: dg.DagsterInstance
) -> dict[str, float]:
    """One materialization of the ticks flow: its wall time, the gate/drain times it recorded, and the
    preflight time its deploy log reported (NaN where there was none)."""
    defs = build_loom_defs([spec], state=False)
    if INTERRUPTS is not None:
        INTERRUPTS.seen()  # forget the signals already acted on
    started = time.perf_counter()
    result = dg.materialize(
        list(defs.assets or []),  # type: ignore[arg-type]
        selection=[dg.AssetKey(["loom", "ticks"])],
        resources={"loom": resource},
        instance=instance,
        raise_on_error=False,
    )
    wall = time.perf_counter() - started
    if INTERRUPTS is not None:
        INTERRUPTS.check()
    if not result.success:
        failure = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        error = failure[0].step_failure_data.error if failure else None
        raise RuntimeError(f"deploy failed: {error.message if error else '?'}")
    (materialization,) = result.asset_materializations_for_node(result.all_node_events[0].node_name)
    metadata = materialization.metadata
    gate, drain = metadata.get("loom/gate_s"), metadata.get("loom/drain_s")
    preflight = math.nan
    for entry in instance.all_logs(result.run_id):
        message = entry.user_message or ""
        if message.startswith("preflight passed:") and (took := PREFLIGHT_TOOK.search(message)):
            preflight = float(took.group(1))
    return {
        "deploy_s": wall,
        "gate_s": float(gate.value) if gate is not None else math.nan,  # type: ignore[arg-type]
        "drain_s": float(drain.value) if drain is not None else math.nan,  # type: ignore[arg-type]
        "preflight_s": preflight,
    }


# --- 1. deploy and redeploy, both launchers -------------------------------------------------------------

Setup = Callable[[Path, str], contextlib.AbstractContextManager[tuple[DeployBench, LoomDeployResource]]]


def deploy_round(name: str, setup: Setup, root: Path, instance: dg.DagsterInstance) -> list[dict[str, Any]]:
    """A fresh flow deployed (version 1) then redeployed (version 2); undeployed after."""
    prefix = f"k{uuid.uuid4().hex[:6]}"
    rows = []
    with setup(root / f"{name}-{prefix}", prefix) as (bench, resource):
        try:
            for kind, version in (("deploy", "1"), ("redeploy", "2")):
                row = deploy(bench.spec(LOOM_TEST_VERSION=version), resource, instance)
                rows.append({"launcher": name, "kind": kind, **row})
        finally:
            resource.deployer().undeploy("ticks", by="bench")
    return rows


# --- 2. throughput on the real node, processes 1 vs 2 ---------------------------------------------------


def last_commit_at(bench: DeployBench) -> float:
    """Wall time (s) of the Delta table's latest commit."""
    from deltalake import DeltaTable

    return float(DeltaTable(bench.delta_uri).history(limit=1)[0]["timestamp"]) / 1000


def writes_since(bench: DeployBench, since: float) -> list[tuple[float, int]]:
    """(commit wall time, rows added) of every Delta write committed at or after *since*, oldest first."""
    from deltalake import DeltaTable

    if not Path(bench.delta_uri, "_delta_log").is_dir():
        return []  # not created yet: loom creates it on its first write
    commits = []
    for entry in DeltaTable(bench.delta_uri).history():
        at = float(entry["timestamp"]) / 1000
        if at >= since and entry.get("operation") == "WRITE":
            commits.append((at, int((entry.get("operationMetrics") or {}).get("num_added_rows", 0))))
    return sorted(commits)


def steady_rate(commits: list[tuple[float, int]], total: int) -> float:
    """Rows/s between the commits that bring the rows to 10% and to 90% of *total*."""
    marks: list[tuple[float, int]] = []
    rows = 0
    for at, added in commits:
        rows += added
        for fraction in (0.1, 0.9)[len(marks) :]:
            if rows >= fraction * total:
                marks.append((at, rows))
    if len(marks) < 2 or marks[1][0] <= marks[0][0]:
        return math.nan
    return (marks[1][1] - marks[0][1]) / (marks[1][0] - marks[0][0])


class Batch:
    """The next *count* ticks of *bench*, exactly as ``DeployBench.produce`` sends them (ids, payloads,
    keys), encoded before the clock starts: loom's envelope encoding runs at ~4,000 messages/s in
    Python and would otherwise pace the flow."""

    def __init__(self, bench: DeployBench, count: int) -> None:
        from loom_dagster.dev.produce import encode
        from tests.flows.delta_only import Tick

        self.bench, self.start = bench, len(bench.produced)
        self.ids = [f"id-{i}" for i in range(self.start, self.start + count)]
        self.encoded = [(i.encode(), encode(Tick(id=i, seq=n))) for n, i in enumerate(self.ids, self.start)]

    def send(self) -> tuple[float, float]:
        """Produce the batch; the wall times of the first send and of the flush."""
        from confluent_kafka import Producer

        bench = self.bench
        assert len(bench.produced) == self.start, "another batch was produced since this one was made"
        topic = f"{bench.prefix}.ticks"
        producer = Producer(
            {"bootstrap.servers": bench.bootstrap, "linger.ms": 5, "enable.idempotence": True}
        )
        producer.list_topics(topic, timeout=10)  # connected before the clock starts
        started = time.time()
        for key, value in self.encoded:
            while True:
                try:
                    producer.produce(topic, value=value, key=key)
                    break
                except BufferError:  # the local queue is full: let it drain
                    producer.poll(0.05)
        if producer.flush(60):
            raise RuntimeError(f"{len(self.ids)} messages to {topic!r} not delivered within 60 s")
        bench.produced.extend(self.ids)
        return started, time.time()


def wait_all_in_delta(
    bench: DeployBench, ids: list[str], since: float, unflushed: int, timeout_s: float
) -> None:
    """Block until every id is in Delta, disturbing the flow as little as possible: first on the commit
    log (cheap) until all but the *unflushed* tail are written; then, since loom flushes a buffer only when
    a record arrives (and it is 1 s old), a marker to every partition every 0.25 s (``wait_for_delta``
    sends one a second to one partition: its end would fall on a 1 s grid, later still with two processes,
    each waiting for a marker on its own partitions) until the ids are read back; ``wait_for_delta`` last."""
    from confluent_kafka import Producer

    from loom_dagster.dev.produce import encode
    from tests.flows.delta_only import Tick

    deadline = time.monotonic() + timeout_s
    while sum(rows for _, rows in writes_since(bench, since)) < len(ids) - unflushed:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(ids)} messages did not reach Delta in {timeout_s:.0f} s")
        time.sleep(0.25)
    expected = set(ids)
    topic = f"{bench.prefix}.ticks"
    producer = Producer({"bootstrap.servers": bench.bootstrap, "linger.ms": 0})
    while not expected <= set(bench.delta_ids()) and time.monotonic() < deadline:
        for partition in range(bench.partitions):
            marker = Tick(id=f"nudge-{time.time_ns()}-{partition}", seq=-1)
            producer.produce(topic, value=encode(marker), partition=partition)
        producer.flush(10)
        time.sleep(0.25)
    bench.wait_for_delta(expected, timeout_s=max(deadline - time.monotonic(), 1.0))


def timed_batch(bench: DeployBench, messages: int, processes: int) -> dict[str, float]:
    """Produce *messages* to the running flow; time until all of them are in Delta."""
    batch = Batch(bench, messages)
    started, produced = batch.send()
    wait_all_in_delta(bench, batch.ids, started, BUFFER * processes, max(120.0, messages / 100))
    done = last_commit_at(bench)
    return {
        "produce_s": produced - started,
        "batch_s": done - started,
        "msgs_s": messages / (done - started),
        "steady_msgs_s": steady_rate(writes_since(bench, started), messages),
    }


def throughput(
    cluster: KubeCluster,
    kafka: KafkaBroker,
    image: JobImage,
    root: Path,
    instance: dg.DagsterInstance,
    processes: int,
    messages: int,
    batches: int,
) -> dict[str, Any]:
    prefix = f"t{processes}{uuid.uuid4().hex[:5]}"
    with real_node_bench(cluster, kafka, root / f"tp{processes}-{prefix}", prefix, PARTITIONS) as env:
        bench = env.bench
        assert bench is not None
        resource = env.resource(
            preflight=True, launcher_config=real_node_config(env, image), health_timeout_s=120
        )
        spec = LoomFlowSpec(TICKS, config=bench.config, environment="test", processes=processes)
        # Two full buffers a process: its first flush is by size, not waiting for a marker.
        warmup = Batch(bench, 2 * BUFFER * processes)
        try:
            row = deploy(spec, resource, instance)
            healthy = time.time()
            warmup.send()
            wait_all_in_delta(bench, warmup.ids, healthy, BUFFER * processes, 120.0)
            first_commit = writes_since(bench, healthy)[0][0] - healthy
            runs = [timed_batch(bench, messages, processes) for _ in range(batches)]
        finally:
            resource.deployer().undeploy("ticks", by="bench")
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {"processes": processes, "deploy_s": row["deploy_s"], "first_commit_s": first_commit, **med}


# --- the run --------------------------------------------------------------------------------------------


def start_cluster(bin_dir: Path, root: Path) -> KubeCluster:
    """The control plane, started again once if a port it picked was taken before its component bound it
    (ports are picked free, then bound; test runs on this machine pick theirs meanwhile)."""
    for attempt in (1, 2):
        cluster = KubeCluster(bin_dir=bin_dir, workdir=root / f"cluster-{attempt}")
        try:
            return cluster.start()
        except RuntimeError as e:
            if attempt == 2 or "address already in use" not in str(e):
                raise
            print(
                f"k8s_deploy: control plane start lost a port race, starting it again: {e}", file=sys.stderr
            )
    raise AssertionError("unreachable")


def start_node(cluster: KubeCluster, workdir: Path) -> RealNode:
    node = RealNode(cluster, workdir)
    try:
        return node.start()
    except RuntimeError as e:
        if "another RealNode runs" in str(e):  # started between check_machine() and here
            raise SystemExit(node_busy()) from None
        raise


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="deploy rounds, and timed batches per setting")
    parser.add_argument("--messages", type=int, default=20_000, help="messages per timed throughput batch")
    parser.add_argument("--smoke", action="store_true", help="one round, 2,000 messages; no figures")
    args = parser.parse_args()
    rounds, messages = (1, SMOKE_MESSAGES) if args.smoke else (args.rounds, args.messages)
    global INTERRUPTS
    signal.signal(signal.SIGTERM, on_sigterm)
    INTERRUPTS = Interrupts()
    os.environ.setdefault("LOOM_DAGSTER_COMPILE_CACHE", "off")
    os.environ.pop(ENV_BOOTSTRAP, None)  # a broker on loopback is out of the pods' reach: start our own
    sys.path.insert(0, str(ROOT))
    check_machine()
    setup: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="k8s-bench-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        t = time.monotonic()
        bin_dir = build_binaries(root / "k8s-build.log")
        build_node_binaries(root / "k8s-node-build.log")
        image = job_image(root / "k8s-image.log")
        setup["builds (no-op when cached)"] = time.monotonic() - t
        cluster = start_cluster(bin_dir, root)
        stack.callback(cluster.stop)
        setup["control plane"] = cluster.start_seconds or math.nan
        node = start_node(cluster, root / "node")
        stack.callback(node.close)  # raises, naming it, if anything is left on the machine
        setup["node"] = node.timings.get("start", math.nan)
        t = time.monotonic()
        node.import_image(image.tarball)
        setup["image import"] = time.monotonic() - t
        t = time.monotonic()
        # after the node: pods reach the broker on the node's bridge address, which the node makes
        kafka = stack.enter_context(KafkaBroker(host=node.host_ip, bootstrap=None))
        setup["broker"] = time.monotonic() - t
        instance = stack.enter_context(dg.instance_for_test())
        rows = run_deploys(cluster, kafka, image, root, instance, rounds)
        flows = [throughput(cluster, kafka, image, root, instance, p, messages, rounds) for p in (1, 2)]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        "setup: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in setup.items())
        + f"; load average at the end {load}"
    )
    print_deploys(rows)
    print()
    print_throughput(flows, messages)
    if args.smoke:
        print("(smoke run: one round, a small batch; figures not meaningful)")


def run_deploys(
    cluster: KubeCluster,
    kafka: KafkaBroker,
    image: JobImage,
    root: Path,
    instance: dg.DagsterInstance,
    rounds: int,
) -> list[dict[str, Any]]:
    @contextlib.contextmanager
    def kubernetes(directory: Path, prefix: str) -> Iterator[tuple[DeployBench, LoomDeployResource]]:
        with real_node_bench(cluster, kafka, directory, prefix) as env:
            assert env.bench is not None
            config = real_node_config(env, image)
            yield env.bench, env.resource(preflight=True, launcher_config=config, health_timeout_s=120)

    @contextlib.contextmanager
    def local(directory: Path, prefix: str) -> Iterator[tuple[DeployBench, LoomDeployResource]]:
        fixture = contextlib.contextmanager(bench_fixture)  # stops by PID whatever it launched, after
        with fixture(kafka, directory, prefix) as bench:
            yield bench, bench.resource(preflight=True)

    rows: list[dict[str, Any]] = []
    order: list[tuple[str, Setup]] = [("local", local), ("kubernetes", kubernetes)]
    for index in range(rounds):
        for name, setup in order if index % 2 == 0 else order[::-1]:
            rows += deploy_round(name, setup, root, instance)
    return rows


def fmt(value: float, width: int) -> str:
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:{width}.2f}"


def print_deploys(rows: list[dict[str, Any]]) -> None:
    n = len(rows) // 4
    print(f"deploy-to-healthy of the ticks flow, medians of {n} round(s)")
    print(f"{'launcher':<11} {'kind':<9} {'deploy s':>9} {'gate s':>8} {'drain s':>8} {'preflight s':>12}")
    medians: dict[tuple[str, str], dict[str, float]] = {}
    for launcher in ("local", "kubernetes"):
        for kind in ("deploy", "redeploy"):
            picked = [r for r in rows if r["launcher"] == launcher and r["kind"] == kind]
            med = {
                k: statistics.median(r[k] for r in picked)
                for k in ("deploy_s", "gate_s", "drain_s", "preflight_s")
            }
            medians[(launcher, kind)] = med
            print(
                f"{launcher:<11} {kind:<9} {fmt(med['deploy_s'], 9)} {fmt(med['gate_s'], 8)} "
                f"{fmt(med['drain_s'], 8)} {fmt(med['preflight_s'], 12)}"
            )
    for kind in ("deploy", "redeploy"):
        local, k8s = medians[("local", kind)], medians[("kubernetes", kind)]
        ratios = [
            f"{k8s['deploy_s'] / local['deploy_s']:.2f}x deploy",
            f"{k8s['gate_s'] / local['gate_s']:.2f}x gate",
        ]
        if kind == "redeploy":
            ratios.append(f"{k8s['drain_s'] / local['drain_s']:.2f}x drain")
            ratios.append(f"{k8s['preflight_s'] / local['preflight_s']:.2f}x preflight")
        print(f"kubernetes / local, {kind}: {', '.join(ratios)}")


def print_throughput(flows: list[dict[str, Any]], messages: int) -> None:
    print(
        f"throughput on the real node, Kafka -> Delta, {PARTITIONS} partitions, {messages:,} messages a "
        "batch (medians over the batches)"
    )
    print(
        f"{'processes':<10} {'deploy s':>9} {'first commit s':>15} {'produce s':>10} {'batch s':>8} "
        f"{'msgs/s':>8} {'steady msgs/s':>14}"
    )
    for f in flows:
        print(
            f"{f['processes']:<10} {fmt(f['deploy_s'], 9)} {fmt(f['first_commit_s'], 15)} "
            f"{fmt(f['produce_s'], 10)} {fmt(f['batch_s'], 8)} {f['msgs_s']:8.0f} {f['steady_msgs_s']:14.0f}"
        )
    one, two = flows
    print(
        f"2 / 1 processes: {two['msgs_s'] / one['msgs_s']:.2f}x msgs/s, "
        f"{two['steady_msgs_s'] / one['steady_msgs_s']:.2f}x steady"
    )


if __name__ == "__main__":
    main()
