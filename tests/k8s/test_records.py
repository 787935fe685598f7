"""Records grant nothing, on a real control plane under the shipped Role: a restart (the health sensor's)
or a rollback applies only pod settings and a request that a deploy of this installation sealed
(``store.seal_job``). A record edited in the state ConfigMap (image, service account, the env Secret it
references), in the current record or in the history, is refused naming what changed, and nothing is
applied; an untouched record relaunches; a record without a seal (an older version's) asks for a
redeploy."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from loom_dagster.core.deploy.store import HASH_KEY_VARIABLE
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.redact import redact_text
from loom_dagster.dev.kafka import KafkaBroker
from tests.support.helpers import wait_for
from tests.support.k8s.cluster import KubeCluster
from tests.support.k8s.env import KubeEnv, kube_bench

pytestmark = [pytest.mark.k8s, pytest.mark.kafka, pytest.mark.slow]
STATE = "loom-ticks-state"
STS = "loom-ticks"


@pytest.fixture()
def kube_env(
    kube_cluster: KubeCluster,
    kafka: KafkaBroker,
    tmp_path: Path,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[KubeEnv]:
    # one installation key for every step (each Dagster test instance has a home, and a key file, of its own)
    monkeypatch.setenv(HASH_KEY_VARIABLE, uuid.uuid4().hex * 2)
    with kube_bench(kube_cluster, kafka, tmp_path, topic_prefix) as env:
        kube_cluster.add_fake_node(f"kwok-{env.namespace}", labels={"loom-test": env.namespace})
        yield env


def edit_state(env: KubeEnv, edit: Callable[[dict[str, str]], None]) -> dict[str, str]:
    """Edit the state ConfigMap's data as anyone allowed to write ConfigMaps could; returns the old data."""
    _, core = env.admin()
    state = core.read_namespaced_config_map(STATE, env.namespace)
    before = dict(state.data)
    data = dict(state.data)
    edit(data)
    state.data = data
    core.replace_namespaced_config_map(STATE, env.namespace, state)
    return before


def restore_state(env: KubeEnv, data: dict[str, str]) -> None:
    edit_state(env, lambda current: current.update(data))


def edit_current(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, str]], None]:
    def edit(data: dict[str, str]) -> None:
        record = json.loads(data["deployment.json"])
        change(record)
        data["deployment.json"] = json.dumps(record, indent=2)

    return edit


def statefulset(env: KubeEnv) -> Any | None:
    apps, _ = env.admin()
    try:
        return apps.read_namespaced_stateful_set(STS, env.namespace)
    except Exception as exc:
        if getattr(exc, "status", None) == 404:
            return None
        raise


def delete_statefulset(env: KubeEnv) -> None:
    apps, _ = env.admin()
    apps.delete_namespaced_stateful_set(STS, env.namespace)
    wait_for(lambda: statefulset(env) is None, 30, "the StatefulSet gone")


def test_a_restart_applies_only_a_sealed_record(kube_env: KubeEnv) -> None:
    env = kube_env
    resource = env.resource(health_timeout_s=30)
    with dg.instance_for_test() as instance:
        assert env.bench.materialize(instance, resource=resource).success
    template = statefulset(env).spec.template.metadata.annotations  # type: ignore[union-attr]
    delete_statefulset(env)  # out of band: what the health sensor's restart run relaunches
    deployer = resource.deployer()

    # the image edited in the record
    original = edit_state(
        env, edit_current(lambda r: r["job"]["extra"]["pod"].update(image="evil.example/sh:1"))
    )
    with pytest.raises(DeploymentError) as refused:
        deployer.restart("ticks", by="test")
    message = str(refused.value)
    assert "the record of flow 'ticks'" in message and f"ConfigMap {STATE}" in message, message
    assert "was changed outside loom-dagster: image 'loom-dagster-job:test' -> 'evil.example/sh:1'" in message
    assert "nothing was started. Redeploy by materializing the flow." in message, message
    assert redact_text(message) == message
    assert statefulset(env) is None  # nothing applied
    restore_state(env, original)

    # a service account added, and the env Secret swapped for another Secret of the namespace
    def escalate(record: dict[str, Any]) -> None:
        record["job"]["extra"]["pod"]["service_account"] = "cluster-admin"
        record["job"]["request"]["env_ref"] = "Secret/loom-dagster-config-hash-key"

    edit_state(env, edit_current(escalate))
    with pytest.raises(DeploymentError) as refused:
        deployer.restart("ticks", by="test")
    message = str(refused.value)
    assert "service account 'cluster-admin' added" in message, message
    assert "request env_ref 'Secret/loom-dagster-config-hash-key' added" in message, message
    assert statefulset(env) is None
    restore_state(env, original)

    # a record of an older version: no seal
    edit_state(env, edit_current(lambda r: r["job"]["extra"].pop("seal")))
    with pytest.raises(DeploymentError) as refused:
        deployer.restart("ticks", by="test")
    message = str(refused.value)
    assert "carries no seal: an older loom-dagster version wrote it" in message, message
    assert "nothing was started. Redeploy by materializing the flow." in message, message
    assert statefulset(env) is None
    restore_state(env, original)

    # untouched: relaunched as it was, sealed again
    restarted = deployer.restart("ticks", by="test")
    again = statefulset(env)
    assert again is not None and again.spec.template.metadata.annotations == template
    assert isinstance(restarted.job.extra.get("seal"), dict) and restarted.restarts == 1


def test_a_rollback_applies_only_a_sealed_history_record(kube_env: KubeEnv) -> None:
    env = kube_env
    resource = env.resource(health_timeout_s=30)
    store = env.launcher().deployment_store()
    with dg.instance_for_test() as instance:
        assert env.bench.materialize(instance, resource=resource, LOOM_TEST_VERSION="1").success
        assert env.bench.materialize(instance, resource=resource, LOOM_TEST_VERSION="2").success
    current = store.current("ticks")
    assert current is not None
    before = statefulset(env)
    deployer = resource.deployer()

    def edit_previous(data: dict[str, str]) -> None:
        lines = data["history.jsonl"].splitlines()
        previous = json.loads(lines[-2])
        previous["job"]["extra"]["pod"]["image"] = "evil.example/sh:1"
        previous["job"]["extra"]["pod"]["service_account"] = "cluster-admin"
        lines[-2] = json.dumps(previous)
        data["history.jsonl"] = "\n".join(lines) + "\n"

    original = edit_state(env, edit_previous)
    with pytest.raises(DeploymentError) as refused:
        deployer.roll_back_to_previous("ticks", "test: a regression")
    message = str(refused.value)
    assert "image 'loom-dagster-job:test' -> 'evil.example/sh:1'" in message, message
    assert "service account 'cluster-admin' added" in message and "nothing was started" in message, message
    after = statefulset(env)  # the running version was not even drained
    assert after is not None and after.metadata.resource_version == before.metadata.resource_version
    assert store.current("ticks") == current
    restore_state(env, original)

    restored = deployer.roll_back_to_previous("ticks", "test: a regression")
    assert restored.plan_hash == current.plan_hash and restored.extra.get("rolled_back_from")
    assert restored.run_id != current.run_id  # the previous deployment runs again
