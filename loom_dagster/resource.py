"""``LoomDeployResource``: where deployments are recorded, how jobs are launched, and the timeouts."""

from __future__ import annotations

from typing import Any, Literal

import dagster as dg
from pydantic import Field

from loom_dagster.core.deploy.deployer import DeployObserver, DeployOptions, FlowDeployer
from loom_dagster.core.deploy.launch_records import LOCAL_LAUNCHER
from loom_dagster.core.deploy.store import DeploymentStore
from loom_dagster.core.job.logs import DEFAULT_LOG_MAX_BYTES, DEFAULT_LOG_MAX_FILES
from loom_dagster.core.launchers.base import Launcher
from loom_dagster.core.launchers.registry import KUBERNETES_LAUNCHER, canonical_path, load_launcher


class LoomDeployResource(dg.ConfigurableResource):
    """Deploys loom flows when their assets are materialized.

    ``launcher`` picks where jobs run: ``local`` (detached processes on this host) or the import path
    of a ``Launcher`` subclass, built with ``launcher_config`` as keyword arguments. The deploy, the
    health sensor, the ``loom_undeploy`` job and (from the deployment record) the CLI all use it.

    Example:
        >>> resource = LoomDeployResource(state_dir="/tmp/loom-state", health_timeout_s=30)
        >>> resource.deployer().options.health_timeout_s
        30.0
        >>> LoomDeployResource(launcher="local", launcher_config={"python": "/usr/bin/python3"}).build_launcher().python
        '/usr/bin/python3'
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
    log_max_bytes: int = Field(
        default=DEFAULT_LOG_MAX_BYTES,
        ge=1024,
        description="A job log file is rotated at this size (job.log, job.log.1, ...).",
    )
    log_max_files: int = Field(
        default=DEFAULT_LOG_MAX_FILES,
        ge=1,
        description="Log files kept per launch, job.log included: at most log_max_bytes x log_max_files on disk.",
    )
    connect_timeout_s: float = Field(
        default=10.0, description="Seconds each pre-launch check may take to reach a broker or database."
    )
    gate: Literal["health", "progress"] = Field(
        default="health",
        description="What a new version must pass before it replaces the running one. 'health': its job "
        "connects within health_timeout_s. 'progress': also moves data within progress_window_s (its "
        "consumer group commits past the offsets it started from, or its sinks write rows; passes at once "
        "when no input waits); otherwise it is stopped and the previous deployment restarted.",
    )
    progress_window_s: float = Field(
        default=60.0,
        gt=0,
        description="Seconds the progress gate gives a new version to move data (gate: progress).",
    )

    launcher: str = Field(
        default=LOCAL_LAUNCHER,
        description="Where jobs run: 'local' (detached processes on this host), 'kubernetes' (a StatefulSet "
        "per flow, state in the cluster), or 'package.module:Class', a loom_dagster.Launcher "
        "subclass built with launcher_config as keyword arguments.",
    )
    launcher_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the launcher (JSON-safe: they are recorded with each deployment). "
        "For 'local' they override python_executable (as python), heartbeat_timeout_s, log_max_bytes and "
        "log_max_files; for 'kubernetes' see loom_dagster.core.launchers.kubernetes.KubernetesSettings "
        "(namespace, kubeconfig, pod: {image, env_from_secrets, resources, ...}, flows: {<flow>: ...}).",
    )

    openlineage: dict[str, Any] | None = Field(
        default=None,
        description="OpenLineage client config, as in openlineage.yml (e.g. {'transport': {'type': 'http', "
        "'url': 'http://marquez:5000'}}): deploys, redeploys, undeploys and failures emit run events of a "
        "STREAMING job. {} lets the client find its config (OPENLINEAGE_URL, OPENLINEAGE_CONFIG, "
        "openlineage.yml). None: no events. Needs the 'openlineage' extra.",
    )
    openlineage_namespace: str | None = Field(
        default=None,
        description="Namespace of the flows' jobs (default $OPENLINEAGE_NAMESPACE, else 'loom').",
    )
    openlineage_running_period_s: float = Field(
        default=300.0,
        gt=0,
        description="The job health sensor emits a RUNNING event per healthy deployment at most this often.",
    )

    def build_launcher(self) -> Launcher:
        """The launcher this resource names, configured."""
        config = dict(self.launcher_config)
        if canonical_path(self.launcher) == canonical_path(LOCAL_LAUNCHER):
            config = {
                "python": self.python_executable,
                "heartbeat_timeout_s": self.heartbeat_timeout_s,
                "log_max_bytes": self.log_max_bytes,
                "log_max_files": self.log_max_files,
                **config,
            }
        elif canonical_path(self.launcher) == canonical_path(KUBERNETES_LAUNCHER):
            # the pods' grace period and liveness follow the resource's timeouts unless set for the launcher
            config = {
                "drain_timeout_s": self.drain_timeout_s,
                "heartbeat_timeout_s": self.heartbeat_timeout_s,
                **config,
            }
        return load_launcher(self.launcher, config)

    def deployer(self) -> FlowDeployer:
        """The deployer configured by this resource."""
        launcher = self.build_launcher()
        options = DeployOptions(
            launch=self.mode == "deploy",
            health_timeout_s=self.health_timeout_s,
            drain_timeout_s=self.drain_timeout_s,
            preflight=self.preflight,
            create_missing_tables=self.create_missing_tables,
            connect_timeout_s=self.connect_timeout_s,
            gate=self.gate,
            progress_window_s=self.progress_window_s,
        )
        store = launcher.deployment_store(self.state_dir)
        return FlowDeployer(launcher, store, options, observer=self.deploy_observer(store))

    def deploy_observer(self, store: DeploymentStore) -> DeployObserver:
        """The OpenLineage observer when ``openlineage`` is set, else one that does nothing."""
        if self.openlineage is None:
            return DeployObserver()
        from loom_dagster.core.openlineage import OpenLineageObserver, OpenLineageSettings

        settings = OpenLineageSettings(
            config=dict(self.openlineage),
            namespace=self.openlineage_namespace,
            running_period_s=self.openlineage_running_period_s,
        )
        return OpenLineageObserver(store, settings)
