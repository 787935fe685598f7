"""Broker restarts under a process that makes Kafka group-coordinator requests the way loom-dagster's
sensors and deploy checks do (fence describe, lag fetch, offset snapshot), to show whether that process
survives (librdkafka#4605 aborts it). Used by ``tests/integration/test_broker_restart.py`` and ``bench/broker_restart.py``.

The ticking process: ``python -m tests.support.broker_restart --bootstrap B --group G --topic T --mode M``
(``isolated``: the package's functions, whose coordinator requests run in a child process; ``in-process``:
the same requests in the ticking process itself, as before the fix). It prints one JSON line per call.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from loom_dagster.dev.kafka import KafkaBroker, metadata_ok

ROOT = Path(__file__).resolve().parents[2]


class Tick(msgspec.Struct, frozen=True):
    """One call of the ticking process."""

    at: float
    call: str
    ok: bool
    error: str = ""


class RestartReport(msgspec.Struct, frozen=True):
    """What the ticking process went through."""

    mode: str
    restarts: int
    exit_code: int | None
    """``None``: alive at the end (then stopped by the harness)."""
    ticks: tuple[Tick, ...]
    back_at: tuple[float, ...]
    """When the broker answered again after each restart."""

    @property
    def died(self) -> bool:
        return self.exit_code is not None

    def failed_during_outage(self) -> int:
        return sum(1 for t in self.ticks if not t.ok)

    def calls_after_return(self, settle_s: float) -> list[Tick]:
        """The calls that started ``settle_s`` after the broker last came back."""
        if not self.back_at:
            return []
        return [t for t in self.ticks if t.at >= self.back_at[-1] + settle_s]

    def clean_after_last_return(self, settle_s: float) -> bool:
        """Every kind of call was made ``settle_s`` after the broker last came back, and every such call
        succeeded."""
        after = self.calls_after_return(settle_s)
        return {t.call for t in after} == {t.call for t in self.ticks} and all(t.ok for t in after)


def _calls(bootstrap: str, group: str, topic: str, mode: str) -> dict[str, Callable[[], Any]]:
    from loom_dagster.core.checks.fence import describe_fences
    from loom_dagster.core.kafka.cluster import KafkaCluster, LagTarget
    from loom_dagster.core.kafka.offsets import _fetch_cluster_requests, fetch_offsets
    from loom_dagster.core.kafka.snapshot import snapshot_offsets

    cluster = KafkaCluster(bootstrap)
    target = LagTarget(name="ticker", group=group, topics=(topic,), cluster=cluster)

    def lag() -> Any:
        if mode == "in-process":
            fetch = _fetch_cluster_requests.in_process(cluster, [target], 2.0)  # type: ignore[attr-defined]
            unreachable = fetch[1][0].unreachable
        else:
            unreachable = fetch_offsets([target], timeout_s=2.0).targets["ticker"].unreachable
        if unreachable:
            raise ConnectionError(unreachable)

    fences = describe_fences.in_process if mode == "in-process" else describe_fences  # type: ignore[attr-defined]
    snapshot = snapshot_offsets.in_process if mode == "in-process" else snapshot_offsets  # type: ignore[attr-defined]
    return {
        "fence": lambda: fences(cluster, [f"{group}.loom-fence", group], 2.0),
        "lag": lag,
        "offsets": lambda: snapshot(cluster, [topic], [group], timeout_s=2.0),
    }


def _sensor_calls(config: str, state_dir: str) -> dict[str, Callable[[], Any]]:
    """The real sensors of a code location with the ticks flow (as its code server evaluates them) and
    the deploy's connect checks of that flow (as a run worker deploying it makes them)."""
    import dagster as dg

    from loom_dagster import LoomDeployResource, LoomFlowSpec, build_loom_defs
    from loom_dagster.core.checks.fence import check_fence
    from loom_dagster.core.deploy.deployer import DeployOptions, FlowDeployer
    from loom_dagster.core.deploy.store import DeploymentStore
    from loom_dagster.core.flows.catalog import compile_spec
    from loom_dagster.core.launchers import LocalProcessLauncher

    spec = LoomFlowSpec("tests.flows.delta_only:ticks_flow", config=config, environment="test")
    defs = build_loom_defs([spec])
    instance = dg.DagsterInstance.ephemeral()
    resources = {"loom": LoomDeployResource(state_dir=state_dir)}
    cursors: dict[str, str | None] = {}
    compiled = compile_spec(spec)
    store = DeploymentStore(state_dir)
    deployer = FlowDeployer(LocalProcessLauncher(), store, DeployOptions(connect_timeout_s=2.0))

    def sensor(name: str) -> Callable[[], Any]:
        definition = defs.resolve_sensor_def(name)

        def tick() -> None:
            context = dg.build_sensor_context(
                instance=instance, cursor=cursors.get(name), definitions=defs, resources=resources
            )
            data = definition.evaluate_tick(context)
            cursors[name] = data.cursor
            for event in data.asset_events:
                status = event.metadata.get("status") if isinstance(event, dg.AssetCheckEvaluation) else None
                if status is not None and "UNREACHABLE" in str(status.value):
                    raise ConnectionError(f"{name}: {event.metadata.get('reason') or status.value}")

        return tick

    def deploy_checks() -> None:
        deployer.check_offsets(compiled, accept_reset=True, log=lambda _: None)
        check_fence(compiled, store.current("ticks"), timeout_s=2.0)

    return {
        "sensor:loom_kafka_lag": sensor("loom_kafka_lag"),
        "sensor:loom_job_health": sensor("loom_job_health"),
        "deploy checks": deploy_checks,
    }


