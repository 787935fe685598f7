"""State is private, secret-free and durable (issue 17, parts 2, 6, 7).

- Everything under the state directory is 0700 / 0600 whatever the umask; a state directory of another
  user, or one group or others may write to, is refused naming its owner, mode and the fix.
- A flow's ``env`` values reach its job (first start, restart, rollback) but no record: they sit in a
  0600 file of their own (local) or a Kubernetes Secret the pods reference (never the state ConfigMap or
  the pod template).
- The config hash is keyed per installation: the same in every process of one, different in another, and
  no longer the unsalted digest a weak password could be guessed from; the plan hash is unchanged.
- Record writes are fsynced (file and directory); a torn history line is skipped and never glued to the
  next record; the history keeps the last 50; ``loom-dagster status`` shows an unreadable record as such.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import msgspec
import pytest

from loom_dagster import DefsState, LoomFlowSpec
from loom_dagster.core import procfs
from loom_dagster.core.deploy.launch_records import LaunchedJob, LaunchRequest
from loom_dagster.core.deploy.store import (
    HASH_KEY_VARIABLE,
    KEPT_HISTORY,
    Deployment,
    DeploymentStore,
    StateDirectoryError,
    installation_key,
)
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.flows.catalog import compile_spec
from loom_dagster.core.flows.describe import config_hash
from loom_dagster.core.flows.loading import load_config
from loom_dagster.core.launchers.local import LocalProcessLauncher
from loom_dagster.core.redact import redact_text
from loom_dagster.dev.kafka import KafkaBroker
from tests.conftest import shapes_config
from tests.support.deploy_env import DeployBench, bench_fixture
from tests.support.helpers import run_cli, step_failure_message, wait_for

ROOT = Path(__file__).resolve().parents[2]
SECRET_V1 = "pw-One-8f3a1c"
SECRET_V2 = "pw-Two-51d9e0"
NOBODY = 65534
RUNTIME_WRITTEN = ("status-", "job.log.")
"""Files the job runtime creates itself (loom_dagster/core/job/status.py, logs.py): private once the
runtime creates them 0600 (the edits this change asks for there)."""


@pytest.fixture()
def umask_022() -> Iterator[None]:
    """The usual umask, under which files used to be created 0644 and directories 0755."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


@pytest.fixture()
def bench(kafka: KafkaBroker, tmp_path: Path, topic_prefix: str) -> Iterator[DeployBench]:
    yield from bench_fixture(kafka, tmp_path, topic_prefix)


def _modes(root: Path) -> tuple[list[str], list[str]]:
    """Paths under *root* (and *root*) that are not private: (written by us, written by the job)."""
    ours: list[str] = []
    job: list[str] = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        wanted = 0o700 if path.is_dir() else 0o600
        if mode != wanted:
            entry = f"{oct(mode)} {path.relative_to(root.parent)}"
            (job if path.name.startswith(RUNTIME_WRITTEN) else ours).append(entry)
    return ours, job


