"""What happens to a flow's recorded deployment after its deploy: restart it, roll it back to the one it
replaced, undeploy it. Each runs under the flow's lock, reads the record once there, and starts only
what a record holds (its own config snapshot, never the live files: a redeploy is what picks up edits).

``FlowDeployer.restart`` / ``roll_back_to_previous`` / ``undeploy`` are the entries; the job primitives
(drain, relaunch and wait for health, the relaunched record) are the deployer's, shared with the deploy
and with ``rewind``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from loom_dagster.core.deploy.progress import previous_deployment, rolled_back_extra
from loom_dagster.core.deploy.steps import RESTART_CHECKS, DeployContext, Log, run_steps
from loom_dagster.core.deploy.store import Deployment, DeploymentStore
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.flows.catalog import compile_spec
from loom_dagster.core.flows.loading import ensure_on_path
from loom_dagster.core.flows.spec import LoomFlowSpec

if TYPE_CHECKING:
    # Only a type here: the deployer imports this module for its entries (no import cycle).
    from loom_dagster.core.deploy.deployer import FlowDeployer


def undeploy(deployer: FlowDeployer, flow_name: str, by: str) -> Deployment | None:
    """Stop a flow's job on purpose; health sensors will not restart it. ``None`` if never deployed."""
    with deployer.store.lock(flow_name, holder=by):
        current = deployer.store.current(flow_name)
        if current is None:
            return None
        deployer.drain(current)
        stopped = deployer.store.mark_stopped(current, by)
        if not current.stopped_on_purpose:
            deployer.observer.undeployed(stopped)
        return stopped


def restart(deployer: FlowDeployer, flow_name: str, by: str, log: Log = print) -> Deployment:
    """Start the recorded deployment again, as it was: its own config snapshot, not the live files
    (the health sensor's restarts; a redeploy is what picks up edits)."""
    with deployer.store.lock(flow_name, holder=by):
        current = deployer.store.current(flow_name)
        if current is None:
            raise DeploymentError(f"flow {flow_name!r} has never been deployed here")
        if current.stopped_on_purpose:
            raise DeploymentError(
                f"flow {flow_name!r} was stopped on purpose by {current.stopped_by}; not restarting it "
                "(materialize the flow to deploy it again)"
            )
        check_restart(deployer, current, log)
        deployer.drain(current)
        job, _ = deployer.relaunch_healthy(current)
        restarted = deployer.relaunched(current, job)
        deployer.store.save(restarted)
        log(f"restarted flow {flow_name!r}: {job.processes_text}")
        return restarted


def check_restart(deployer: FlowDeployer, current: Deployment, log: Log = print) -> None:
    """What a restart can check before it launches: the snapshot still compiles, its tables, topics
    and fence are as a deploy requires (``RESTART_CHECKS``). (Config edits are not picked up: the
    snapshot is what ran.) A record edited out of band is refused first (``Launcher.verify_record``)."""
    deployer.launcher.verify_record(current.job)
    with recorded_spec(deployer.store, current) as spec:
        compiled = compile_spec(spec, current.job.request.environment)
    ctx = DeployContext(deployer, spec, compiled, current=current, record_read=True, log=log)
    run_steps(RESTART_CHECKS, ctx)


def roll_back_to_previous(
    deployer: FlowDeployer, flow_name: str, reason: str, by: str = "regression watch", log: Log = print
) -> Deployment:
    """Stop the current deployment's job and start the deployment it replaced again, as it was
    recorded (its own config snapshot), under the flow lock; the restored record carries
    ``extra["rolled_back_from"]`` (the bad plan and *reason*), so it is never rolled back again
    until a new deploy. If the previous version does not become healthy, the current one is
    started again and ``DeploymentError`` says so."""
    store = deployer.store
    with store.lock(flow_name, holder=by):
        current = store.current(flow_name)
        if current is None:
            raise DeploymentError(f"flow {flow_name!r} has never been deployed here")
        if current.stopped_on_purpose or current.extra.get("rolled_back_from"):
            raise DeploymentError(
                f"flow {flow_name!r} was stopped on purpose or already rolled back; not rolling back"
            )
        previous = previous_deployment(store.history(flow_name), current)
        if previous is None:
            raise DeploymentError(f"flow {flow_name!r} has no previous deployment to roll back to")
        deployer.launcher.verify_record(previous.job)  # a record edited out of band starts nothing
        deployer.drain(current)
        try:
            job, _ = deployer.relaunch_healthy(previous)
        except DeploymentError as failure:
            store.ensure_held(flow_name, "start the current deployment again")
            again = deployer.launcher.relaunch(current.job, str(store.flow_dir(flow_name)))
            store.save(deployer.relaunched(current, again))
            raise DeploymentError(
                f"rolling flow {flow_name!r} back to plan {previous.plan_hash} failed ({failure}); "
                f"plan {current.plan_hash} was started again, {again.processes_text}"
            ) from failure
        restored = deployer.relaunched(previous, job, extra=rolled_back_extra(previous, current, reason))
        store.save(restored)
        log(
            f"rolled flow {flow_name!r} back from plan {current.plan_hash} to plan {previous.plan_hash} "
            f"({job.processes_text}): {reason}"
        )
        return restored


@contextmanager
def recorded_spec(store: DeploymentStore, deployment: Deployment) -> Iterator[LoomFlowSpec]:
    """The spec of a recorded deployment over its own config snapshot (what its job runs), readable
    here while the block runs (a cluster-backed store copies it to a scratch directory)."""
    request = deployment.job.request
    for directory in request.sys_path:
        ensure_on_path(directory)
    with store.readable_config(deployment.flow_name, request.config_files) as config_files:
        yield LoomFlowSpec(
            request.import_path,
            config=config_files,
            environment=request.environment,
            processes=request.processes,
            workers_per_process=request.workers_per_process,
            env={} if request.env_ref else dict(request.env),  # values the store read back, if it could
        )
