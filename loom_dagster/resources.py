"""``LoomDeployResource``: where deployments are recorded, how jobs are launched, and the timeouts."""

from __future__ import annotations

from typing import Literal

import dagster as dg
from pydantic import Field

from loom_dagster.deploy import DeployOptions, FlowDeployer
from loom_dagster.deployments import DeploymentStore
from loom_dagster.launchers.local import LocalProcessLauncher


class LoomDeployResource(dg.ConfigurableResource):
    """Deploys loom flows when their assets are materialized.

    Example:
        >>> resource = LoomDeployResource(state_dir="/tmp/loom-state", health_timeout_s=30)
        >>> resource.deployer().options.health_timeout_s
        30.0
    """

    state_dir: str | None = Field(
        default=None,
        description="Deployment records, job logs and status files. Default: $LOOM_DAGSTER_STATE_DIR, "
        "else $DAGSTER_HOME/loom, else ~/.loom-dagster.",
    )
    mode: Literal["deploy", "validate"] = Field(
        default="deploy",
        description="'deploy' launches the job; 'validate' only compiles, checks lineage and runs loom's deploy checks (for CI).",
    )
    health_timeout_s: float = Field(default=60.0, description="Seconds a new job has to connect.")
    drain_timeout_s: float = Field(default=30.0, description="Seconds a stopping job has to drain.")
    preflight: bool = Field(
        default=True, description="Import and compile the new version in a fresh process first."
    )
    python_executable: str | None = Field(
        default=None, description="Python that runs jobs (default: this one)."
    )
    heartbeat_timeout_s: float = Field(default=30.0, description="A job silent this long counts as hung.")
    create_missing_tables: bool = Field(
        default=False,
        description="Create a missing SQL/ClickHouse sink table from its payload struct before launch "
        "(otherwise a missing table fails the deploy, listing the DDL that creates it).",
    )
    connect_timeout_s: float = Field(
        default=10.0, description="Seconds each pre-launch check may take to reach a broker or database."
    )

    def deployer(self) -> FlowDeployer:
        """The deployer configured by this resource."""
        launcher = LocalProcessLauncher(self.python_executable, heartbeat_timeout_s=self.heartbeat_timeout_s)
        options = DeployOptions(
            launch=self.mode == "deploy",
            health_timeout_s=self.health_timeout_s,
            drain_timeout_s=self.drain_timeout_s,
            preflight=self.preflight,
            create_missing_tables=self.create_missing_tables,
            connect_timeout_s=self.connect_timeout_s,
        )
        return FlowDeployer(launcher, DeploymentStore(self.state_dir), options)