def _holding(root: Path, needle: str) -> list[str]:
    """Files under *root* whose bytes contain *needle*."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()
    )


def _job_environ(deployment: Deployment) -> dict[str, str]:
    """The environment of the deployment's (first) job process, from /proc."""
    (proc,) = deployment.job.processes
    raw = Path(f"/proc/{proc.pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


# --------------------------------------------------------------------------------------------------
# A real deploy, restart and rollback on the local launcher
# --------------------------------------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.slow
def test_env_reaches_every_launch_but_no_record_and_the_state_is_private(
    bench: DeployBench, monkeypatch: pytest.MonkeyPatch, umask_022: None
) -> None:
    state = bench.state_dir
    monkeypatch.setenv("LOOM_DAGSTER_STATE_DIR", str(state))  # the config-hash key lives here too
    monkeypatch.setenv("LOOM_DAGSTER_DEFS_STATE", str(state / "defs-state"))
    with dg.instance_for_test() as instance:
        assert bench.materialize(instance, LOOM_TEST_VERSION="1", LOOM_TEST_SECRET=SECRET_V1).success
        first = bench.store.current("ticks")
        assert first is not None and _job_environ(first)["LOOM_TEST_SECRET"] == SECRET_V1

        # the record keeps names and a reference; the value is in one 0600 file of its own
        written = json.loads((state / "flows" / "ticks" / "deployment.json").read_text())
        request = written["job"]["request"]
        assert sorted(request["env"]) == [["LOOM_TEST_SECRET", ""], ["LOOM_TEST_VERSION", ""]]
        assert request["env_ref"].startswith("file:env/")
        assert _holding(state, SECRET_V1) == [f"flows/ticks/{request['env_ref'][5:]}"]
        assert SECRET_V1 not in repr(first)

        # a restart (the health sensor's: the job died) starts it with the same env, read back
        (proc,) = first.job.processes
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: not procfs.is_alive(proc.pid, proc.start_ticks), 10, "the job killed")
        deployer = bench.resource().deployer()
        restarted = deployer.restart("ticks", by="test")
        assert _job_environ(restarted)["LOOM_TEST_SECRET"] == SECRET_V1

        # a new version with another secret, then a rollback to the first: its own env again
        assert bench.materialize(instance, LOOM_TEST_VERSION="2", LOOM_TEST_SECRET=SECRET_V2).success
        second = bench.store.current("ticks")
        assert second is not None and _job_environ(second)["LOOM_TEST_SECRET"] == SECRET_V2
        restored = deployer.roll_back_to_previous("ticks", "test rollback", by="test")
        assert _job_environ(restored)["LOOM_TEST_SECRET"] == SECRET_V1
        assert _job_environ(restored)["LOOM_TEST_VERSION"] == "1"

    for secret in (SECRET_V1, SECRET_V2):  # no record, log, history or snapshot holds a value
        (holder,) = _holding(state, secret)
        assert holder.startswith("flows/ticks/env/") and holder.endswith(".json"), holder
    names = {p.name for p in state.rglob("*")}
    assert {"deployment.json", "history.jsonl", "lock", "job.log", "config-hash.key", "snapshots"} <= names
    assert any(p.suffix == ".json" for p in (state / "defs-state").iterdir())
    ours, job = _modes(state)
    assert not ours, ours  # every directory 0700, every file 0600, under umask 022
    assert not job, job  # the job runtime's own files (log, log lock, status records) too


def test_an_env_file_that_cannot_be_read_back_is_refused_at_launch(tmp_path: Path) -> None:
    store = DeploymentStore(tmp_path / "state")
    request = LaunchRequest(
        "f", "m:f", (), "test", "p", "c", env=(("TOKEN", "t0p-s3cret"),), cwd=str(tmp_path)
    )
    job = LaunchedJob("f", "local", "h", (), "", 1.0, request)
    store.save(Deployment("f", job, "p", "c", 1.0))
    assert store.current("f").job.request.env == (("TOKEN", "t0p-s3cret"),)  # type: ignore[union-attr]
    for file in (store.flow_dir("f") / "env").iterdir():
        file.unlink()
    unresolved = store.current("f")
    assert unresolved is not None and unresolved.job.request.env == (("TOKEN", ""),)
    with pytest.raises(DeploymentError, match=r"env values of flow 'f' \(TOKEN\) are kept in 'file:env/"):
        LocalProcessLauncher().launch(unresolved.job.request, str(store.flow_dir("f")))
    assert not list(store.flow_dir("f").glob("2*"))  # no job directory: nothing was started


# --------------------------------------------------------------------------------------------------
# A state directory others could read or write
# --------------------------------------------------------------------------------------------------


def test_a_state_directory_others_could_use_is_refused(tmp_path: Path, umask_022: None) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, NOBODY, NOBODY)
    store = DeploymentStore(foreign)
    for attempt in (lambda: store.current("f"), lambda: store.flow_dir("f"), store.all):
        with pytest.raises(StateDirectoryError) as refused:
            attempt()
        message = str(refused.value)
        assert str(foreign) in message and f"uid {NOBODY}" in message and "mode 0700" in message
        assert f"chown {os.geteuid()} {foreign}" in message and "LOOM_DAGSTER_STATE_DIR" in message
    assert list(foreign.iterdir()) == []  # nothing was written

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(StateDirectoryError, match=r"mode 0777\) is writable by group or others"):
        DeploymentStore(shared).flow_dir("f")
    done = run_cli(shared, "status", "--no-lag")
    assert done.returncode == 2 and "is writable by group or others" in done.stderr, done.stderr

    # the config-hash key is not taken from (nor written to) such a directory either
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOOM_DAGSTER_STATE_DIR", str(foreign))
        patch.delenv(HASH_KEY_VARIABLE, raising=False)
        with pytest.raises(StateDirectoryError):
            installation_key()

    # our own directory, readable by others (an older version made it 0755): tightened, not refused
    older = tmp_path / "older"
    older.mkdir()
    older.chmod(0o755)
    DeploymentStore(older).flow_dir("f")
    assert stat.S_IMODE(older.stat().st_mode) == 0o700
    assert stat.S_IMODE((older / "flows" / "f").stat().st_mode) == 0o700


