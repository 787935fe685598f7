"""The pre-launch steps of a deploy: one ordered list (``PRE_LAUNCH_STEPS``), one interface (``DeployStep``).

A deploy compiles the flow, then runs these steps in order, then (under the flow's lock) drains the running
job and launches the new one (``loom_dagster.core.deploy.deployer``). Every step is a check or prepares the
launch; none touches the running job, so a step that raises stops the deploy with nothing stopped or
started. In order (each fills the ``DeployContext`` field in brackets):

1. ``deploy_checks`` [checks]: loom's deploy checks (``DeployChecksFailed``); the asset's ``deploy_checks``
   check. The only step a deploy that launches nothing runs.
2. ``job_view`` [job_view]: the flow compiled as its job will load it when the spec's ``env=`` reaches the
   job only (lineage checked too); what the checks below connect with.
3. ``contracts`` [contracts]: the struct the flow writes to each topic against every flow of the code
   location reading it, and the struct it reads each topic with against every flow here writing it
   (``loom_dagster.core.contracts``); a breaking difference is refused unless accepted
   (``ContractBroken``); metadata ``loom/contracts``, the record's ``extra["contracts"]``. Connects to
   nothing. Flows of other code locations are not seen.
4. ``sink_tables`` [tables]: every storage sink's table on the real system (``SinkTablesError``);
   metadata ``loom/sink_tables``.
5. ``topics`` [topics]: the source, output and dead-letter topics exist (``TopicsMissing``).
6. ``record`` [current]: the flow's deployment record, read once (on Kubernetes one ConfigMap GET) for
   the steps that judge it; the deployer reads it once more under the lock and refuses the deploy if it
   changed meanwhile (``RecordChanged``). The contracts report gets what the written structs changed
   since the recorded deployment.
7. ``offsets`` [offsets]: where the new job starts reading, against the recorded source; an unaccepted
   reset of a changed group or topic is refused (``OffsetResetRefused``); metadata ``loom/offsets``, the
   record's ``start_offsets``.
8. ``fence`` [fence]: no job but the recorded one consumes the consumer group (``FenceHeld``).
9. ``config_snapshot`` [request]: the deployment's own copy of its config files, which must load to the
   config just checked (``DeploymentError``); the request that is launched.
10. ``preflight`` [preflight]: the new version imports and compiles where it will run (the launcher's
    error), when the recorded job runs (it needs protecting) or the flow runs several processes.

Each step's seconds and one-line outcome are kept uniformly (``StepRecord``, in ``DeployResult.steps``);
a failing step adds a note naming itself to the error it raises.

A restart runs ``RESTART_CHECKS`` (tables, topics, fence) on its recorded config the same way.

The check modules imported here load no client library at import (confluent_kafka, SQLAlchemy,
clickhouse-connect and deltalake load when a check connects), so they are imported at the top.
"""

from __future__ import annotations

import abc
import importlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import msgspec

from loom_dagster.core.checks.fence import FenceStatus, check_fence
from loom_dagster.core.checks.loom_checks import (
    DeployChecksFailed,
    DeployChecksReport,
    run_flow_deploy_checks,
)
from loom_dagster.core.checks.offsets import OffsetPlan, plan_offsets
from loom_dagster.core.checks.tables import check_sink_tables
from loom_dagster.core.checks.topics import TopicsReport, check_topics
from loom_dagster.core.contracts.chain import ContractBroken, ContractsReport, flow_contracts, writer_changes
from loom_dagster.core.deploy.launch_records import LaunchRequest
from loom_dagster.core.deploy.store import ConfigFile, Deployment, read_config_files, scratch_copy
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.flows.catalog import CompiledFlow, compile_spec
from loom_dagster.core.flows.describe import config_hash
from loom_dagster.core.flows.lineage_check import check_lineage
from loom_dagster.core.flows.loading import load_config
from loom_dagster.core.flows.records import LoomFlow
from loom_dagster.core.flows.spec import LoomFlowSpec
from loom_dagster.core.sinks.table_report import SinkTablesReport

if TYPE_CHECKING:
    # Only a type here: the deployer imports this module to run the steps (no import cycle).
    from loom_dagster.core.deploy.deployer import FlowDeployer

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


class StepOutcome(msgspec.Struct, frozen=True):
    """What a step reports beyond the context fields it fills: one line, and whether it did nothing."""

    note: str = ""
    skipped: bool = False


