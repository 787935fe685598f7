"""Deploy a flow: the lifecycle behind materializing a flow asset.

``FlowDeployer.deploy``: compile with the run-time config and check the lineage -> the pre-launch steps
(``loom_dagster.core.deploy.steps.PRE_LAUNCH_STEPS``: loom's deploy checks, the job's view of the config,
the payload contracts with the code location's other flows, sink tables, Kafka topics, the deployment
record, offsets, the consumer group's fence, the config snapshot, the preflight) -> (flow lock) the record read again, refused if it changed -> drain the running
job -> launch -> health gate (and progress gate) -> record. If the new job fails its gate, it is killed
and the previous deployment is started again. Every step before the lock is a check: a failure there
never touches the running job.

Restart, roll back and undeploy (``loom_dagster.core.deploy.lifecycle``) have thin entries here; the job
primitives they share with the deploy (drain, relaunch and wait for health, the relaunched record) are
methods of the deployer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec

from loom_dagster.core.checks.loom_checks import DeployChecksReport
from loom_dagster.core.checks.offsets import OffsetPlan
from loom_dagster.core.contracts.chain import ContractBroken, ContractsReport, contracts_extra
from loom_dagster.core.deploy import lifecycle
from loom_dagster.core.deploy.launch_records import JobReport, JobState, LaunchedJob, LaunchRequest
from loom_dagster.core.deploy.progress import (
    ProgressGate,
    ProgressGateFailed,
    ProgressVerdict,
    dead_letter_sinks,
    previous_progress,
)
from loom_dagster.core.deploy.steps import (
    PRE_LAUNCH_STEPS,
    Contracts,
    DeployChecks,
    DeployContext,
    DeployStep,
    Log,
    Offsets,
    OnChecks,
    ReadRecord,
    StepRecord,
    add_contract_changes,
    run_steps,
)
from loom_dagster.core.deploy.store import Deployment, DeploymentStore
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.flows.catalog import CompiledFlow, compile_spec
from loom_dagster.core.flows.lineage_check import check_lineage
from loom_dagster.core.flows.records import LoomFlow
from loom_dagster.core.flows.spec import LoomFlowSpec
from loom_dagster.core.launchers.base import Launcher
from loom_dagster.core.launchers.registry import is_launcher_of, launcher_from_ref, launcher_ref
from loom_dagster.core.sinks.table_report import SinkTablesReport

__all__ = [
    "DeployObserver",
    "DeployOptions",
    "DeployResult",
    "FlowDeployer",
    "RecordChanged",
    "deployment_extra",
    "source_summary",
]


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
    contracts: ContractsReport | None = None
    steps: tuple[StepRecord, ...] = ()
    """Each pre-launch step as it ran (name, seconds, outcome), in order."""


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


class RecordChanged(DeploymentError):
    """The flow's deployment record changed between the read the pre-launch steps judged and the lock
    (another deploy, restart, rollback or undeploy finished meanwhile); nothing was stopped or started."""

    def __init__(self, flow_name: str, checked: Deployment | None, now: Deployment | None) -> None:
        super().__init__(
            f"the deployment record of flow {flow_name!r} changed while its pre-launch checks ran "
            f"(checked: {_described(checked)}; now: {_described(now)}): another deploy, restart, rollback "
            "or undeploy finished meanwhile. The offset plan, the fence and the preflight judged the record "
            "read before them, so nothing was stopped or started. Materialize again."
        )


class FlowDeployer:
    """Runs the deploy lifecycle for flows with one launcher and one deployment store.

    ``steps`` are the pre-launch steps a deploy runs, in order (default ``PRE_LAUNCH_STEPS``).

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
        steps: Sequence[DeployStep] = PRE_LAUNCH_STEPS,
    ):
        self.launcher = launcher
        self.store = store
        self.options = options or DeployOptions()
        self.observer = observer or DeployObserver()
        self.steps = tuple(steps)

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
        location_flows: Sequence[LoomFlow] = (),
        accept_contract_change: bool = False,
    ) -> DeployResult:
        """Check everything that can be checked, then (if launching) replace the running job safely.

        ``on_checks`` receives loom's deploy-check report as soon as it exists (also when it blocks).
        ``location_flows`` are the flows of the code location (their records), whose payload contracts
        with this flow the ``contracts`` step checks; flows of other code locations are not seen. A
        breaking contract is refused unless ``accept_contract_change``.
        """
        compiled = self.validate(spec, declared, sink_keys, environment)
        log(f"compiled flow {declared.name!r} (plan {compiled.flow.plan_hash}); lineage check passed")
        launching = self.options.launch
        if launching:
            self.observer.deploying(compiled, run_id)
        ctx = DeployContext(
            self,
            spec,
            compiled,
            declared=declared,
            sink_keys=sink_keys,
            environment=environment,
            run_id=run_id,
            accept_offset_reset=accept_offset_reset,
            accept_contract_change=accept_contract_change,
            location_flows=tuple(location_flows),
            log=log,
            on_checks=on_checks,
        )
        started = time.monotonic()
        run_steps(self.steps if launching else [s for s in self.steps if not s.launch_only], ctx)
        if not launching:
            return DeployResult(compiled=compiled, checks=ctx.checks, steps=tuple(ctx.records))
        log(
            f"pre-launch steps passed in {time.monotonic() - started:.2f}s: "
            + ", ".join(record.describe() for record in ctx.records)
        )
        request = ctx.launch_request()
        with self.store.lock(declared.name, holder=f"run {run_id or '?'}"):
            # Read again, once, under the lock (then passed down): the ``record`` step's read cannot see
            # what finishes between it and the lock, and every writer of a record (deploy, restart,
            # rollback, undeploy, rewind) holds this lock, so from here on it stays as read. The offset
            # plan, the fence and the preflight decision judged the first read: a record that changed
            # meanwhile (another deploy's job, a restart's new pids, another group) makes them stale,
            # so the deploy is refused rather than drain and launch on stale checks.
            previous = self.store.current(declared.name)
            if ctx.record_read and previous != ctx.current:
                raise RecordChanged(declared.name, ctx.current, previous)
            result = self._replace_running(compiled, request, previous, run_id, log, ctx.offsets, ctx.view)
            self.observer.deployed(result)
        return msgspec.structs.replace(
            result,
            checks=ctx.checks,
            tables=ctx.tables,
            offsets=ctx.offsets,
            contracts=ctx.contracts,
            steps=tuple(ctx.records),
        )

    def run_deploy_checks(
        self, compiled: CompiledFlow, on_checks: OnChecks | None = None, log: Log = print
    ) -> DeployChecksReport:
        """loom's deploy checks for the flow's environment (the ``deploy_checks`` step alone); raise
        ``DeployChecksFailed`` if they block."""
        ctx = DeployContext(self, compiled.spec, compiled, log=log, on_checks=on_checks)
        DeployChecks().run(ctx)
        assert ctx.checks is not None  # the step either fills it or raises
        return ctx.checks

    def check_contracts(
        self, compiled: CompiledFlow, location_flows: Sequence[LoomFlow], log: Log = print
    ) -> ContractsReport:
        """The flow's payload contracts with *location_flows* (the ``contracts`` step alone, against the
        flow's current record, accepting nothing): the report, also when a contract breaks (then
        ``report.blocks``); nothing is deployed."""
        ctx = DeployContext(self, compiled.spec, compiled, location_flows=tuple(location_flows), log=log)
        try:
            Contracts().run(ctx)
        except ContractBroken as broken:
            ctx.contracts = broken.contracts
        ctx.current = self.store.current(compiled.flow.name)
        add_contract_changes(ctx)
        assert ctx.contracts is not None  # the step either fills it or raises
        return ctx.contracts

    def check_offsets(
        self, compiled: CompiledFlow, accept_reset: bool, log: Log = print
    ) -> OffsetPlan | None:
        """Where the new job starts on its topics (the ``offsets`` step alone, against the flow's
        current record); refuse an unaccepted reset of a changed group/topic."""
        ctx = DeployContext(self, compiled.spec, compiled, accept_offset_reset=accept_reset, log=log)
        ReadRecord().run(ctx)
        Offsets().run(ctx)
        return ctx.offsets

    def _replace_running(
        self,
        compiled: CompiledFlow,
        request: LaunchRequest,
        previous: Deployment | None,
        run_id: str | None,
        log: Log,
        offsets: OffsetPlan | None = None,
        job_view: CompiledFlow | None = None,
    ) -> DeployResult:
        """Under the flow lock: drain *previous*'s job (the record read under the lock), launch *request*,
        gate it, record it; a job that fails its gate is stopped and *previous* started again."""
        name = compiled.flow.name
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
        return ProgressGate.for_flow(
            compiled, offsets, self.options.progress_window_s, timeout_s=self.options.connect_timeout_s
        )

    def _wait_progress(self, gate: ProgressGate, job: LaunchedJob, log: Log) -> ProgressVerdict:
        """Run the progress gate on the healthy new *job*; ``ProgressGateFailed`` when no data moved."""
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
        """Stop a flow's job on purpose; health sensors will not restart it. ``None`` if never deployed
        (``lifecycle.undeploy``)."""
        return lifecycle.undeploy(self, flow_name, by)

    def restart(self, flow_name: str, by: str, log: Log = print) -> Deployment:
        """Start the recorded deployment again, as it was: its own config snapshot, not the live files
        (the health sensor's restarts; ``lifecycle.restart``)."""
        return lifecycle.restart(self, flow_name, by, log)

    def roll_back_to_previous(
        self, flow_name: str, reason: str, by: str = "regression watch", log: Log = print
    ) -> Deployment:
        """Stop the current deployment's job and start the deployment it replaced again, as recorded
        (``lifecycle.roll_back_to_previous``); the restored record carries ``extra["rolled_back_from"]``.

        Example:
            >>> deployer.roll_back_to_previous("orders", "Kafka lag STALL: ...")  # doctest: +SKIP
        """
        return lifecycle.roll_back_to_previous(self, flow_name, reason, by, log)

    def check_restart(self, current: Deployment, log: Log = print) -> None:
        """What a restart checks before it launches (``lifecycle.check_restart``)."""
        lifecycle.check_restart(self, current, log)

    def is_running(self, deployment: Deployment | None) -> bool:
        """Whether *deployment* is recorded as deployed (not stopped on purpose) and its job runs."""
        return deployment is not None and not deployment.stopped_on_purpose and self._alive(deployment)

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


def _described(record: Deployment | None) -> str:
    """A record in a few words, for ``RecordChanged``."""
    if record is None:
        return "no deployment"
    state = f"stopped by {record.stopped_by}" if record.stopped_on_purpose else record.job.processes_text
    return (
        f"plan {record.plan_hash} deployed by run {record.run_id or '?'}, {state}, restarts {record.restarts}"
    )


def deployment_extra(compiled: CompiledFlow, offsets: OffsetPlan | None) -> dict[str, object]:
    """What a deployment records beyond its job: the source, the struct written to each topic
    (``contracts``), and where the job started reading."""
    extra: dict[str, object] = {"source": source_summary(compiled), **contracts_extra(compiled.flow)}
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
