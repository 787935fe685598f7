"""Deploy, redeploy, roll back and undeploy a flow: the lifecycle behind materializing a flow asset.

Deploy = compile with the run-time config -> lineage check -> loom's deploy checks -> sink tables
checked on the real systems -> Kafka topics -> offset safety (a change of group/topics/reset measured
on the broker) -> the consumer group's fence is free (no other job consumes the group) -> config snapshot
-> preflight of the new version in a fresh process (when a running job could be taken down) -> (flow
lock) drain the running job -> launch -> health gate -> record. If the new job fails its gate, it is
killed and the previous deployment is started again. Every step before the lock is a check: a failure
there never touches the running job.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from loom_dagster.core.checks.loom_checks import (
    DeployChecksFailed,
    DeployChecksReport,
    run_flow_deploy_checks,
)
from loom_dagster.core.deploy.launch_records import JobReport, JobState, LaunchedJob, LaunchRequest
from loom_dagster.core.deploy.store import (
    ConfigFile,
    Deployment,
    DeploymentStore,
    read_config_files,
    scratch_copy,
)
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.flows.catalog import CompiledFlow, compile_spec
from loom_dagster.core.flows.lineage_check import check_lineage
from loom_dagster.core.flows.loading import ensure_on_path
from loom_dagster.core.flows.records import LoomFlow
from loom_dagster.core.flows.spec import LoomFlowSpec
from loom_dagster.core.launchers.base import Launcher
from loom_dagster.core.launchers.registry import is_launcher_of, launcher_from_ref, launcher_ref

if TYPE_CHECKING:
    # The pre-launch checks pull in Kafka, SQLAlchemy and ClickHouse clients: imported when a deploy
    # runs them, not when a code location that only declares the deploy assets loads.
    from loom_dagster.core.checks.offsets import OffsetPlan
    from loom_dagster.core.checks.topics import TopicsReport
    from loom_dagster.core.deploy.progress import ProgressGate, ProgressVerdict
    from loom_dagster.core.sinks.table_report import SinkTablesReport

Log = Callable[[str], None]
OnChecks = Callable[[DeployChecksReport], None]


class SinkTablesError(DeploymentError):
    """A sink table is missing, unreachable or does not match its payload; nothing was launched."""

    def __init__(self, flow_name: str, report: SinkTablesReport) -> None:
        super().__init__(report.describe(flow_name))
        self.report = report


class OffsetResetRefused(DeploymentError):
    """The new version would start from ``auto_offset_reset`` and the run did not accept it."""

    def __init__(self, flow_name: str, plan: OffsetPlan) -> None:
        super().__init__(plan.describe(flow_name))
        self.plan = plan


class DeployOptions(msgspec.Struct, frozen=True):
    """Timeouts and switches of a deploy."""

    launch: bool = True
    health_timeout_s: float = 60.0
    drain_timeout_s: float = 30.0
    preflight: bool = True
    preflight_timeout_s: float = 120.0
    create_missing_tables: bool = False
    connect_timeout_s: float = 10.0
    gate: str = "health"
    """``health``: the new job must connect; ``progress``: it must also move data within
    ``progress_window_s`` (``loom_dagster.core.deploy.progress``), else it is stopped and the previous one restarted."""
    progress_window_s: float = 60.0


class DeployResult(msgspec.Struct, frozen=True):
    """What a materialization did: the compiled flow, and the deployment if it launched one."""

    compiled: CompiledFlow
    deployment: Deployment | None = None
    previous: Deployment | None = None
    drain_seconds: float | None = None
    gate_seconds: float | None = None
    checks: DeployChecksReport | None = None
    tables: SinkTablesReport | None = None
    offsets: OffsetPlan | None = None
    progress: ProgressVerdict | None = None


class DeployObserver:
    """Told about each deployment's lifecycle (e.g. ``lineage_events.OpenLineageObserver``); does nothing.

    The deployer calls ``deploying`` (a deploy that will launch passed its compile and lineage check),
    ``deployed`` (the new job passed its health gate and was recorded) and ``undeployed``; whoever calls
    ``deploy`` reports ``failed`` (it owns the error); the job health sensor ``running``. Methods must
    never raise.
    """

    def deploying(self, compiled: CompiledFlow, run_id: str | None) -> None:
        """A deploy of *compiled* starts (checks, launch and health gate follow)."""

    def deployed(self, result: DeployResult) -> None:
        """The deploy succeeded; ``result.previous`` (if any) was replaced."""

    def failed(self, flow_name: str, error: BaseException) -> None:
        """The deploy announced by ``deploying`` failed; what ran before keeps running (or rolled back)."""

    def undeployed(self, deployment: Deployment) -> None:
        """*deployment* was stopped on purpose."""

    def running(self, deployment: Deployment) -> None:
        """The job health sensor saw *deployment*'s job healthy."""

    def record_extra(self, flow_name: str) -> dict[str, object]:
        """What the deployment record of the deploy announced by ``deploying`` should keep for this
        observer (JSON-safe; kept wherever the store keeps records, e.g. in the cluster)."""
        return {}