class StepRecord(msgspec.Struct, frozen=True):
    """One step as it ran: its name, seconds, outcome line; ``failed`` is the error class it raised."""

    name: str
    seconds: float
    note: str = ""
    skipped: bool = False
    failed: str | None = None

    def describe(self) -> str:
        """``sink_tables 0.31s``, ``preflight skipped``, ``fence 0.02s failed (FenceHeld)``."""
        if self.skipped:
            return f"{self.name} skipped"
        text = f"{self.name} {self.seconds:.2f}s"
        return f"{text} failed ({self.failed})" if self.failed else text


@dataclass
class DeployContext:
    """What the steps of one deploy read (the deployer, the spec, its compiled flow, the run's choices)
    and what they found, filled in order (``None`` until then); a step tested alone gets a context made
    by hand."""

    deployer: FlowDeployer
    spec: LoomFlowSpec
    compiled: CompiledFlow
    declared: LoomFlow | None = None
    """The flow as the code location declared it (the lineage check); ``compiled.flow`` when ``None``."""
    current: Deployment | None = None
    """The flow's deployment record as the ``record`` step read it (``None``: never deployed)."""
    record_read: bool = False
    """Whether ``current`` was read (by the ``record`` step, or given): the deployer then checks under
    the lock that the record is still the same."""
    sink_keys: dict[str, str] | None = None
    environment: str | None = None
    run_id: str | None = None
    accept_offset_reset: bool = False
    accept_contract_change: bool = False
    location_flows: tuple[LoomFlow, ...] = ()
    """The flows of the deployed flow's code location (their records as loaded), for the contracts step;
    the flow itself among them is replaced by the version being deployed."""
    log: Log = print
    on_checks: OnChecks | None = None

    checks: DeployChecksReport | None = None
    job_view: CompiledFlow | None = None
    contracts: ContractsReport | None = None
    tables: SinkTablesReport | None = None
    topics: TopicsReport | None = None
    offsets: OffsetPlan | None = None
    fence: FenceStatus | None = None
    request: LaunchRequest | None = None
    preflight: str | None = None
    records: list[StepRecord] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The flow's name."""
        return self.compiled.flow.name

    @property
    def view(self) -> CompiledFlow:
        """The flow as its job will compile it (``job_view`` once that step ran, else ``compiled``): what
        the checks that connect (tables, topics, offsets, fence) and the progress gate read."""
        return self.job_view or self.compiled

    def launch_request(self) -> LaunchRequest:
        """The request the deploy launches (made by ``config_snapshot``)."""
        if self.request is None:
            raise DeploymentError(
                f"no launch request for flow {self.name!r}: the step list has no config_snapshot step"
            )
        return self.request


class DeployStep(abc.ABC):
    """One pre-launch step: ``run`` fills the context fields named in ``adds`` and returns its outcome,
    or raises (a ``DeploymentError`` naming the flow and what to do) to stop the deploy."""

    name: ClassVar[str]
    adds: ClassVar[tuple[str, ...]] = ()
    """The ``DeployContext`` fields this step fills."""
    launch_only: ClassVar[bool] = True
    """Skipped by a deploy that launches nothing (``DeployOptions.launch=False``)."""

    @abc.abstractmethod
    def run(self, ctx: DeployContext) -> StepOutcome:
        """Run the step on *ctx*."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DeployChecks(DeployStep):
    """loom's deploy checks for the flow's environment; ``DeployChecksFailed`` when they block.
    ``on_checks`` receives the report as soon as it exists (also when it blocks)."""

    name = "deploy_checks"
    adds = ("checks",)
    launch_only = False

    def run(self, ctx: DeployContext) -> StepOutcome:
        report = run_flow_deploy_checks(ctx.compiled.spec, ctx.compiled.flow.environment)
        if ctx.on_checks is not None:
            ctx.on_checks(report)
        if report.blocks:
            raise DeployChecksFailed(ctx.name, report)
        ctx.log(report.describe(ctx.name))
        ctx.checks = report
        return StepOutcome(report.summary())


class JobView(DeployStep):
    """The flow as its job will compile it: *compiled* itself, unless the spec's ``env=`` reaches the
    job's environment only; then compiled again with the config loaded in that environment, and its
    lineage checked too."""

    name = "job_view"
    adds = ("job_view",)

    def run(self, ctx: DeployContext) -> StepOutcome:
        spec = ctx.compiled.spec
        if not spec.env:
            ctx.job_view = ctx.compiled
            return StepOutcome("no env= for the job only: the checks use the compiled flow", skipped=True)
        view = compile_spec(spec, ctx.environment, as_job=True)
        check_lineage(ctx.declared or ctx.compiled.flow, view.flow, ctx.sink_keys)
        ctx.log(
            f"the job's environment sets {', '.join(sorted(spec.env))}: the pre-launch checks connect "
            "with the config as the job loads it"
        )
        ctx.job_view = view
        return StepOutcome(f"compiled as the job loads it ({', '.join(sorted(spec.env))})")


class Contracts(DeployStep):
    """The flow's payload contracts with the other flows of its code location: a reader that could not
    decode what the new version writes (or a writer whose struct the new version cannot read) refuses
    the deploy (``ContractBroken``) unless ``accept_contract_change``; compatible changes are listed.
    What the written structs changed since the deployed version is added by the ``record`` step."""

    name = "contracts"
    adds = ("contracts",)

    def run(self, ctx: DeployContext) -> StepOutcome:
        flow = ctx.compiled.flow
        previous = ctx.current.extra if ctx.current is not None else None
        report = flow_contracts(flow, ctx.location_flows, previous, accepted=ctx.accept_contract_change)
        ctx.contracts = report
        if report.blocks:
            raise ContractBroken(report)
        if report.pairs or report.changes:
            ctx.log(report.describe())
        if report.broken:
            ctx.log(f"contract change accepted by the run config: {report.summary()}")
        return StepOutcome(report.summary(), skipped=not (report.pairs or report.changes))


class SinkTables(DeployStep):
    """Every storage sink's table checked on the real system; ``SinkTablesError`` on a problem."""

    name = "sink_tables"
    adds = ("tables",)

    def run(self, ctx: DeployContext) -> StepOutcome:
        options = ctx.deployer.options
        report = check_sink_tables(
            ctx.view,
            sink_keys=ctx.sink_keys,
            create_missing=options.create_missing_tables,
            timeout_s=options.connect_timeout_s,
        )
        if not report.ok:
            raise SinkTablesError(ctx.name, report)
        if report.created:
            ctx.log(f"created missing sink tables: {', '.join(report.created)}")
        if report.checked or report.pending:
            ctx.log(f"sink tables ok: {', '.join([*report.checked, *report.pending])}")
        ctx.tables = report
        counted = len(report.checked) + len(report.pending)
        return StepOutcome(f"{counted} table(s) ok, {len(report.created)} created", skipped=not counted)


