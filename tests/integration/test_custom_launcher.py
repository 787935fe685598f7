"""A custom ``Launcher`` named by the deploy resource runs the job and is what every tool goes through:
the deploy (preflight, launch, health gate), a health-sensor tick, the ``loom-dagster`` CLI (which finds
it in the deployment record, in another process) and the ``loom_undeploy`` job. The CLI builds it from
the record only because it is registered, as users do it: an entry point of the group
``loom_dagster.core.launchers`` in the metadata of an installed distribution (here a test distribution put
on the path); unregistered, it is refused with how to register it. Also: deployment records written
before the records became msgspec structs still load."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

import loom_dagster.core.launchers.registry as launcher_registry
from loom_dagster import DeploymentStore, build_loom_asset_graph, build_loom_defs
from loom_dagster.core.deploy.store import Deployment
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.launchers import (
    LauncherRef,
    LocalProcessLauncher,
    UnregisteredLauncherWarning,
    launcher_from_record,
    load_launcher,
    register_launcher,
    registered_launchers,
)
from loom_dagster.core.launchers.registry import is_launcher_of, launcher_from_ref, launcher_ref
from loom_dagster.core.sensor_settings import JobHealthSettings
from loom_dagster.dev.kafka import KafkaBroker
from loom_dagster.sensors.health import build_job_health_sensor
from tests.support.deploy_env import DeployBench, bench_fixture, runtime_pids_for
from tests.support.helpers import ROOT, run_cli
from tests.support.recording_launcher import PATH, RecordingLauncher, calls

FLOW_KEY = dg.AssetKey(["loom", "ticks"])


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def install_test_distribution(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make a distribution whose metadata registers ``RecordingLauncher`` as the entry point ``recording``
    of ``loom_dagster.core.launchers`` visible to this process and to the processes it starts (the CLI), as
    ``pip install`` of a package declaring it in its pyproject.toml would."""
    info = root / "site" / "loom_dagster_test_launchers-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: loom-dagster-test-launchers\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[loom_dagster.launchers]\nrecording = {PATH}\n")
    monkeypatch.syspath_prepend(str(info.parent))
    # the package must import where the records are read: here it lives in the repository
    path = [str(info.parent), str(ROOT), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))


def made(entries: list[dict[str, Any]], *, cli: bool | None = None) -> set[str]:
    """The calls in *entries* (only the CLI's, or only this process's, when *cli* says so)."""
    if cli is True:
        entries = [e for e in entries if e["argv0"] == "loom-dagster"]
    elif cli is False:
        entries = [e for e in entries if e["pid"] == os.getpid()]
    return {e["call"] for e in entries if e["flow"] in ("ticks", "")}


