"""The deploy lock on Kubernetes is a Lease held honestly, on a real control plane, under the shipped Role,
with a 3 s lease (``lease_seconds``): renewed while held (a deploy that takes longer than the lease
completes, one holder throughout); taken over by another holder once expired; a holder that lost it
stops before its next change, never launches, and names who holds it now; releasing never deletes a
Lease another holder took over."""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from loom_dagster.core.deploy.launch_records import LaunchedJob, LaunchRequest
from loom_dagster.core.deploy.store import DeployLock, DeployLockLost
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.launchers import register_launcher
from loom_dagster.core.launchers.kubernetes.launcher import KubernetesLauncher
from loom_dagster.core.launchers.kubernetes.store import KubernetesDeploymentStore
from loom_dagster.core.redact import redact_text
from loom_dagster.dev.kafka import KafkaBroker
from tests.support.helpers import Poller, step_failure_message, wait_for
from tests.support.k8s.cluster import KubeCluster
from tests.support.k8s.env import KubeEnv, kwok_bench

pytestmark = [pytest.mark.k8s, pytest.mark.kafka, pytest.mark.slow]
LEASE_S = 3
LEASE = "loom-ticks-deploy"


class Hooks:
    """What the hooked launcher does at its deterministic points (set by each test, reset after)."""

    on_locked: Callable[[DeployLock], None] | None = None
    launch_delay_s: float = 0.0


class _HookedStore(KubernetesDeploymentStore):
    @contextlib.contextmanager
    def lock(self, flow_name: str, holder: str) -> Iterator[DeployLock]:
        with super().lock(flow_name, holder) as held:
            if Hooks.on_locked is not None:
                Hooks.on_locked(held)
            yield held


class HookedLauncher(KubernetesLauncher):
    """The Kubernetes launcher with two test points: right after the deploy lock is taken, and a slow
    launch (a deploy that outlasts its lease)."""

    name = "lease-test-kubernetes"

    def deployment_store(self, state_dir: str | None = None) -> KubernetesDeploymentStore:
        return _HookedStore(self.settings, self.api, state_dir)

    def launch(self, request: LaunchRequest, log_dir: str) -> LaunchedJob:
        time.sleep(Hooks.launch_delay_s)
        return super().launch(request, log_dir)


register_launcher(HookedLauncher)


@pytest.fixture()
def kube_env(
    kube_cluster: KubeCluster, kafka: KafkaBroker, tmp_path: Path, topic_prefix: str
) -> Iterator[KubeEnv]:
    with kwok_bench(kube_cluster, kafka, tmp_path, topic_prefix) as env:
        try:
            yield env
        finally:
            Hooks.on_locked, Hooks.launch_delay_s = None, 0.0


def hooked_resource(env: KubeEnv) -> Any:
    """The deploy resource on the hooked launcher, with a 3 s lease."""
    assert env.bench is not None
    config = env.launcher_config(lease_seconds=LEASE_S)
    return env.bench.resource(
        launcher=HookedLauncher.name, launcher_config=config, health_timeout_s=30, preflight=False
    )


def unreachable(configuration: Any) -> Any:
    """A REST client whose every request goes through a proxy on a closed port: the API unreachable."""
    from kubernetes.client import rest

    cut = copy.copy(configuration)
    cut.proxy = "http://127.0.0.1:9"
    cut.no_proxy = None
    return rest.RESTClientObject(cut)


def coordination(env: KubeEnv) -> Any:
    from kubernetes import client

    return client.CoordinationV1Api(env.cluster.api_client())


def lease(env: KubeEnv) -> Any | None:
    try:
        return coordination(env).read_namespaced_lease(LEASE, env.namespace)
    except Exception as exc:
        if getattr(exc, "status", None) == 404:
            return None
        raise


def take_over(env: KubeEnv, holder: str) -> None:
    """What another deploy does once it holds the Lease: its own holder identity, renewed now."""
    current = lease(env)
    assert current is not None
    current.spec.holder_identity = holder
    current.spec.renew_time = dt.datetime.now(dt.UTC)
    coordination(env).replace_namespaced_lease(LEASE, env.namespace, current)


class LeaseWatcher(Poller):
    """Polls the Lease every 0.1 s: (holder, renewTime, leaseDurationSeconds) as they come."""

    def __init__(self, env: KubeEnv) -> None:
        super().__init__()
        self.env, self.seen = env, []

    def poll(self) -> None:
        current = lease(self.env)
        if current is not None:
            spec = current.spec
            entry = (spec.holder_identity, spec.renew_time, spec.lease_duration_seconds)
            if not self.seen or self.seen[-1] != entry:
                self.seen.append(entry)


