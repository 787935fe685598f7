"""Fence start bench: what the consumer-group fence (``loom_dagster.core.checks.fence``) adds to a job's start on a
broker with Kafka's default ``group.initial.rebalance.delay.ms`` (3000), next to a broker with it at 0
(what the test broker, ``loom_dagster.dev.kafka``, sets). Two brokers of this bench's own, alike but for
that one setting:

- ``take a free fence``: ``JobFence.acquire`` on an empty fence group (a fresh consumer group each time),
  i.e. join the group and wait until this member owns the fence partition;
- ``job spawn -> connected``: ``python -m loom_dagster.runtime`` of the ticks flow (Kafka -> Delta + topic,
  ``tests.flows.delta_only``), from spawn to its status record's ``connected_at`` (first poll done), and
  the job's own fence wait from its log (``holding the fence ... (took X s)``).

    .venv/bin/python bench/fence_start.py [--rounds 5] [--job-rounds 3]
    .venv/bin/python bench/fence_start.py --smoke        # one round of each, no warm-up; no figures

Rounds alternate the two brokers, so drift in machine load hits both alike; medians are shown, with the
difference (default - 0) and the ratio. ``LOOM_DAGSTER_KAFKA_BOOTSTRAP`` is ignored (the comparison needs
two brokers whose settings this bench knows), except by ``--smoke``, which takes it for the delay-0 side
(``bench/smoke`` starts that broker with ``loom_dagster.dev.kafka``: delay 0) and starts only the other.
Prints figures measured in this one run; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import ROOT

from loom_dagster.core.checks.fence import FENCE_TOPIC, FenceIdentity, JobFence
from loom_dagster.core.job.status import read_status
from loom_dagster.core.kafka.cluster import KafkaCluster
from loom_dagster.dev.kafka import ENV_BOOTSTRAP, KafkaBroker, create_topics
from tests.conftest import ticks_config

SIDES = {"delay 0": 0, "default": None}
"""Label -> the broker's ``initial_rebalance_delay_ms`` (``None``: Kafka's default, 3000 ms)."""
TICKS = "tests.flows.delta_only:ticks_flow"
_TOOK = re.compile(r"holding the fence .* \(took ([0-9.]+)s\)")


def take_fence(bootstrap: str) -> float:
    """Seconds to acquire the fence of a fresh (empty) consumer group, then release it."""
    fence = JobFence(
        KafkaCluster(bootstrap),
        f"bench-fence-{uuid.uuid4().hex[:8]}",
        FenceIdentity.of_this_process("fence-bench"),
        on_lost=lambda why: None,
    )
    try:
        return fence.acquire(timeout_s=30.0)
    finally:
        fence.release()


def start_job(bootstrap: str, root: Path) -> tuple[float, float]:
    """Spawn the runtime on a fresh topic set; (spawn -> connected s, the job's own fence wait s)."""
    prefix = f"fb{uuid.uuid4().hex[:6]}"
    create_topics(bootstrap, [f"{prefix}.ticks", f"{prefix}.ticks.out", f"{prefix}.ticks.dlq"], 1)
    directory = root / prefix
    config = ticks_config(
        directory / "config", brokers=bootstrap, prefix=prefix, delta_uri=str(directory / "delta")
    )
    status_file = directory / "status.json"
    log_path = directory / "job.log"
    argv = [sys.executable, "-m", "loom_dagster.runtime", "--import-path", TICKS, "--config", str(config)]
    argv += ["--environment", "test", "--status-file", str(status_file), "--sys-path", str(ROOT)]
    with log_path.open("wb") as log:
        spawned = time.time()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = read_status(status_file)
            if status is not None and status.connected_at is not None:
                took = _TOOK.findall(log_path.read_text(errors="replace"))
                return status.connected_at - spawned, float(took[-1]) if took else float("nan")
            if proc.poll() is not None:
                raise RuntimeError(f"the job exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.02)
        raise TimeoutError("the job did not connect within 120 s")
    finally:  # stop it by its pid: SIGTERM (drain), SIGKILL if it hangs
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5, help="fence acquisitions per broker (alternating)")
    parser.add_argument("--job-rounds", type=int, default=3, help="job starts per broker (alternating)")
    parser.add_argument("--smoke", action="store_true", help="one round of each, to check the bench runs")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.job_rounds = 1, 1
    shared = os.environ.pop(ENV_BOOTSTRAP, None)  # every other broker is this bench's own
    brokers = {
        label: KafkaBroker(
            bootstrap=shared if args.smoke and delay == 0 else None, initial_rebalance_delay_ms=delay
        )
        for label, delay in SIDES.items()
    }
    fence_s: dict[str, list[float]] = {label: [] for label in SIDES}
    job_s: dict[str, list[float]] = {label: [] for label in SIDES}
    job_fence_s: dict[str, list[float]] = {label: [] for label in SIDES}
    try:
        started = time.monotonic()
        for broker in brokers.values():  # from this thread: a broker dies with the thread that spawned it
            broker.start()
        print(f"brokers up in {time.monotonic() - started:.1f} s: {brokers}")
        bootstrap = {label: broker.bootstrap_servers for label, broker in brokers.items()}
        for address in bootstrap.values():  # the fence topic exists before anything is timed
            create_topics(address, [FENCE_TOPIC], 1, timeout=60.0)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            if not args.smoke:  # the offsets and fence topics are created on first use: not measured
                for label in SIDES:
                    take_fence(bootstrap[label])
                    start_job(bootstrap[label], root)
            for _ in range(args.rounds):
                for label in SIDES:
                    fence_s[label].append(take_fence(bootstrap[label]))
            for _ in range(args.job_rounds):
                for label in SIDES:
                    connected, waited = start_job(bootstrap[label], root)
                    job_s[label].append(connected)
                    job_fence_s[label].append(waited)
    finally:
        for broker in brokers.values():
            broker.stop()

    def row(name: str, values: dict[str, list[float]]) -> str:
        zero, default = (statistics.median(values[label]) for label in SIDES)
        ratio = f"{default / zero:.1f}x" if zero > 0 else "n/a"
        return f"{name:34}{zero:>10.2f}{default:>10.2f}{default - zero:>14.2f}{ratio:>8}"

    print(
        f"\nconsumer-group fence on a broker with group.initial.rebalance.delay.ms 0 vs Kafka's default "
        f"(3000 ms); medians of {args.rounds} (fence) / {args.job_rounds} (job) alternating rounds"
    )
    print(f"{'':34}{'delay 0':>10}{'default':>10}{'default - 0':>14}{'ratio':>8}")
    print(row("take a free fence (s)", fence_s))
    print(row("job spawn -> connected (s)", job_s))
    print(row("  of which its fence wait (s)", job_fence_s))
    for label in SIDES:
        print(
            f"per round, {label}: fence {[round(v, 2) for v in fence_s[label]]}, "
            f"job {[round(v, 2) for v in job_s[label]]}"
        )


if __name__ == "__main__":
    main()