@pytest.mark.kafka
@pytest.mark.slow
def test_a_custom_launcher_is_used_by_deploy_sensor_cli_and_undeploy(
    bench: DeployBench, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_test_distribution(bench.root, monkeypatch)
    assert registered_launchers()["recording"] == PATH
    journal = bench.root / "calls.jsonl"
    resource = bench.resource(launcher=PATH, launcher_config={"journal": str(journal)})
    assert isinstance(resource.build_launcher(), RecordingLauncher)
    bench.produce(0, 50)
    with dg.instance_for_test() as instance:
        # deploy: a first deploy launches and gates through the launcher; a redeploy preflights and drains
        assert bench.materialize(instance, resource=resource).success
        assert {"launch", "report"} <= made(calls(journal), cli=False)
        record = bench.store.current("ticks")
        assert record is not None and record.job.launcher == "recording"
        assert (record.launcher.path, record.launcher.config["journal"]) == ("recording", str(journal))
        since = time.time()
        assert bench.materialize(instance, resource=resource).success
        assert {"preflight", "owns", "stop", "launch", "report"} <= made(calls(journal, since))
        bench.wait_for_delta(set(bench.produced))

        # a health-sensor tick reads the job through it (liveness, uptime, orphans)
        since = time.time()
        sensor = build_job_health_sensor(build_loom_asset_graph([bench.spec()]), JobHealthSettings())
        context = dg.build_sensor_context(instance=instance, resources={"loom": resource})
        result = sensor(context)
        assert isinstance(result, dg.SensorResult)
        (check,) = [e for e in result.asset_events or [] if isinstance(e, dg.AssetCheckEvaluation)]
        assert check.passed, check.description
        (observation,) = [e for e in result.asset_events or [] if isinstance(e, dg.AssetObservation)]
        assert "loom/uptime_s" in observation.metadata
        assert {"owns", "report", "uptime", "runtime_processes"} <= made(calls(journal, since))

        # the CLI, in its own process, builds the launcher from the record
        since = time.time()
        (row,) = json.loads(cli(bench, "status", "--json", "--no-lag").stdout)
        assert row["health"] == "healthy" and row["uptime_s"] is not None
        assert cli(bench, "logs", "ticks", "-n", "3").returncode == 0
        assert {"owns", "report", "uptime", "logs"} <= made(calls(journal, since), cli=True)
        since = time.time()
        stopped = cli(bench, "stop", "ticks")
        assert stopped.returncode == 0 and "ticks: stopped" in stopped.stdout, stopped.stderr
        assert "stop" in made(calls(journal, since), cli=True)
        assert runtime_pids_for(bench.state_dir) == []

        # deployed again, then undeployed by the loom_undeploy job with the resource's launcher
        assert bench.materialize(instance, resource=resource).success
        since = time.time()
        undeploy = build_loom_defs([bench.spec()]).resolve_job_def("loom_undeploy")
        done = undeploy.execute_in_process(
            run_config={"ops": {"undeploy_loom_flows": {"config": {"flows": ["ticks"]}}}},
            resources={"loom": resource},
            instance=instance,
        )
        assert done.success
        assert {"report", "stop"} <= made(calls(journal, since), cli=False)
    assert runtime_pids_for(bench.state_dir) == []
    current = bench.store.current("ticks")
    assert current is not None and current.stopped_on_purpose


def cli(bench: DeployBench, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(bench.state_dir, *args, timeout_s=60)


# --- records written before they were msgspec structs ------------------------------------------------

OLD_RECORD: dict[str, Any] = {  # the layout dataclasses.asdict wrote (no "launcher" key)
    "config_hash": "c0ffee",
    "deployed_at": 1760000000.5,
    "extra": {
        "source": {"kind": "kafka", "brokers": ["127.0.0.1:9092"], "group_id": "g", "topics": ["t"]},
        "start_offsets": {"t": {"0": 4}},
    },
    "flow_name": "ticks",
    "job": {
        "extra": {"addresses": []},
        "flow_name": "ticks",
        "host": "old-host",
        "launcher": "local",
        "log_path": "/state/flows/ticks/20250101T000000/000000001/job.log",
        "processes": [
            {
                "argv": ["/usr/bin/python3", "-m", "loom_dagster.runtime", "--flow-name", "ticks"],
                "pid": 4242,
                "process_id": 0,
                "start_ticks": 99,
                "status_path": "/state/flows/ticks/20250101T000000/000000001/status-0.json",
            }
        ],
        "request": {
            "config_files": ["/state/flows/ticks/snapshots/x/00-base.yaml"],
            "config_hash": "c0ffee",
            "cwd": "/work",
            "env": [["LOOM_TEST_VERSION", "1"]],
            "environment": "test",
            "flow_name": "ticks",
            "import_path": "tests.flows.delta_only:ticks_flow",
            "plan_hash": "abc123",
            "processes": 1,
            "run_id": "r-1",
            "sys_path": ["/work"],
            "workers_per_process": 1,
        },
        "started_at": 1760000000,
    },
    "plan_hash": "abc123",
    "previous_plan_hash": None,
    "restarts": 2,
    "run_id": "r-1",
    "stopped_at": None,
    "stopped_by": None,
}


def test_records_written_by_the_old_code_still_load(tmp_path: Path) -> None:
    store = DeploymentStore(tmp_path)
    directory = store.flow_dir("ticks")
    (directory / "deployment.json").write_text(json.dumps(OLD_RECORD, indent=2, sort_keys=True))
    (directory / "history.jsonl").write_text(json.dumps(OLD_RECORD, sort_keys=True) + "\n")
    record = store.current("ticks")
    assert record is not None and store.history("ticks") == [record]
    assert (record.host, record.restarts, record.job.started_at) == ("old-host", 2, 1760000000.0)
    (proc,) = record.job.processes
    assert (proc.pid, proc.start_ticks, proc.argv[-1]) == (4242, 99, "ticks")
    assert record.job.request.env == (("LOOM_TEST_VERSION", "1"),)
    assert record.job.request.config_files == ("/state/flows/ticks/snapshots/x/00-base.yaml",)
    assert record.launcher == LauncherRef() and isinstance(
        launcher_from_ref(record.launcher), LocalProcessLauncher
    )

    store.save(record)  # the new layout is the old one plus the launcher (and a process's own host)
    written = json.loads((directory / "deployment.json").read_text())
    assert written.pop("launcher") == {"config": {}, "path": "local", "sys_path": []}
    assert [p.pop("host") for p in written["job"]["processes"]] == [""]
    request = written["job"]["request"]
    assert request.pop("env") == [["LOOM_TEST_VERSION", ""]] and request.pop("env_ref").startswith(
        "file:env/"
    )
    old_request = {k: v for k, v in OLD_RECORD["job"]["request"].items() if k != "env"}
    assert written == {
        **OLD_RECORD,
        "job": {**OLD_RECORD["job"], "started_at": 1760000000.0, "request": old_request},
    }
    assert store.history("ticks") == [record, record]


def test_unreadable_record_and_bad_launcher_paths_fail_clearly(tmp_path: Path) -> None:
    store = DeploymentStore(tmp_path)
    (store.flow_dir("ticks") / "deployment.json").write_text('{"flow_name": "ticks"}')
    with pytest.raises(DeploymentError, match="deployment record .* is unreadable"):
        store.current("ticks")
    with pytest.raises(
        DeploymentError, match="expected 'local', 'kubernetes', a registered launcher's name or"
    ):
        load_launcher("nope")
    with pytest.raises(DeploymentError, match="does not import"):
        load_launcher("no_such_module_here:Launcher")
    with pytest.raises(DeploymentError, match="is not a Launcher subclass"):
        load_launcher("loom_dagster.core.deploy.store:DeploymentStore")
    with pytest.raises(DeploymentError, match="does not take this config"):
        load_launcher("local", {"colour": "blue"})


def test_an_unregistered_launcher_builds_from_code_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Code (a resource) may name an unregistered class, with a warning; a record naming it is refused
    (nothing imported), by the CLI with how to register it, until it is registered: by an entry point,
    or in one process with ``register_launcher``."""
    monkeypatch.setattr(launcher_registry, "_registered", {})
    monkeypatch.setattr(launcher_registry, "_names", {})  # what an earlier test's entry point registered
    journal = str(tmp_path / "calls.jsonl")
    with pytest.warns(UnregisteredLauncherWarning, match="not registered under the entry point group"):
        launcher = load_launcher(PATH, {"journal": journal})
    assert isinstance(launcher, RecordingLauncher)
    ref = launcher_ref(launcher)
    assert (ref.path, ref.config["journal"], ref.sys_path) == (PATH, journal, ())
    with pytest.raises(DeploymentError, match="is not a registered launcher"):
        launcher_from_ref(ref)

    store = DeploymentStore(tmp_path / "state")
    record = Deployment.decode(json.dumps({**OLD_RECORD, "launcher": msgspec_ref(ref)}))
    store.save(record)
    done = run_cli(store.root, "status", "--no-lag", timeout_s=60)
    assert done.returncode == 2, done.stdout
    assert f"flow 'ticks': launcher {PATH!r} is not a registered launcher" in done.stderr, done.stderr
    assert '[project.entry-points."loom_dagster.launchers"]' in done.stderr

    assert register_launcher(RecordingLauncher) == "recording"
    assert launcher_ref(load_launcher(PATH, {"journal": journal})).path == "recording"
    for name in (PATH, "recording"):  # old records name the class, new ones the registered name
        assert isinstance(launcher_from_record(name, {"journal": journal}), RecordingLauncher)
    assert is_launcher_of(LauncherRef(PATH, {"journal": journal}), launcher)
    assert is_launcher_of(LauncherRef("recording", {"journal": journal}), launcher)
    with pytest.raises(DeploymentError, match="is a built-in launcher"):
        register_launcher(RecordingLauncher, "local")


def msgspec_ref(ref: LauncherRef) -> dict[str, Any]:
    return {"path": ref.path, "config": ref.config, "sys_path": list(ref.sys_path)}