def tick_forever(calls: dict[str, Callable[[], Any]], threads: int = 2) -> None:
    """Call every request in a loop from *threads* threads per request, one JSON line per call."""
    lock = threading.Lock()

    def loop(name: str, call: Callable[[], Any]) -> None:
        while True:
            at = time.time()
            try:
                call()
                tick = Tick(at, name, True)
            except Exception as exc:  # what a sensor tick reports
                tick = Tick(at, name, False, f"{type(exc).__name__}: {exc}"[:300])
            with lock:
                sys.stdout.write(msgspec.json.encode(tick).decode() + "\n")
                sys.stdout.flush()
            time.sleep(0.05)

    for name, call in calls.items():
        # a sensor is evaluated by one thread at a time, as Dagster does
        for _ in range(1 if name.startswith("sensor:") else threads):
            threading.Thread(target=loop, args=(name, call), daemon=True).start()
    while True:
        time.sleep(1)


def run_restarts(
    broker: KafkaBroker,
    *,
    group: str,
    topic: str,
    mode: str,
    restarts: int,
    sensors: tuple[str, str] | None = None,
    outage_s: float = 8.0,
    settle_s: float = 6.0,
    log: Callable[[str], None] = lambda _: None,
) -> RestartReport:
    """Start the ticking process, stop the broker (SIGKILL on odd rounds, SIGTERM on even ones) *restarts*
    times for ``outage_s``, start it again on the same ports, and report what the process went through.
    *sensors*: ``(config dir, state dir)`` of a deployed ticks flow: its real sensors and deploy checks tick too."""
    # the ticking process's stderr (its sensors' log lines): $BROKER_RESTART_STDERR when set, to read after a failure
    out = open(os.environ.get("BROKER_RESTART_STDERR", os.devnull), "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.broker_restart",
            "--bootstrap",
            broker.bootstrap_servers,
            "--group",
            group,
            "--topic",
            topic,
            "--mode",
            mode,
            *(["--config", sensors[0], "--state-dir", sensors[1]] if sensors else []),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=out,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    ticks: list[Tick] = []
    reader = threading.Thread(target=_read_ticks, args=(proc, ticks), daemon=True)
    reader.start()
    back_at: list[float] = []
    try:
        time.sleep(settle_s)
        for round_ in range(restarts):
            if proc.poll() is not None:
                break
            _stop(broker, kill=round_ % 2 == 0)
            log(
                f"{mode}: restart {round_ + 1}/{restarts}: broker down ({'SIGKILL' if round_ % 2 == 0 else 'SIGTERM'})"
            )
            time.sleep(outage_s)
            broker.restart()
            while not metadata_ok(broker.bootstrap_servers, timeout=2.0):
                time.sleep(0.2)
            back_at.append(time.time())
            time.sleep(settle_s)
        # then until every kind of call has been made (and answered) after the settle time, a minute at most
        deadline = time.monotonic() + 60
        while back_at and proc.poll() is None and time.monotonic() < deadline:
            kinds = {t.call for t in ticks}
            if kinds and {t.call for t in ticks if t.at >= back_at[-1] + settle_s / 2} == kinds:
                break
            time.sleep(0.5)
        exit_code = proc.poll()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        out.close()
        reader.join(timeout=10)
    return RestartReport(mode, len(back_at), exit_code, tuple(ticks), tuple(back_at))


def _stop(broker: KafkaBroker, *, kill: bool) -> None:
    """Stop the broker's java process (its Popen, i.e. by PID) with SIGKILL or SIGTERM; wait until it is gone."""
    proc = broker._proc  # the harness owns this broker
    assert proc is not None
    proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def _read_ticks(proc: subprocess.Popen[bytes], into: list[Tick]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            into.append(msgspec.json.decode(line, type=Tick))
        except msgspec.DecodeError:
            continue


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--mode", choices=("isolated", "in-process"), required=True)
    parser.add_argument("--config")
    parser.add_argument("--state-dir")
    args = parser.parse_args()
    calls = _calls(args.bootstrap, args.group, args.topic, args.mode)
    if args.config:
        calls.update(_sensor_calls(args.config, args.state_dir))
    tick_forever(calls)


if __name__ == "__main__":
    main()