class Topics(DeployStep):
    """Every source, output and dead-letter topic exists (or the broker creates it on first write)."""

    name = "topics"
    adds = ("topics",)

    def run(self, ctx: DeployContext) -> StepOutcome:
        report = check_topics(ctx.view, timeout_s=ctx.deployer.options.connect_timeout_s)
        if report.checked:
            ctx.log(f"Kafka topics ok: {', '.join(report.checked)}")
        if report.auto_created:
            ctx.log(f"created by the broker on first write: {', '.join(report.auto_created)}")
        ctx.topics = report
        return StepOutcome(
            f"{len(report.checked)} topic(s) ok, {len(report.auto_created)} created on first write",
            skipped=not (report.checked or report.auto_created),
        )


class ReadRecord(DeployStep):
    """The flow's deployment record, read once for the steps that judge it (offsets, fence, preflight)."""

    name = "record"
    adds = ("current",)

    def run(self, ctx: DeployContext) -> StepOutcome:
        ctx.current = ctx.deployer.store.current(ctx.name)
        ctx.record_read = True
        current = ctx.current
        add_contract_changes(ctx)
        if current is None:
            return StepOutcome("never deployed")
        state = "stopped on purpose" if current.stopped_on_purpose else current.job.processes_text
        return StepOutcome(f"plan {current.plan_hash}, {state}")


class Offsets(DeployStep):
    """Where the new job starts on its topics, against the recorded deployment's source; refuse an
    unaccepted reset of a changed group/topic (``OffsetResetRefused``)."""

    name = "offsets"
    adds = ("offsets",)

    def run(self, ctx: DeployContext) -> StepOutcome:
        previous = ctx.current
        previous_source = previous.extra.get("source") if previous is not None else None
        plan = plan_offsets(ctx.view, previous_source, timeout_s=ctx.deployer.options.connect_timeout_s)
        if plan is not None and plan.requires_acceptance and not ctx.accept_offset_reset:
            raise OffsetResetRefused(ctx.name, plan)
        ctx.offsets = plan
        if plan is None:
            return StepOutcome("no Kafka source", skipped=True)
        if plan.requires_acceptance:
            ctx.log("offset reset accepted by the run config:\n" + plan.describe(ctx.name))
            return StepOutcome(f"reset accepted: {plan.reset_messages} message(s)")
        return StepOutcome(f"group {plan.group_id}: " + ("; ".join(plan.changes) or "unchanged"))