def test_a_held_lease_is_renewed_and_a_deploy_longer_than_the_lease_completes(kube_env: KubeEnv) -> None:
    env = kube_env
    resource = hooked_resource(env)
    Hooks.launch_delay_s = 2.5 * LEASE_S  # the launch alone outlasts the lease twice over
    started = time.monotonic()
    with dg.instance_for_test() as instance, LeaseWatcher(env) as watcher:
        assert env.bench.materialize(instance, resource=resource).success
    assert time.monotonic() - started > 2.5 * LEASE_S
    holders = {holder for holder, _, _ in watcher.seen}
    (holder,) = holders  # one holder throughout: never taken over, never re-acquired
    assert holder.startswith("run ") and "lock " in holder, holder
    renewals = sorted({renewed for _, renewed, _ in watcher.seen})
    assert len(renewals) >= 4, watcher.seen  # renewed every third of the lease (and at each step)
    gaps = [(b - a).total_seconds() for a, b in zip(renewals, renewals[1:], strict=False)]
    assert max(gaps) < LEASE_S, gaps  # never left to expire
    assert {duration for _, _, duration in watcher.seen} == {LEASE_S}
    assert lease(env) is None  # released (deleted) by its holder at the end
    record = env.launcher(lease_seconds=LEASE_S).deployment_store().current("ticks")
    assert record is not None and record.job.launcher == HookedLauncher.name


def test_an_expired_lease_is_taken_over_and_the_holder_that_lost_it_stops(kube_env: KubeEnv) -> None:
    env = kube_env
    first = env.launcher(lease_seconds=LEASE_S).deployment_store()
    second = env.launcher(lease_seconds=LEASE_S).deployment_store()
    api_client = first.api.client  # type: ignore[attr-defined]
    reachable = api_client.rest_client
    with contextlib.ExitStack() as run_a, contextlib.ExitStack() as run_b:
        held = run_a.enter_context(first.lock("ticks", holder="run A"))
        held.ensure_held("drain the running job")
        cut_at = time.monotonic()
        api_client.rest_client = unreachable(api_client.configuration)  # run A: no renewal from now
        with pytest.raises(DeploymentError, match="being deployed or stopped by run A"):
            run_b.enter_context(second.lock("ticks", holder="run B"))

        def taken() -> bool:
            with contextlib.suppress(DeploymentError):
                run_b.enter_context(second.lock("ticks", holder="run B"))
                return True
            return False

        wait_for(taken, 4 * LEASE_S, "run B taking over the expired Lease", interval_s=0.25)
        assert time.monotonic() - cut_at >= LEASE_S - 1  # not before it expired (1 s: clock reads)
        assert held.lost is not None and "not renewed" in held.lost, held.lost
        api_client.rest_client = reachable  # run A reaches the API again: too late
        with pytest.raises(DeployLockLost) as lost:
            held.ensure_held("launch the new version")
        message = str(lost.value)
        assert "flow 'ticks'" in message and "run A lost the flow's deploy lock" in message, message
        assert f"Lease {env.namespace}/{LEASE}" in message and "now held by run B" in message, message
        assert "before it would launch the new version" in message, message
        assert "Done under the lock before: drain the running job" in message, message
        assert "never launches or records anything more" in message, message
        assert redact_text(message) == message

        run_a.close()  # run A leaves its lock while run B holds the Lease: run B's Lease stays
        current = lease(env)
        assert current is not None and current.spec.holder_identity.startswith("run B (")
        assert second.lock_held("ticks")
    assert lease(env) is None  # run B released it when it left


def test_a_holder_that_lost_the_lease_never_launches(kube_env: KubeEnv) -> None:
    env = kube_env
    apps, _ = env.admin()
    resource = hooked_resource(env)
    store = env.launcher(lease_seconds=LEASE_S).deployment_store()
    with dg.instance_for_test() as instance:
        assert env.bench.materialize(instance, resource=resource, LOOM_TEST_VERSION="1").success
        before = apps.read_namespaced_stateful_set("loom-ticks", env.namespace)
        record = store.current("ticks")
        assert record is not None

        # the deterministic point: right after this deploy took its lock, another holder takes the Lease
        Hooks.on_locked = lambda held: take_over(env, "run elsewhere (pid 1 on another-host)")
        failed = env.bench.materialize(instance, resource=resource, LOOM_TEST_VERSION="2")
    message = step_failure_message(failed)
    assert "flow 'ticks'" in message and "lost the flow's deploy lock" in message, message
    assert "now held by run elsewhere (pid 1 on another-host)" in message, message
    assert "before it would drain the running job" in message, message
    assert "Done under the lock before: nothing" in message, message
    assert "never launches or records anything more" in message, message
    after = apps.read_namespaced_stateful_set("loom-ticks", env.namespace)
    assert after.metadata.resource_version == before.metadata.resource_version  # never touched
    assert after.metadata.generation == before.metadata.generation and after.spec.replicas == 1
    again = store.current("ticks")
    assert again is not None and (again.run_id, again.deployed_at) == (record.run_id, record.deployed_at)
    current = lease(env)  # the other holder's Lease: left alone when the deploy gave up
    assert current is not None and current.spec.holder_identity == "run elsewhere (pid 1 on another-host)"
