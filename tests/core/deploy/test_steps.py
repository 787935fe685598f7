"""The pre-launch steps (``loom_dagster.core.deploy.steps``) one by one, their order, and the deploy that
runs them, without a broker: the ticks flow is compiled against an unreachable one, the checks that
would connect are replaced where a test needs them to pass, and jobs are started by a launcher that
starts nothing (``StubLauncher``) or by the recording launcher (``tests/support/recording_launcher.py``).
The real-broker deploys are ``tests/integration/test_deploy.py`` and its neighbours."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from loom_dagster import LoomFlowSpec
from loom_dagster.core.checks.fence import FenceStatus
from loom_dagster.core.checks.loom_checks import DeployChecksFailed, DeployChecksReport, DeployFinding
from loom_dagster.core.checks.offsets import OffsetPlan, TopicReset
from loom_dagster.core.checks.topics import TopicsMissing, TopicsReport
from loom_dagster.core.deploy import steps
from loom_dagster.core.deploy.deployer import DeployOptions, FlowDeployer, RecordChanged
from loom_dagster.core.deploy.launch_records import (
    JobProcess,
    JobReport,
    JobState,
    LaunchedJob,
    LaunchRequest,
)
from loom_dagster.core.deploy.steps import (
    PRE_LAUNCH_STEPS,
    RESTART_CHECKS,
    ConfigSnapshot,
    DeployChecks,
    DeployContext,
    DeployStep,
    Fence,
    JobView,
    OffsetResetRefused,
    Offsets,
    Preflight,
    ReadRecord,
    SinkTables,
    SinkTablesError,
    StepOutcome,
    Topics,
    run_steps,
)
from loom_dagster.core.deploy.store import Deployment, DeploymentStore
from loom_dagster.core.errors import DeploymentError
from loom_dagster.core.flows.catalog import CompiledFlow, compile_spec
from loom_dagster.core.launchers.base import Launcher
from loom_dagster.core.sinks.table_report import SinkTablesReport, TableProblem
from tests.conftest import ticks_config
from tests.support.recording_launcher import RecordingLauncher, calls

FLOW = "tests.flows.delta_only:ticks_flow"
ORDER = [
    "deploy_checks",
    "job_view",
    "contracts",
    "sink_tables",
    "topics",
    "record",
    "offsets",
    "fence",
    "config_snapshot",
    "preflight",
]


class StubLauncher(Launcher):
    """Starts nothing: a launched job is a record that reports healthy until stopped. Keeps its calls."""

    name = "stub"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.running: set[int] = set()
        self.launched = 0

    def launch(self, request: LaunchRequest, log_dir: str) -> LaunchedJob:
        self.calls.append("launch")
        self.launched += 1
        self.running.add(self.launched)
        process = JobProcess(pid=4_000_000 + self.launched, start_ticks=self.launched)
        return LaunchedJob(
            request.flow_name,
            self.name,
            socket.gethostname(),
            (process,),
            f"{log_dir}/job.log",
            time.time(),
            request,
        )

    def report(self, job: LaunchedJob) -> JobReport:
        self.calls.append("report")
        if job.processes[0].start_ticks in self.running:
            return JobReport(JobState.HEALTHY, "connected", 1)
        return JobReport(JobState.DEAD, "stopped", 0)

    def stop(self, job: LaunchedJob, timeout_s: float) -> float:
        self.calls.append("stop")
        self.running.discard(job.processes[0].start_ticks)
        return 0.01

    def preflight(self, request: LaunchRequest, timeout_s: float) -> str | None:
        self.calls.append("preflight")
        return "stub preflight"


class CountingStore(DeploymentStore):
    """A local store that counts the reads of a flow's record (a ConfigMap GET each on Kubernetes)."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        self.reads = 0

    def current(self, flow_name: str) -> Deployment | None:
        self.reads += 1
        return super().current(flow_name)