class Fence(DeployStep):
    """No job other than the recorded deployment's consumes the consumer group (``FenceHeld``)."""

    name = "fence"
    adds = ("fence",)

    def run(self, ctx: DeployContext) -> StepOutcome:
        fence = check_fence(ctx.view, ctx.current, timeout_s=ctx.deployer.options.connect_timeout_s)
        if fence.note:
            ctx.log(fence.note)
        ctx.fence = fence
        if not fence.applies:
            return StepOutcome(fence.note, skipped=True)
        return StepOutcome(f"{len(fence.members)} member(s) in {fence.group}")


class ConfigSnapshot(DeployStep):
    """The launch request, its config files replaced by this deployment's own copies.

    The copies are loaded again and must resolve to the config that was just compiled and checked: a
    file edited during the deploy fails it rather than launching something nobody checked.
    """

    name = "config_snapshot"
    adds = ("request",)

    def run(self, ctx: DeployContext) -> StepOutcome:
        compiled = ctx.compiled
        request = launch_request(ctx.spec, compiled, ctx.run_id)
        files = read_config_files(request.config_files)
        snapshot_hash = config_hash_of_contents(files, compiled.flow.environment)
        if snapshot_hash != compiled.flow.config_hash:
            raise DeploymentError(
                f"the config of flow {compiled.flow.name!r} changed while it was being deployed (config hash "
                f"{compiled.flow.config_hash} checked, {snapshot_hash} now); nothing was launched. "
                "Materialize again."
            )
        store = ctx.deployer.store
        copies = store.snapshot_config(compiled.flow.name, files, compiled.flow.config_hash[:12])
        ctx.request = msgspec.structs.replace(request, config_files=copies)
        return StepOutcome(f"{len(copies)} file(s), config hash {compiled.flow.config_hash[:12]}")


class Preflight(DeployStep):
    """The new version started where it will run, without touching the running job (the launcher's
    ``preflight``), when a running job needs protecting (without one, the health gate is the check) or
    the flow runs several processes (a cluster shape is only validated by loom when the dataflow is
    prepared)."""

    name = "preflight"
    adds = ("preflight",)

    def run(self, ctx: DeployContext) -> StepOutcome:
        deployer = ctx.deployer
        if not deployer.options.preflight:
            return StepOutcome("off (DeployOptions.preflight)", skipped=True)
        if not (deployer.is_running(ctx.current) or ctx.spec.processes > 1):
            return StepOutcome("no running job to protect, one process", skipped=True)
        launcher = deployer.launcher
        ran = launcher.preflight(ctx.launch_request(), deployer.options.preflight_timeout_s)
        ctx.log(f"preflight passed: {ran or f'launcher {launcher.name!r} found nothing wrong'}")
        ctx.preflight = ran
        return StepOutcome(ran or "passed")


def add_contract_changes(ctx: DeployContext) -> None:
    """Add to the contracts report what the written structs changed since the recorded deployment
    (``ctx.current``), and log it."""
    if ctx.contracts is None or ctx.current is None:
        return
    changes = writer_changes(ctx.compiled.flow, ctx.current.extra)
    if changes:
        ctx.contracts = msgspec.structs.replace(ctx.contracts, changes=changes)
        ctx.log(
            "payload struct changed since the deployed version:\n" + "\n".join(c.describe() for c in changes)
        )


PRE_LAUNCH_STEPS: tuple[DeployStep, ...] = (
    DeployChecks(),
    JobView(),
    Contracts(),
    SinkTables(),
    Topics(),
    ReadRecord(),
    Offsets(),
    Fence(),
    ConfigSnapshot(),
    Preflight(),
)
"""The pre-launch steps of a deploy, in the order they run: add or reorder a step here."""

RESTART_CHECKS: tuple[DeployStep, ...] = (SinkTables(), Topics(), Fence())
"""What a restart can check before it starts a recorded deployment again (its recorded config)."""


def run_steps(steps: Sequence[DeployStep], ctx: DeployContext) -> list[StepRecord]:
    """Run *steps* in order on *ctx*, keeping each one's ``StepRecord`` in ``ctx.records``. A step that
    raises stops the others; its error gets a note naming the step, and is raised as it was."""
    for step in steps:
        started = time.monotonic()
        try:
            outcome = step.run(ctx)
        except Exception as exc:
            ctx.records.append(StepRecord(step.name, time.monotonic() - started, failed=type(exc).__name__))
            exc.add_note(f"(pre-launch step {step.name!r} failed: nothing was stopped or started)")
            raise
        ctx.records.append(StepRecord(step.name, time.monotonic() - started, outcome.note, outcome.skipped))
    return ctx.records


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
    with scratch_copy(files) as paths:
        return config_hash(load_config(paths, environment))


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