class FlowDeployer:
    """Runs the deploy lifecycle for flows with one launcher and one deployment store.

    Example:
        >>> from loom_dagster.core.launchers import LocalProcessLauncher
        >>> import tempfile
        >>> deployer = FlowDeployer(LocalProcessLauncher(), DeploymentStore(tempfile.mkdtemp()))
    """

    def __init__(
        self,
        launcher: Launcher,
        store: DeploymentStore,
        options: DeployOptions | None = None,
        observer: DeployObserver | None = None,
    ):
        self.launcher = launcher
        self.store = store
        self.options = options or DeployOptions()
        self.observer = observer or DeployObserver()

    def validate(
        self,
        spec: LoomFlowSpec,
        declared: LoomFlow,
        sink_keys: dict[str, str] | None = None,
        environment: str | None = None,
    ) -> CompiledFlow:
        """Compile with the run-time config and check the sinks against the declared lineage."""
        compiled = compile_spec(spec, environment)
        check_lineage(declared, compiled.flow, sink_keys)
        return compiled

    def job_view(
        self,
        compiled: CompiledFlow,
        declared: LoomFlow,
        sink_keys: dict[str, str] | None,
        environment: str | None,
        log: Log = print,
    ) -> CompiledFlow:
        """The flow as its job will compile it, for the checks that connect (tables, topics, offsets,
        fence): *compiled* itself, unless the spec's ``env=`` reaches the job's environment only; then
        compiled again with the config loaded in that environment, and its lineage checked too."""
        spec = compiled.spec
        if not spec.env:
            return compiled
        view = compile_spec(spec, environment, as_job=True)
        check_lineage(declared, view.flow, sink_keys)
        log(
            f"the job's environment sets {', '.join(sorted(spec.env))}: the pre-launch checks connect "
            "with the config as the job loads it"
        )
        return view

    def deploy(
        self,
        spec: LoomFlowSpec,
        declared: LoomFlow,
        *,
        sink_keys: dict[str, str] | None = None,
        environment: str | None = None,
        run_id: str | None = None,
        log: Log = print,
        accept_offset_reset: bool = False,
        on_checks: OnChecks | None = None,
    ) -> DeployResult:
        """Check everything that can be checked, then (if launching) replace the running job safely.

        ``on_checks`` receives loom's deploy-check report as soon as it exists (also when it blocks).
        """
        compiled = self.validate(spec, declared, sink_keys, environment)
        log(f"compiled flow {declared.name!r} (plan {compiled.flow.plan_hash}); lineage check passed")
        if self.options.launch:
            self.observer.deploying(compiled, run_id)
        checks = self.run_deploy_checks(compiled, on_checks, log)
        if not self.options.launch:
            return DeployResult(compiled=compiled, checks=checks)
        job_view = self.job_view(compiled, declared, sink_keys, environment, log)
        tables = self.check_tables(job_view, sink_keys, log)
        self.check_topics(job_view, log)
        offsets = self.check_offsets(job_view, accept_offset_reset, log)
        from loom_dagster.core.checks.fence import check_fence

        fence = check_fence(
            job_view, self.store.current(declared.name), timeout_s=self.options.connect_timeout_s
        )
        if fence.note:
            log(fence.note)
        request = self.snapshot(launch_request(spec, compiled, run_id), compiled)
        if self.options.preflight and (self._running(declared.name) or spec.processes > 1):
            # A running job needs protecting (without one, the health gate is the check); a cluster
            # shape is only validated by loom when the dataflow is prepared, so check it before launch.
            ran = self.launcher.preflight(request, self.options.preflight_timeout_s)
            log(f"preflight passed: {ran or f'launcher {self.launcher.name!r} found nothing wrong'}")
        with self.store.lock(declared.name, holder=f"run {run_id or '?'}"):
            result = self._replace_running(compiled, request, run_id, log, offsets, job_view)
            self.observer.deployed(result)
        return msgspec.structs.replace(result, checks=checks, tables=tables, offsets=offsets)

    def snapshot(self, request: LaunchRequest, compiled: CompiledFlow) -> LaunchRequest:
        """The request with its config files replaced by this deployment's own copies.

        The copies are loaded again and must resolve to the config that was just compiled and checked:
        a file edited during the deploy fails it rather than launching something nobody checked.
        """
        files = read_config_files(request.config_files)
        snapshot_hash = config_hash_of_contents(files, compiled.flow.environment)
        if snapshot_hash != compiled.flow.config_hash:
            raise DeploymentError(
                f"the config of flow {compiled.flow.name!r} changed while it was being deployed (config hash "
                f"{compiled.flow.config_hash} checked, {snapshot_hash} now); nothing was launched. "
                "Materialize again."
            )
        copies = self.store.snapshot_config(compiled.flow.name, files, compiled.flow.config_hash[:12])
        return msgspec.structs.replace(request, config_files=copies)

    def run_deploy_checks(
        self, compiled: CompiledFlow, on_checks: OnChecks | None = None, log: Log = print
    ) -> DeployChecksReport:
        """loom's deploy checks for the flow's environment; raise ``DeployChecksFailed`` if they block."""
        report = run_flow_deploy_checks(compiled.spec, compiled.flow.environment)
        if on_checks is not None:
            on_checks(report)
        if report.blocks:
            raise DeployChecksFailed(compiled.flow.name, report)
        log(report.describe(compiled.flow.name))
        return report

    def check_tables(
        self, compiled: CompiledFlow, sink_keys: dict[str, str] | None = None, log: Log = print
    ) -> SinkTablesReport:
        """Every storage sink's table checked on the real system; raise ``SinkTablesError`` on a problem."""
        from loom_dagster.core.checks.tables import check_sink_tables

        report = check_sink_tables(
            compiled,
            sink_keys=sink_keys,
            create_missing=self.options.create_missing_tables,
            timeout_s=self.options.connect_timeout_s,
        )
        if not report.ok:
            raise SinkTablesError(compiled.flow.name, report)
        if report.created:
            log(f"created missing sink tables: {', '.join(report.created)}")
        if report.checked or report.pending:
            log(f"sink tables ok: {', '.join([*report.checked, *report.pending])}")
        return report

    def check_topics(self, compiled: CompiledFlow, log: Log = print) -> TopicsReport:
        """Every source, output and dead-letter topic exists (or the broker creates it on first write)."""
        from loom_dagster.core.checks.topics import check_topics

        report = check_topics(compiled, timeout_s=self.options.connect_timeout_s)
        if report.checked:
            log(f"Kafka topics ok: {', '.join(report.checked)}")
        if report.auto_created:
            log(f"created by the broker on first write: {', '.join(report.auto_created)}")
        return report

    def check_offsets(
        self, compiled: CompiledFlow, accept_reset: bool, log: Log = print
    ) -> OffsetPlan | None:
        """Where the new job starts on its topics; refuse an unaccepted reset of a changed group/topic."""
        previous = self.store.current(compiled.flow.name)
        previous_source = previous.extra.get("source") if previous is not None else None
        from loom_dagster.core.checks.offsets import plan_offsets

        plan = plan_offsets(compiled, previous_source, timeout_s=self.options.connect_timeout_s)
        if plan is None:
            return None
        if plan.requires_acceptance:
            if not accept_reset:
                raise OffsetResetRefused(compiled.flow.name, plan)
            log("offset reset accepted by the run config:\n" + plan.describe(compiled.flow.name))
        return plan

    def _replace_running(
        self,
        compiled: CompiledFlow,
        request: LaunchRequest,
        run_id: str | None,
        log: Log,
        offsets: OffsetPlan | None = None,
        job_view: CompiledFlow | None = None,
    ) -> DeployResult:
        name = compiled.flow.name
        previous = self.store.current(name)
        report = self.live_report(previous) if previous is not None else None
        previous_running = report is not None and report.alive_processes > 0
        watched = job_view or compiled  # the gate reads the brokers the job reads
        before = self._previous_progress(watched, previous, report if previous_running else None, offsets)
        progress_gate = self._progress_gate(watched, offsets)
        drain_seconds = None
        if previous is not None and previous_running:
            self.store.ensure_held(name, "drain the running job")  # a lost lock: stop, changing nothing
            log(f"draining the running job ({previous.job.processes_text})")
            drain_seconds = self.reachable(previous).stop(previous.job, self.options.drain_timeout_s)
            log(f"previous job stopped in {drain_seconds:.2f}s")
        if progress_gate is not None:
            progress_gate.measure_start()
        self.store.ensure_held(name, "launch the new version")
        job = self.launcher.launch(request, str(self.store.flow_dir(name)))
        log(f"launched job {job.processes_text}; waiting for it to become healthy")
        verdict = None
        try:
            gate_seconds = self.wait_healthy(job)
            if progress_gate is not None:
                verdict = self._wait_progress(progress_gate, job, log)
        except DeploymentError as failure:
            self.launcher.stop(job, timeout_s=5.0)
            raise DeploymentError(
                self._roll_back(name, previous if previous_running else None, failure, log)
            ) from failure
        deployment = self.record(compiled, job, run_id, previous, offsets)
        extra = {**deployment.extra, **({"previous_progress": before} if before is not None else {})}
        if verdict is not None:
            extra["progress_gate"] = verdict.to_dict()
        deployment = msgspec.structs.replace(deployment, extra=extra)
        self.store.save(deployment)
        return DeployResult(compiled, deployment, previous, drain_seconds, gate_seconds, progress=verdict)

    def _progress_gate(self, compiled: CompiledFlow, offsets: OffsetPlan | None) -> ProgressGate | None:
        """The progress gate of this deploy (``None`` unless ``gate`` is ``progress``)."""
        if self.options.gate != "progress":
            return None
        from loom_dagster.core.deploy.progress import ProgressGate

        return ProgressGate.for_flow(
            compiled, offsets, self.options.progress_window_s, timeout_s=self.options.connect_timeout_s
        )

    def _wait_progress(self, gate: ProgressGate, job: LaunchedJob, log: Log) -> ProgressVerdict:
        """Run the progress gate on the healthy new *job*; ``ProgressGateFailed`` when no data moved."""
        from loom_dagster.core.deploy.progress import ProgressGateFailed

        verdict = gate.wait(self.launcher, job, log)
        if not verdict.passed:
            tail = self._tail(job) if verdict.signal == "dead" else ""
            raise ProgressGateFailed(verdict.message + tail, verdict)
        log(f"progress gate passed: {verdict.message}")
        return verdict

    def _previous_progress(
        self,
        compiled: CompiledFlow,
        previous: Deployment | None,
        report: JobReport | None,
        offsets: OffsetPlan | None,
    ) -> dict[str, object] | None:
        """Whether the deployment being replaced moves data (``extra["previous_progress"]``, read by the
        regression watch); ``None`` without a previous deployment."""
        if previous is None or previous.stopped_on_purpose:
            return None
        from loom_dagster.core.deploy.progress import dead_letter_sinks, previous_progress

        committed = offsets.start_offsets if offsets is not None else None
        group = offsets.group_id if offsets is not None else None
        return previous_progress(previous, report, committed, group, dead_letter_sinks(compiled)).to_dict()

    def record(
        self,
        compiled: CompiledFlow,
        job: LaunchedJob,
        run_id: str | None,
        previous: Deployment | None,
        offsets: OffsetPlan | None,
    ) -> Deployment:
        """The deployment record of a job this deployer's launcher just started."""
        return Deployment(
            flow_name=compiled.flow.name,
            job=job,
            plan_hash=compiled.flow.plan_hash,
            config_hash=compiled.flow.config_hash,
            deployed_at=time.time(),
            run_id=run_id,
            previous_plan_hash=previous.plan_hash if previous else None,
            extra={**deployment_extra(compiled, offsets), **self.observer.record_extra(compiled.flow.name)},
            launcher=launcher_ref(self.launcher),
        )

    def _roll_back(self, name: str, previous: Deployment | None, failure: DeploymentError, log: Log) -> str:
        gate = getattr(failure, "gate", "health")
        message = f"the new version of flow {name!r} failed its {gate} gate and was stopped: {failure}"
        if previous is None:
            return message + "\nNo previous deployment was running; nothing is running now."
        log("restarting the previous deployment")
        try:
            job, _ = self.relaunch_healthy(previous)
        except DeploymentError as again:
            return message + f"\nRestarting the previous deployment failed too: {again}"
        self.store.save(self.relaunched(previous, job))
        return (
            message
            + f"\nThe previous deployment (plan {previous.plan_hash}) runs again, {job.processes_text}."
        )

    def wait_healthy(self, job: LaunchedJob, timeout_s: float | None = None) -> float:
        """Block until every process is alive and connected; raise with the log tail otherwise."""
        timeout = self.options.health_timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        while True:
            report = self.launcher.report(job)
            if report.state is JobState.HEALTHY:
                return time.monotonic() - started
            if report.state is JobState.DEAD:
                raise DeploymentError(f"the job exited during start-up: {report.reason}.{self._tail(job)}")
            if time.monotonic() - started > timeout:
                raise DeploymentError(
                    f"the job did not connect within {timeout:.0f}s ({report.reason}).{self._tail(job)}"
                )
            time.sleep(0.1)

    def _tail(self, job: LaunchedJob) -> str:
        tail = self.launcher.logs(job)
        return f"\nLast lines of {job.log_path}:\n{tail}" if tail else ""

    def undeploy(self, flow_name: str, by: str) -> Deployment | None:
        """Stop a flow's job on purpose; health sensors will not restart it. ``None`` if never deployed."""
        with self.store.lock(flow_name, holder=by):
            current = self.store.current(flow_name)
            if current is None:
                return None
            self.drain(current)
            stopped = self.store.mark_stopped(current, by)
            if not current.stopped_on_purpose:
                self.observer.undeployed(stopped)
            return stopped

    def restart(self, flow_name: str, by: str, log: Log = print) -> Deployment:
        """Start the recorded deployment again, as it was: its own config snapshot, not the live files
        (the health sensor's restarts; a redeploy is what picks up edits)."""
        with self.store.lock(flow_name, holder=by):
            current = self.store.current(flow_name)
            if current is None:
                raise DeploymentError(f"flow {flow_name!r} has never been deployed here")
            if current.stopped_on_purpose:
                raise DeploymentError(
                    f"flow {flow_name!r} was stopped on purpose by {current.stopped_by}; not restarting it "
                    "(materialize the flow to deploy it again)"
                )
            self.check_restart(current, log)
            self.drain(current)
            job, _ = self.relaunch_healthy(current)
            restarted = self.relaunched(current, job)
            self.store.save(restarted)
            log(f"restarted flow {flow_name!r}: {job.processes_text}")
            return restarted

    def roll_back_to_previous(
        self, flow_name: str, reason: str, by: str = "regression watch", log: Log = print
    ) -> Deployment:
        """Stop the current deployment's job and start the deployment it replaced again, as it was
        recorded (its own config snapshot), under the flow lock; the restored record carries
        ``extra["rolled_back_from"]`` (the bad plan and *reason*), so it is never rolled back again
        until a new deploy. If the previous version does not become healthy, the current one is
        started again and ``DeploymentError`` says so.

        Example:
            >>> deployer.roll_back_to_previous("orders", "Kafka lag STALL: ...")  # doctest: +SKIP
        """
        from loom_dagster.core.deploy.progress import previous_deployment, rolled_back_extra

        with self.store.lock(flow_name, holder=by):
            current = self.store.current(flow_name)
            if current is None:
                raise DeploymentError(f"flow {flow_name!r} has never been deployed here")
            if current.stopped_on_purpose or current.extra.get("rolled_back_from"):
                raise DeploymentError(
                    f"flow {flow_name!r} was stopped on purpose or already rolled back; not rolling back"
                )
            previous = previous_deployment(self.store.history(flow_name), current)
            if previous is None:
                raise DeploymentError(f"flow {flow_name!r} has no previous deployment to roll back to")
            self.launcher.verify_record(previous.job)  # a record edited out of band starts nothing
            self.drain(current)
            try:
                job, _ = self.relaunch_healthy(previous)
            except DeploymentError as failure:
                self.store.ensure_held(flow_name, "start the current deployment again")
                again = self.launcher.relaunch(current.job, str(self.store.flow_dir(flow_name)))
                self.store.save(self.relaunched(current, again))
                raise DeploymentError(
                    f"rolling flow {flow_name!r} back to plan {previous.plan_hash} failed ({failure}); "
                    f"plan {current.plan_hash} was started again, {again.processes_text}"
                ) from failure
            restored = self.relaunched(previous, job, extra=rolled_back_extra(previous, current, reason))
            self.store.save(restored)
            log(
                f"rolled flow {flow_name!r} back from plan {current.plan_hash} to plan {previous.plan_hash} "
                f"({job.processes_text}): {reason}"
            )
            return restored

    def check_restart(self, current: Deployment, log: Log = print) -> None:
        """What a restart can check before it launches: the snapshot still compiles, its tables, topics
        and fence are as a deploy requires. (Config edits are not picked up: the snapshot is what ran.)
        A record edited out of band is refused first (``Launcher.verify_record``)."""
        self.launcher.verify_record(current.job)
        with recorded_spec(self.store, current) as spec:
            compiled = compile_spec(spec, current.job.request.environment)
        self.check_tables(compiled, log=log)
        self.check_topics(compiled, log)
        from loom_dagster.core.checks.fence import check_fence

        check_fence(compiled, current, timeout_s=self.options.connect_timeout_s)

    def _running(self, flow_name: str) -> bool:
        current = self.store.current(flow_name)
        return current is not None and not current.stopped_on_purpose and self._alive(current)

    def launcher_for(self, deployment: Deployment) -> Launcher:
        """The launcher that reaches *deployment*'s job: this deployer's, unless the record names
        another launcher class (the job predates a change of launcher), then that one, rebuilt; this
        deployer's again when that one cannot be built here (it does not import)."""
        if is_launcher_of(deployment.launcher, self.launcher):
            return self.launcher
        try:
            return launcher_from_ref(deployment.launcher)
        except DeploymentError:
            return self.launcher

    def live_report(self, deployment: Deployment) -> JobReport | None:
        """The recorded job's report from its launcher; ``None`` when that launcher cannot see it from here."""
        launcher = self.launcher_for(deployment)
        return launcher.report(deployment.job) if launcher.owns(deployment.job) else None

    def _alive(self, deployment: Deployment) -> bool:
        """Whether the recorded job runs; ``False`` when its launcher cannot see it from here."""
        report = self.live_report(deployment)
        return report is not None and report.alive_processes > 0

    def drain(self, deployment: Deployment) -> float | None:
        """Stop *deployment*'s job if it runs (SIGTERM -> drain); the seconds it took, ``None`` if none ran.
        ``DeploymentError`` when it runs out of this launcher's reach."""
        if not self._alive(deployment):
            return None
        self.store.ensure_held(deployment.flow_name, "drain the running job")
        return self.reachable(deployment).stop(deployment.job, self.options.drain_timeout_s)

    def relaunch_healthy(self, deployment: Deployment) -> tuple[LaunchedJob, float]:
        """Start *deployment*'s job again as recorded and wait for its health gate (the job and the gate's
        seconds); a job that fails the gate is stopped and the ``DeploymentError`` raised."""
        self.store.ensure_held(deployment.flow_name, f"start plan {deployment.plan_hash} again")
        job = self.launcher.relaunch(deployment.job, str(self.store.flow_dir(deployment.flow_name)))
        try:
            return job, self.wait_healthy(job)
        except DeploymentError:
            self.launcher.stop(job, timeout_s=5.0)
            raise

    def relaunched(self, deployment: Deployment, job: LaunchedJob, **changes: Any) -> Deployment:
        """*deployment*'s record running again as *job*: one more restart, no longer stopped, this launcher."""
        fields: dict[str, Any] = {
            "job": job,
            "restarts": deployment.restarts + 1,
            "stopped_at": None,
            "stopped_by": None,
            "launcher": launcher_ref(self.launcher),
        }
        return msgspec.structs.replace(deployment, **{**fields, **changes})

    def reachable(self, deployment: Deployment) -> Launcher:
        """The launcher that can stop *deployment*'s job from here, or ``DeploymentError`` saying where
        the job runs."""
        launcher = self.launcher_for(deployment)
        if not launcher.owns(deployment.job):
            raise DeploymentError(
                f"flow {deployment.flow_name!r} is deployed on host {deployment.host!r}, out of reach of "
                f"the {launcher.name} launcher here ({launcher.location()}). Stop it there, or share no "
                "state directory between hosts."
            )
        return launcher


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


