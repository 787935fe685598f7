"""The ``Launcher`` interface: where a flow's job runs and how it is reported on.

The records it exchanges with the deployer live in :mod:`loom_dagster.core.deploy.launch_records`;
which launchers a record may name, in :mod:`loom_dagster.core.launchers.registry`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from loom_dagster.core.deploy.launch_records import JobReport, LaunchedJob, LaunchRequest, RuntimeProcess
from loom_dagster.core.errors import DeploymentError

if TYPE_CHECKING:
    from loom_dagster.core.deploy.store import DeploymentStore


class Launcher(abc.ABC):
    """Starts, inspects and stops a flow's long-running job.

    A launcher owns *where* a job runs and every fact about that place (process table, host name,
    log files). Deploy/redeploy/rollback logic lives in the deployer and is the same for every
    launcher. A launcher is built from JSON-safe keyword arguments (``config()`` returns them), so a
    deployment record can name it (``ref()``) and the CLI can build it again.
    """

    name: str = "launcher"

    @abc.abstractmethod
    def launch(self, request: LaunchRequest, log_dir: str) -> LaunchedJob:
        """Start the job detached from the caller and return how to find it."""

    @abc.abstractmethod
    def report(self, job: LaunchedJob) -> JobReport:
        """Current state of a launched job."""

    @contextlib.contextmanager
    def observation(self) -> Iterator[None]:
        """Within it, ``report`` and ``uptime`` may share one read of where the jobs run, as a health
        tick reports every flow at once (default: nothing to share)."""
        yield

    @abc.abstractmethod
    def stop(self, job: LaunchedJob, timeout_s: float) -> float:
        """Drain the job gracefully; kill it after *timeout_s*. Returns the seconds it took."""

    @abc.abstractmethod
    def preflight(self, request: LaunchRequest, timeout_s: float) -> str | None:
        """Check, without touching a running job, that the new version imports and compiles where it
        will run. Raises ``DeploymentError`` with the reason; returns what ran, for the deploy log."""

    def relaunch(self, job: LaunchedJob, log_dir: str) -> LaunchedJob:
        """Start a recorded job again as it was (restart, rollback). Default: ``launch`` its request; a
        launcher whose job depends on more than the request (a pod template) starts that again too."""
        return self.launch(job.request, log_dir)

    def verify_record(self, job: LaunchedJob) -> None:
        """Refuse (``DeploymentError``, nothing started) a recorded *job* whose ``relaunch`` would start
        something no deploy from here produced: a record edited where others can write it. Default:
        nothing to check (the local records live in a private state directory; see ``local``)."""
        return None

    def config(self) -> dict[str, Any]:
        """The JSON-safe keyword arguments that build this launcher again (default: none)."""
        return {}

    def deployment_store(self, state_dir: str | None = None) -> DeploymentStore:
        """Where deployments run by this launcher are recorded (default: files under *state_dir*)."""
        from loom_dagster.core.deploy.store import DeploymentStore

        return DeploymentStore(state_dir)

    def owns(self, job: LaunchedJob) -> bool:
        """Whether this launcher, from where it runs, can inspect and stop *job* (default: yes)."""
        return True

    def location(self) -> str:
        """Where this launcher runs jobs, for messages (default: its name)."""
        return self.name

    def uptime(self, job: LaunchedJob) -> float | None:
        """Seconds the job's youngest live process has run; ``None`` when none runs or unknown."""
        return None

    def logs(self, job: LaunchedJob, lines: int = 40) -> str:
        """The last *lines* lines of the job's log, secrets redacted (default: none)."""
        return ""

    def follow_logs(self, job: LaunchedJob) -> Iterator[str]:
        """The lines appended to the job's log from now on, redacted, until interrupted."""
        raise DeploymentError(f"the {self.name!r} launcher cannot follow a job's log")

    def runtime_processes(self) -> list[RuntimeProcess]:
        """Every running loom runtime process this launcher can see, recorded or not (orphan
        detection; default: none, so orphans are found from the consumer-group fence only)."""
        return []