# --------------------------------------------------------------------------------------------------
# The config hash
# --------------------------------------------------------------------------------------------------

_HASH_IN_PROCESS = (
    "import sys; from loom_dagster import LoomFlowSpec; from loom_dagster.core.flows.catalog import compile_spec; "
    "f = compile_spec(LoomFlowSpec('tests.flows.shapes:make_flow', config=sys.argv[1], environment='test')).flow; "
    "print(f.config_hash, f.plan_hash)"
)


def _hash_in_a_process(config: Path, state_dir: Path) -> tuple[str, str]:
    env = {**os.environ, "LOOM_DAGSTER_STATE_DIR": str(state_dir), "LOOM_TEST_SINKS": "delta,ch,topic"}
    env.pop(HASH_KEY_VARIABLE, None)
    done = subprocess.run(
        [sys.executable, "-c", _HASH_IN_PROCESS, str(config)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    config_digest, plan_digest = done.stdout.split()
    return config_digest, plan_digest


def test_the_config_hash_is_keyed_per_installation(tmp_path: Path, sinks_env: pytest.MonkeyPatch) -> None:
    password = "hunter2"  # a weak password, in the ClickHouse URL of the config
    config = shapes_config(tmp_path / "cfg", ch_url=f"http://default:{password}@127.0.0.1:8123")
    sinks_env.setenv("LOOM_DAGSTER_STATE_DIR", str(tmp_path / "a"))
    sinks_env.delenv(HASH_KEY_VARIABLE, raising=False)
    here = compile_spec(LoomFlowSpec("tests.flows.shapes:make_flow", config=config, environment="test")).flow

    same = _hash_in_a_process(config, tmp_path / "a")  # another process of the same installation
    other = _hash_in_a_process(config, tmp_path / "b")  # another installation
    assert same == (here.config_hash, here.plan_hash)
    assert other[0] != here.config_hash and other[1] == here.plan_hash  # the plan hash is not keyed
    key_file = tmp_path / "a" / "config-hash.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700

    # what an attacker sees cannot be checked against guesses any more: the old, unkeyed digest of the
    # resolved config (with the right password) matched the published hash; the keyed one does not
    from omegaconf import OmegaConf

    resolved = load_config((str(config / "base.yaml"),), "test")
    data = OmegaConf.to_container(resolved._config, resolve=True)  # type: ignore[attr-defined]
    assert password in json.dumps(data)
    unkeyed = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert unkeyed != here.config_hash
    assert config_hash(resolved, key=installation_key()) == here.config_hash

    # an installation without one shared state directory sets the key everywhere (a Kubernetes Secret)
    sinks_env.setenv(HASH_KEY_VARIABLE, "k" * 64)
    assert config_hash(resolved) == config_hash(resolved, key=b"k" * 64) != here.config_hash
    sinks_env.setenv(HASH_KEY_VARIABLE, "short")
    with pytest.raises(DeploymentError, match="too short"):
        config_hash(resolved)


# --------------------------------------------------------------------------------------------------
# Durable records
# --------------------------------------------------------------------------------------------------


def _record(n: int, env: tuple[tuple[str, str], ...] = ()) -> Deployment:
    request = LaunchRequest("f", "m:f", (), "test", f"p{n}", "c", env=env)
    job = LaunchedJob("f", "local", "h", (), "", float(n), request)
    return Deployment("f", job, f"p{n}", "c", float(n))


def test_a_torn_history_line_is_skipped_and_never_glued_to_the_next_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = DeploymentStore(tmp_path / "state")
    store.save(_record(1))
    history = store.flow_dir("f") / "history.jsonl"
    with open(history, "ab") as handle:  # a crash in the middle of an append
        handle.write(_record(2).encode()[:40])
    with caplog.at_level(logging.WARNING, logger="loom_dagster.core.deploy.store"):
        assert [r.plan_hash for r in store.history("f")] == ["p1"]
    assert any("line 2 is unreadable and skipped" in r.getMessage() for r in caplog.records)
    store.save(_record(3))
    assert [r.plan_hash for r in store.history("f")] == ["p1", "p3"]
    lines = history.read_bytes().splitlines()
    assert len(lines) == 3 and Deployment.decode(lines[2]).plan_hash == "p3"


def test_the_history_keeps_the_last_entries_and_moves_old_env_values_out(tmp_path: Path) -> None:
    store = DeploymentStore(tmp_path / "state")
    directory = store.flow_dir("f")
    old = _record(0, env=(("PASSWORD", "old-s3cret"),))
    (directory / "history.jsonl").write_bytes(old.encode() + b"\n")  # written by an older version
    store.save(_record(1))
    assert b"old-s3cret" not in (directory / "history.jsonl").read_bytes()  # moved to an env file
    assert store.history("f")[0].job.request.env == (("PASSWORD", "old-s3cret"),)
    for n in range(2, KEPT_HISTORY + 12):
        store.save(_record(n))
    kept = store.history("f")
    assert len(kept) == KEPT_HISTORY == 50
    assert [r.plan_hash for r in kept] == [f"p{n}" for n in range(12, KEPT_HISTORY + 12)]
    assert list((directory / "env").iterdir()) == []  # no record references the old env any more


def test_every_record_write_is_fsynced_file_and_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sinks_env: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    store = DeploymentStore(tmp_path / "state")
    store.save(_record(1, env=(("TOKEN", "x"),)))
    flow = str(tmp_path / "state" / "flows" / "f")
    assert any(p.startswith(f"{flow}/env/.") for p in synced)  # the env file before its rename
    assert any(p.startswith(f"{flow}/.deployment.json.") for p in synced)  # the record before its rename
    assert f"{flow}/history.jsonl" in synced and f"{flow}/env" in synced and flow in synced
    synced.clear()
    store.save(_record(2))
    assert any(p.startswith(f"{flow}/.deployment.json.") for p in synced) and flow in synced
    assert f"{flow}/history.jsonl" in synced

    synced.clear()
    defs_state = tmp_path / "defs"
    cfg = shapes_config(tmp_path / "cfg")
    DefsState(defs_state).load([LoomFlowSpec("tests.flows.shapes:make_flow", config=cfg, environment="test")])
    assert any(p.startswith(f"{defs_state}/.") for p in synced) and str(defs_state) in synced
    (entry,) = defs_state.glob("*.json")
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600 and stat.S_IMODE(defs_state.stat().st_mode) == 0o700


def test_status_shows_an_unreadable_record_as_such(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = DeploymentStore(state)
    store.save(msgspec.structs.replace(_record(1), stopped_at=1.0, stopped_by="test"))
    broken = store.flow_dir("broken") / "deployment.json"
    broken.write_bytes(_record(2).encode()[:60])  # cut short
    (store.flow_dir("empty") / "deployment.json").write_bytes(b"")
    done = run_cli(state, "status", "--json", "--no-lag", "--all")
    assert done.returncode == 0, done.stderr
    rows = {row["flow"]: row for row in json.loads(done.stdout)}
    assert rows["f"]["plan_hash"] == "p1" and rows["f"]["health"] != "unreadable"
    assert rows["broken"]["health"] == "unreadable" and str(broken) in rows["broken"]["detail"]
    assert "truncated" in rows["broken"]["detail"].lower() or "malformed" in rows["broken"]["detail"].lower()
    assert rows["empty"]["health"] == "unreadable" and "the file is empty" in rows["empty"]["detail"]
    table = run_cli(state, "status", "--no-lag")
    assert table.returncode == 0 and "unreadable" in table.stdout
    assert f"broken: deployment record {broken} is unreadable" in table.stdout


def test_the_request_repr_shows_env_names_only() -> None:
    request = LaunchRequest("f", "m:f", (), "test", "p", "c", env=(("DB_PASSWORD", "hunter2"), ("MODE", "x")))
    shown = repr(Deployment("f", LaunchedJob("f", "local", "h", (), "", 1.0, request), "p", "c", 1.0))
    assert "hunter2" not in shown and "'DB_PASSWORD', '***'" in shown and "'MODE', '***'" in shown


# --------------------------------------------------------------------------------------------------
# Kubernetes: env values in a Secret, the config-hash key in the cluster
# --------------------------------------------------------------------------------------------------


@pytest.mark.k8s
@pytest.mark.kafka
@pytest.mark.slow
def test_on_kubernetes_env_values_live_in_a_secret_the_pods_reference(
    kube_cluster: Any, kafka: KafkaBroker, tmp_path: Path, topic_prefix: str
) -> None:
    from tests.k8s.test_launcher import names
    from tests.support.k8s.env import kube_bench

    with kube_bench(kube_cluster, kafka, tmp_path, topic_prefix) as env:
        kube_cluster.add_fake_node(f"kwok-{env.namespace}", labels={"loom-test": env.namespace})
        apps, core = env.admin()
        name, _ = names(env)
        store = env.launcher().deployment_store()
        resource = env.resource(health_timeout_s=30)
        with dg.instance_for_test() as instance:
            assert env.bench.materialize(instance, resource=resource, LOOM_TEST_SECRET=SECRET_V1).success
            assert env.bench.materialize(instance, resource=resource, LOOM_TEST_SECRET=SECRET_V2).success
            record = store.current("ticks")
            assert record is not None and record.job.request.env_ref.startswith(f"Secret/{name}-env-")
            secret_name = record.job.request.env_ref.removeprefix("Secret/")

            def texts() -> str:
                found = [
                    json.dumps(cm.data or {}) for cm in core.list_namespaced_config_map(env.namespace).items
                ]
                sts = apps.read_namespaced_stateful_set(name, env.namespace)
                return "\n".join([*found, json.dumps(sts.to_dict(), default=str)])

            assert SECRET_V1 not in texts() and SECRET_V2 not in texts()  # records, snapshots, template
            for config_map in core.list_namespaced_config_map(env.namespace).items:
                for text in (config_map.data or {}).values():
                    assert redact_text(text) == text  # nothing a redactor would even suspect
            (container,) = apps.read_namespaced_stateful_set(
                name, env.namespace
            ).spec.template.spec.containers
            (item,) = [e for e in container.env if e.name == "LOOM_TEST_SECRET"]
            assert item.value is None and item.value_from.secret_key_ref.name == secret_name
            data = core.read_namespaced_secret(secret_name, env.namespace).data
            assert base64.b64decode(data["LOOM_TEST_SECRET"]).decode() == SECRET_V2
            v1_secret = store.history("ticks")[0].job.request.env_ref.removeprefix("Secret/")
            assert v1_secret != secret_name  # the previous deployment's Secret is kept for a rollback
            core.read_namespaced_secret(v1_secret, env.namespace)

            # the StatefulSet deleted out of band: relaunched from the record, the same Secret referenced
            apps.delete_namespaced_stateful_set(name, env.namespace)
            wait_for(lambda: not _sts(apps, name, env.namespace), 30, "the StatefulSet gone")
            relaunched = resource.deployer().restart("ticks", by="test")
            assert relaunched.job.request.env_ref == f"Secret/{secret_name}"
            (again,) = apps.read_namespaced_stateful_set(name, env.namespace).spec.template.spec.containers
            assert [e.value_from.secret_key_ref.name for e in again.env if e.name == "LOOM_TEST_SECRET"] == [
                secret_name
            ]

            # the installation's config-hash key is kept in the cluster; another key is refused
            key = core.read_namespaced_secret("loom-dagster-config-hash-key", env.namespace).data["key"]
            assert base64.b64decode(key) == installation_key()
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv(HASH_KEY_VARIABLE, "o" * 64)
                refused = env.bench.materialize(instance, resource=resource, LOOM_TEST_SECRET=SECRET_V2)
            assert not refused.success
            assert "another key than the installation's" in step_failure_message(refused)
            assert store.current("ticks").job.request.env_ref == f"Secret/{secret_name}"  # type: ignore[union-attr]


def _sts(apps: Any, name: str, namespace: str) -> Any:
    try:
        return apps.read_namespaced_stateful_set(name, namespace)
    except Exception:
        return None


def test_the_pod_template_references_the_env_secret_and_holds_no_value() -> None:
    from loom_dagster.core.launchers.kubernetes.manifests import env_secret_name, statefulset_manifest
    from loom_dagster.core.launchers.kubernetes.settings import KubernetesSettings

    settings = KubernetesSettings.from_config(
        {"namespace": "streaming", "pod": {"env": {"LOG_LEVEL": "INFO"}}}
    )
    request = LaunchRequest("orders", "m:f", (), "test", "p", "c", env=(("KAFKA_SASL_PASSWORD", "hunter2"),))
    (container,) = statefulset_manifest(settings, request)["spec"]["template"]["spec"]["containers"]
    secret = env_secret_name(settings, "orders", request.env)
    assert secret.startswith("loom-orders-env-") and "hunter2" not in json.dumps(container)
    assert {
        "name": "KAFKA_SASL_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": secret, "key": "KAFKA_SASL_PASSWORD"}},
    } in container["env"]
    assert {"name": "LOG_LEVEL", "value": "INFO"} in container["env"]  # launcher settings stay literal
    stored = msgspec.structs.replace(request, env=(("KAFKA_SASL_PASSWORD", ""),), env_ref=f"Secret/{secret}")
    (same,) = statefulset_manifest(settings, stored)["spec"]["template"]["spec"]["containers"]
    assert same["env"] == container["env"]  # the record's form renders the same template