def launch_request(spec: LoomFlowSpec, compiled: CompiledFlow, run_id: str | None) -> LaunchRequest:
    """The launch request for a compiled spec: absolute config files, the import root on sys.path."""
    return LaunchRequest(
        flow_name=compiled.flow.name,
        import_path=spec.import_path,
        config_files=spec.config_files(compiled.flow.environment),
        environment=compiled.flow.environment,
        plan_hash=compiled.flow.plan_hash,
        config_hash=compiled.flow.config_hash,
        processes=spec.processes,
        workers_per_process=spec.workers_per_process,
        sys_path=(import_root(spec.import_path),),
        env=tuple(sorted(spec.env.items())),
        run_id=run_id,
        cwd=str(Path.cwd()),
    )


def config_hash_of_contents(files: Sequence[ConfigFile], environment: str) -> str:
    """The config hash (``describe.config_hash``, keyed) of snapshot entries as a deployment loads them,
    from a private scratch copy."""
    from loom_dagster.core.flows.describe import config_hash
    from loom_dagster.core.flows.loading import load_config

    with scratch_copy(files) as paths:
        return config_hash(load_config(paths, environment))


def deployment_extra(compiled: CompiledFlow, offsets: OffsetPlan | None) -> dict[str, object]:
    """What a deployment records beyond its job: the source, and where the job started reading."""
    extra: dict[str, object] = {"source": source_summary(compiled)}
    if offsets is not None:
        extra["start_offsets"] = {
            topic: {str(partition): offset for partition, offset in parts.items()}
            for topic, parts in offsets.start_offsets.items()
        }
    return extra


def source_summary(compiled: CompiledFlow) -> dict[str, object]:
    """What an operator tool needs to read the flow's lag: brokers, group, topics, reset (no secrets)."""
    settings = getattr(compiled.plan.source, "settings", None)
    reset = getattr(settings, "auto_offset_reset", None)
    return {
        "kind": compiled.flow.source_kind,
        "brokers": list(getattr(settings, "brokers", ()) or ()),
        "group_id": compiled.flow.consumer_group,
        "topics": [t.topic for t in compiled.flow.source_topics],
        "secured": getattr(settings, "security", None) is not None,
        "auto_offset_reset": str(getattr(reset, "value", reset)) if reset is not None else None,
    }


def import_root(import_path: str) -> str:
    """The sys.path entry a flow's module was imported from, so the job can import it too."""
    module_name = import_path.partition(":")[0]
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return str(Path.cwd())
    path = Path(file).resolve().parent
    depth = module_name.count(".") + (1 if Path(file).name == "__init__.py" else 0)
    for _ in range(depth):
        path = path.parent
    return str(path)
