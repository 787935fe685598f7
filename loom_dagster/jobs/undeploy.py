"""Operational jobs: ``loom_undeploy`` stops flows on purpose from the UI."""

from collections.abc import Sequence

import dagster as dg

from loom_dagster.core.errors import DeploymentError
from loom_dagster.resource import LoomDeployResource

UNDEPLOY_JOB = "loom_undeploy"


class UndeployConfig(dg.Config):
    """Which flows to stop (by flow name)."""

    flows: list[str]


def build_undeploy_job(known_flows: Sequence[str]) -> dg.JobDefinition:
    """A job that drains and stops the named flows' jobs and marks them stopped on purpose."""
    known = set(known_flows)

    @dg.op(name="undeploy_loom_flows", description="Drain and stop the named loom flows' jobs.")
    def _undeploy(context: dg.OpExecutionContext, config: UndeployConfig, loom: LoomDeployResource) -> None:
        unknown = sorted(set(config.flows) - known)
        if unknown:
            raise DeploymentError(
                f"unknown flow(s) {', '.join(unknown)}; flows in this code location: {', '.join(sorted(known))}"
            )
        deployer = loom.deployer()
        for name in config.flows:
            stopped = deployer.undeploy(name, by=f"run {context.run.run_id}")
            if stopped is None:
                context.log.info(f"flow {name!r} was never deployed here; nothing to stop")
                continue
            context.log.info(f"flow {name!r} stopped ({stopped.job.processes_text})")

    @dg.job(
        name=UNDEPLOY_JOB, description="Stop (undeploy) loom flows; the health sensor will not restart them."
    )
    def _job() -> None:
        _undeploy()

    return _job