@dataclass
class Flow:
    spec: LoomFlowSpec
    compiled: CompiledFlow
    config: Path


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Flow:
    """The ticks flow (Kafka -> Delta + topics) compiled against a broker nobody listens on."""
    root = tmp_path_factory.mktemp("ticks")
    config = ticks_config(root / "cfg", brokers="127.0.0.1:9", prefix="t", delta_uri=str(root / "delta"))
    spec = LoomFlowSpec(FLOW, config=str(config), environment="test")
    return Flow(spec, compile_spec(spec), config)


@pytest.fixture()
def launcher() -> StubLauncher:
    return StubLauncher()


@pytest.fixture()
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "state")


@pytest.fixture()
def deployer(launcher: StubLauncher, store: CountingStore) -> FlowDeployer:
    return FlowDeployer(launcher, store, DeployOptions(connect_timeout_s=1.0, health_timeout_s=5.0))


@pytest.fixture()
def connected(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """The checks that connect (topics, offsets, fence) answered as a healthy broker would; each call's
    arguments kept by check."""
    seen: dict[str, list[Any]] = {"topics": [], "offsets": [], "fence": []}

    def topics(compiled: CompiledFlow, *, timeout_s: float) -> TopicsReport:
        seen["topics"].append(compiled)
        return TopicsReport(checked=("t.ticks", "t.ticks.out", "t.ticks.dlq"))

    def offsets(compiled: CompiledFlow, previous_source: Any, *, timeout_s: float) -> OffsetPlan:
        seen["offsets"].append(previous_source)
        return OffsetPlan("t-ticks", "earliest", (), (), {"t.ticks": {0: 0}})

    def fence(compiled: CompiledFlow, current: Deployment | None, *, timeout_s: float) -> FenceStatus:
        seen["fence"].append(current)
        return FenceStatus("t-ticks")

    monkeypatch.setattr(steps, "check_topics", topics)
    monkeypatch.setattr(steps, "plan_offsets", offsets)
    monkeypatch.setattr(steps, "check_fence", fence)
    return seen


def context(deployer: FlowDeployer, flow: Flow, **kwargs: Any) -> tuple[DeployContext, list[str]]:
    """A context for *flow* whose log lines land in the returned list."""
    lines: list[str] = []
    ctx = DeployContext(
        deployer, flow.spec, flow.compiled, declared=flow.compiled.flow, log=lines.append, **kwargs
    )
    return ctx, lines


def deploy(deployer: FlowDeployer, flow: Flow, lines: list[str] | None = None, **kwargs: Any) -> Any:
    log = lines.append if lines is not None else (lambda _: None)
    return deployer.deploy(flow.spec, flow.compiled.flow, run_id="r1", log=log, **kwargs)


# -- the list ---------------------------------------------------------------------------------------------


def test_the_pre_launch_steps_run_in_one_declared_order() -> None:
    assert [step.name for step in PRE_LAUNCH_STEPS] == ORDER
    assert [step.name for step in RESTART_CHECKS] == ["sink_tables", "topics", "fence"]
    assert FlowDeployer(StubLauncher(), DeploymentStore("/nonexistent")).steps == PRE_LAUNCH_STEPS
    # what each step fills is a field of the context; only loom's deploy checks run without a launch
    fields = set(DeployContext.__dataclass_fields__)
    assert all(step.adds and set(step.adds) <= fields for step in PRE_LAUNCH_STEPS)
    assert [step.name for step in PRE_LAUNCH_STEPS if not step.launch_only] == ["deploy_checks"]


# -- each step alone --------------------------------------------------------------------------------------


def test_deploy_checks_report_first_then_block(
    deployer: FlowDeployer, flow: Flow, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports: list[DeployChecksReport] = []
    ctx, lines = context(deployer, flow, on_checks=reports.append)
    outcome = DeployChecks().run(ctx)
    assert ctx.checks is not None and reports == [ctx.checks] and not ctx.checks.blocks
    assert "0 error(s)" in outcome.note and "loom deploy checks" in lines[0]

    finding = DeployFinding("loom.x", "error", "unsafe", "fix it")
    blocking = DeployChecksReport("production", enforced=True, findings=(finding,))
    monkeypatch.setattr(steps, "run_flow_deploy_checks", lambda spec, environment: blocking)
    ctx, _ = context(deployer, flow, on_checks=reports.append)
    with pytest.raises(DeployChecksFailed):
        DeployChecks().run(ctx)
    assert reports[-1] is blocking and ctx.checks is None  # reported before it blocks


def test_job_view_compiles_again_only_for_a_job_only_env(deployer: FlowDeployer, flow: Flow) -> None:
    ctx, lines = context(deployer, flow)
    assert JobView().run(ctx).skipped and ctx.job_view is flow.compiled and ctx.view is flow.compiled
    assert lines == []

    spec = LoomFlowSpec(FLOW, config=str(flow.config), environment="test", env={"LOOM_TEST_VERSION": "v2"})
    compiled = compile_spec(spec)
    ctx = DeployContext(deployer, spec, compiled, log=lines.append)
    assert not JobView().run(ctx).skipped
    assert ctx.job_view is not None and ctx.job_view is not compiled and ctx.view is ctx.job_view
    assert lines == [
        "the job's environment sets LOOM_TEST_VERSION: the pre-launch checks connect with the config as "
        "the job loads it"
    ]


def test_sink_tables_pass_a_delta_table_loom_creates_and_refuse_a_problem(
    deployer: FlowDeployer, flow: Flow, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx, lines = context(deployer, flow)
    SinkTables().run(ctx)
    assert ctx.tables is not None and ctx.tables.ok and ctx.tables.pending
    assert lines[0].startswith("sink tables ok: ticks/ticks_delta")

    problem = TableProblem("ticks_delta", None, "delta", "ticks", "unreachable", "no such bucket", None)
    monkeypatch.setattr(steps, "check_sink_tables", lambda *a, **k: SinkTablesReport(problems=(problem,)))
    ctx, _ = context(deployer, flow)
    with pytest.raises(SinkTablesError) as refused:
        SinkTables().run(ctx)
    assert refused.value.report.problems == (problem,) and ctx.tables is None


def test_topics_unreachable_broker_is_refused_within_the_connect_timeout(
    deployer: FlowDeployer, flow: Flow
) -> None:
    ctx, _ = context(deployer, flow)
    started = time.monotonic()
    with pytest.raises(TopicsMissing, match="cannot reach the Kafka cluster 127.0.0.1:9 within 1s"):
        Topics().run(ctx)
    assert time.monotonic() - started < 10 and ctx.topics is None


def test_topics_log_what_was_checked(
    deployer: FlowDeployer, flow: Flow, connected: dict[str, list[Any]]
) -> None:
    ctx, lines = context(deployer, flow)
    Topics().run(ctx)
    assert ctx.topics is not None and lines == ["Kafka topics ok: t.ticks, t.ticks.out, t.ticks.dlq"]
    assert connected["topics"] == [flow.compiled]


def test_record_is_read_once_into_the_context(
    deployer: FlowDeployer, store: CountingStore, flow: Flow, connected: dict[str, list[Any]]
) -> None:
    ctx, _ = context(deployer, flow)
    assert ReadRecord().run(ctx).note == "never deployed"
    assert ctx.record_read and ctx.current is None and store.reads == 1

    record = deploy(deployer, flow).deployment
    ctx, _ = context(deployer, flow)
    reads = store.reads
    outcome = ReadRecord().run(ctx)
    assert ctx.current == record and store.reads == reads + 1
    assert outcome.note == f"plan {record.plan_hash}, {record.job.processes_text}"


def test_offsets_judge_the_recorded_source_and_refuse_an_unaccepted_reset(
    deployer: FlowDeployer, flow: Flow, connected: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    record = deploy(deployer, flow).deployment
    ctx, _ = context(deployer, flow, current=record)
    Offsets().run(ctx)
    assert ctx.offsets is not None and connected["offsets"] == [None, record.extra["source"]]

    reset = TopicReset(
        "t.ticks", (0,), "earliest", 120, "re-read", caused_by="consumer group changed: a -> b"
    )
    plan = OffsetPlan("b", "earliest", ("consumer group changed: a -> b",), (reset,), {"t.ticks": {0: 0}})
    monkeypatch.setattr(steps, "plan_offsets", lambda *a, **k: plan)
    ctx, _ = context(deployer, flow, current=record)
    with pytest.raises(OffsetResetRefused) as refused:
        Offsets().run(ctx)
    assert refused.value.plan is plan and ctx.offsets is None
    ctx, lines = context(deployer, flow, current=record, accept_offset_reset=True)
    assert Offsets().run(ctx).note == "reset accepted: 120 message(s)"
    assert ctx.offsets is plan and lines[0].startswith("offset reset accepted by the run config:")


def test_fence_judges_the_record_in_the_context(
    deployer: FlowDeployer, flow: Flow, connected: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    record = deploy(deployer, flow).deployment
    ctx, lines = context(deployer, flow, current=record)
    Fence().run(ctx)
    assert connected["fence"][-1] is record and ctx.fence == FenceStatus("t-ticks") and lines == []

    noted = FenceStatus("t-ticks", note="dead job(s) still in the fence group")
    monkeypatch.setattr(steps, "check_fence", lambda *a, **k: noted)
    ctx, lines = context(deployer, flow, current=record)
    Fence().run(ctx)
    assert lines == ["dead job(s) still in the fence group"]


def test_config_snapshot_copies_the_checked_config_and_refuses_an_edited_one(
    deployer: FlowDeployer, store: CountingStore, flow: Flow, tmp_path: Path
) -> None:
    ctx, _ = context(deployer, flow, run_id="r9")
    ConfigSnapshot().run(ctx)
    request = ctx.launch_request()
    assert request.run_id == "r9" and request.config_hash == flow.compiled.flow.config_hash
    assert all(Path(f).is_relative_to(store.flow_dir("ticks")) for f in request.config_files)
    assert Path(request.config_files[0]).read_text() == (flow.config / "base.yaml").read_text()

    edited = tmp_path / "edited"
    (edited / "base.yaml").parent.mkdir()
    (edited / "base.yaml").write_text((flow.config / "base.yaml").read_text().replace("t-ticks", "other"))
    spec = LoomFlowSpec(FLOW, config=str(edited), environment="test")
    ctx = DeployContext(deployer, spec, flow.compiled)  # compiled from the config before the edit
    with pytest.raises(DeploymentError, match="changed while it was being deployed"):
        ConfigSnapshot().run(ctx)
    assert ctx.request is None


def test_preflight_only_protects_a_running_job_or_a_cluster(
    launcher: StubLauncher, store: CountingStore, flow: Flow, connected: dict[str, list[Any]]
) -> None:
    deployer = FlowDeployer(launcher, store, DeployOptions(preflight=False))
    record = deploy(deployer, flow).deployment
    ctx, _ = context(deployer, flow, current=record)
    assert Preflight().run(ctx) == StepOutcome("off (DeployOptions.preflight)", skipped=True)

    deployer = FlowDeployer(launcher, store)
    ctx, _ = context(deployer, flow, current=None)
    assert Preflight().run(ctx).skipped and "preflight" not in launcher.calls  # nothing to protect
    launcher.calls.clear()
    ctx, lines = context(deployer, flow, current=record)
    ConfigSnapshot().run(ctx)
    assert Preflight().run(ctx).note == "stub preflight"
    assert "preflight" in launcher.calls and lines == ["preflight passed: stub preflight"]

    launcher.calls.clear()
    cluster = LoomFlowSpec(FLOW, config=str(flow.config), environment="test", processes=2)
    ctx = DeployContext(deployer, cluster, flow.compiled)
    ConfigSnapshot().run(ctx)
    Preflight().run(ctx)
    assert launcher.calls == ["preflight"]  # no record to ask about: a cluster shape is reason enough


# -- the deploy that runs them ----------------------------------------------------------------------------


def test_a_failing_step_stops_the_deploy_before_launch_and_names_itself(
    store: CountingStore, flow: Flow, tmp_path: Path
) -> None:
    """The real steps against an unreachable broker, through the recording launcher: ``topics`` fails,
    nothing after it runs (not even the record read), the launcher is never asked anything."""
    journal = tmp_path / "calls.jsonl"
    deployer = FlowDeployer(RecordingLauncher(str(journal)), store, DeployOptions(connect_timeout_s=1.0))
    lines: list[str] = []
    with pytest.raises(TopicsMissing) as failed:
        deploy(deployer, flow, lines)
    assert "(pre-launch step 'topics' failed: nothing was stopped or started)" in failed.value.__notes__
    assert str(failed.value).startswith(
        "flow 'ticks': 1 Kafka problem(s) before launch"
    )  # the error as before
    assert calls(journal) == [] and store.reads == 0 and store.current("ticks") is None
    assert not store.lock_held("ticks")
    assert not any(line.startswith("pre-launch steps passed") for line in lines)


def test_run_steps_records_each_step_and_stops_at_the_first_failure(
    deployer: FlowDeployer, flow: Flow
) -> None:
    ran: list[str] = []

    class Passes(DeployStep):
        name = "passes"

        def run(self, ctx: DeployContext) -> StepOutcome:
            ran.append(self.name)
            return StepOutcome("fine")

    class Fails(DeployStep):
        name = "fails"

        def run(self, ctx: DeployContext) -> StepOutcome:
            ran.append(self.name)
            raise DeploymentError("refused")

    ctx, _ = context(deployer, flow)
    with pytest.raises(DeploymentError) as failed:
        run_steps([Passes(), Fails(), Passes()], ctx)
    assert str(failed.value) == "refused"  # the error as raised; the step is named in a note
    assert ran == ["passes", "fails"]
    assert [(r.name, r.note, r.failed) for r in ctx.records] == [
        ("passes", "fine", None),
        ("fails", "", "DeploymentError"),
    ]
    assert failed.value.__notes__ == ["(pre-launch step 'fails' failed: nothing was stopped or started)"]
    assert ctx.records[1].describe().startswith("fails ") and ctx.records[1].describe().endswith(
        " failed (DeploymentError)"
    )


def test_a_deploy_runs_every_step_in_order_and_reads_the_record_twice(
    deployer: FlowDeployer,
    launcher: StubLauncher,
    store: CountingStore,
    flow: Flow,
    connected: dict[str, list[Any]],
) -> None:
    """First deploy then redeploy: one read before the lock (the ``record`` step), one under it (today's
    code read it four times: offsets, fence, preflight's running check, the drain)."""
    lines: list[str] = []
    first = deploy(deployer, flow, lines)
    assert [r.name for r in first.steps] == ORDER and store.reads == 2
    assert [r.name for r in first.steps if r.skipped] == ["job_view", "contracts", "preflight"]
    assert first.tables is not None and first.offsets is not None and first.checks is not None
    assert first.deployment is not None and first.previous is None and launcher.calls.count("launch") == 1
    (summary,) = [line for line in lines if line.startswith("pre-launch steps passed in ")]
    assert "deploy_checks " in summary and "preflight skipped" in summary

    launcher.calls.clear()
    store.reads = 0
    second = deploy(deployer, flow)
    assert store.reads == 2 and second.previous == first.deployment
    assert not any(r.skipped for r in second.steps if r.name == "preflight")
    assert launcher.calls.index("preflight") < launcher.calls.index("stop") < launcher.calls.index("launch")
    assert connected["fence"][-1] == first.deployment  # the fence allowed the recorded job
    assert store.current("ticks") == second.deployment


def test_a_deploy_that_launches_nothing_runs_the_deploy_checks_only(
    launcher: StubLauncher, store: CountingStore, flow: Flow
) -> None:
    deployer = FlowDeployer(launcher, store, DeployOptions(launch=False))
    result = deploy(deployer, flow)
    assert [r.name for r in result.steps] == ["deploy_checks"] and result.checks is not None
    assert result.deployment is None and store.reads == 0 and launcher.calls == []


def test_a_record_changed_between_the_checks_and_the_lock_is_refused(
    launcher: StubLauncher, store: CountingStore, flow: Flow, connected: dict[str, list[Any]]
) -> None:
    """Another deploy finishing after the ``record`` step (here: a step that writes a record, as that
    deploy would under the lock) is seen under the lock: nothing is drained or launched."""
    deployer = FlowDeployer(launcher, store)
    first = deploy(deployer, flow).deployment
    assert first is not None

    class AnotherDeployFinishes(DeployStep):
        name = "meanwhile"

        def run(self, ctx: DeployContext) -> StepOutcome:
            job = launcher.launch(first.job.request, str(store.flow_dir("ticks")))
            store.save(msgspec.structs.replace(first, job=job, run_id="other", deployed_at=time.time()))
            return StepOutcome()

    racing = FlowDeployer(launcher, store, steps=[*PRE_LAUNCH_STEPS, AnotherDeployFinishes()])
    launcher.calls.clear()
    with pytest.raises(RecordChanged, match="changed while its pre-launch checks ran") as changed:
        deploy(racing, flow)
    assert "deployed by run other" in str(changed.value) and "nothing was stopped or started" in str(
        changed.value
    )
    assert "stop" not in launcher.calls and launcher.calls.count("launch") == 1  # only the other deploy's
    assert store.current("ticks").run_id == "other"  # type: ignore[union-attr]


# -- restart, rollback, undeploy (lifecycle) --------------------------------------------------------------


def test_restart_rollback_and_undeploy_go_through_the_deployer(
    deployer: FlowDeployer,
    launcher: StubLauncher,
    store: CountingStore,
    flow: Flow,
    connected: dict[str, list[Any]],
) -> None:
    first = deploy(deployer, flow).deployment
    second = deploy(deployer, flow).deployment
    assert first is not None and second is not None

    connected["fence"].clear()
    restarted = deployer.restart("ticks", by="test", log=lambda _: None)
    assert restarted.restarts == 1 and restarted.job != second.job
    assert connected["fence"] == [second] and len(connected["topics"]) == 3  # RESTART_CHECKS ran

    restored = deployer.roll_back_to_previous("ticks", "test: a regression", by="test", log=lambda _: None)
    assert restored.deployed_at == first.deployed_at and restored.extra["rolled_back_from"]
    with pytest.raises(DeploymentError, match="already rolled back"):
        deployer.roll_back_to_previous("ticks", "again", by="test")

    stopped = deployer.undeploy("ticks", by="test")
    assert stopped is not None and stopped.stopped_on_purpose and launcher.running == set()
    with pytest.raises(DeploymentError, match="stopped on purpose"):
        deployer.restart("ticks", by="test")
    assert deployer.undeploy("never", by="test") is None


def test_a_restart_check_failure_names_its_step_and_leaves_the_job(
    deployer: FlowDeployer,
    launcher: StubLauncher,
    flow: Flow,
    connected: dict[str, list[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deploy(deployer, flow)

    def unreachable(*args: Any, **kwargs: Any) -> TopicsReport:
        raise TopicsMissing("flow 'ticks': 1 Kafka problem(s)")

    monkeypatch.setattr(steps, "check_topics", unreachable)
    launcher.calls.clear()
    with pytest.raises(TopicsMissing) as failed:
        deployer.restart("ticks", by="test")
    assert failed.value.__notes__ == ["(pre-launch step 'topics' failed: nothing was stopped or started)"]
    assert "stop" not in launcher.calls and "launch" not in launcher.calls
