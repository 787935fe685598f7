"""loom's own deploy checks (``loom.core.checks``), run for a flow's target environment before launch.

The job runtime enforces the same checks at start-up (loom's ``StreamingRunner`` calls
``enforce_deploy_checks`` in production and staging), so a finding of level error would kill the job
after it was launched and after the running version was drained. We run them first, in the
materialization, with the config the job will load, the way ``loom check --deploy`` does:

- the packages that register loom's checks are imported (as ``loom check`` does), and loom imports
  the modules listed under ``checks.modules`` itself;
- ``loom.rest`` checks are skipped, as every loom runner does for a process serving no HTTP;
- in ``production`` / ``staging`` errors block the deploy; in other environments nothing is enforced
  (loom would not enforce either) but every finding is still reported, so what production would
  refuse is visible in development.

No Dagster here: the asset reports the result as the ``deploy_checks`` asset check.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import msgspec

from loom_dagster.core.errors import DeploymentError, FlowLoadError

if TYPE_CHECKING:
    from loom.core.config import ConfigContext

    from loom_dagster.core.flows.spec import LoomFlowSpec

# The areas loom's own checks live in; ``loom check --deploy`` imports the same packages.
_CHECK_PACKAGES = ("loom.core.logger", "loom.core.repository.abc")
_SKIPPED = ("loom.rest",)
_SILENCED_KEY = "checks.silenced"


class DeployFinding(msgspec.Struct, frozen=True):
    """One finding of a loom deploy check: its id, level, the unsafe setting and the fix."""

    id: str
    level: str
    message: str
    hint: str

    def describe(self) -> str:
        """Every part of the finding on one line, with how to accept it on purpose."""
        return (
            f"{self.level.upper()} {self.id}: {self.message} Hint: {self.hint} "
            f"(to accept it on purpose, list {self.id!r} under {_SILENCED_KEY} in the flow's config)"
        )


class DeployChecksReport(msgspec.Struct, frozen=True):
    """The outcome of loom's deploy checks for one flow in one environment."""

    environment: str
    enforced: bool
    findings: tuple[DeployFinding, ...] = ()
    silenced: tuple[str, ...] = ()
    skipped: tuple[str, ...] = _SKIPPED

    @property
    def errors(self) -> tuple[DeployFinding, ...]:
        """Findings of level error."""
        return tuple(f for f in self.findings if f.level == "error")

    @property
    def warnings(self) -> tuple[DeployFinding, ...]:
        """Findings of level warning."""
        return tuple(f for f in self.findings if f.level == "warning")

    @property
    def blocks(self) -> bool:
        """True when loom would refuse to start the job: errors in an enforced environment."""
        return self.enforced and bool(self.errors)

    def summary(self) -> str:
        """One line: counts, environment, enforcement and silenced ids."""
        counts = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        mode = "enforced" if self.enforced else "not enforced there (loom enforces production and staging)"
        silenced = f"; silenced: {', '.join(self.silenced)}" if self.silenced else ""
        return f"loom deploy checks in the {self.environment!r} environment, {mode}: {counts}{silenced}"

    def describe(self, flow_name: str) -> str:
        """The full text: a header, then every finding with its hint and how to silence it."""
        if self.blocks:
            head = (
                f"loom's deploy checks refuse flow {flow_name!r} in the {self.environment!r} environment; "
                "nothing was launched and the running job (if any) was not touched."
            )
        else:
            head = f"flow {flow_name!r}: {self.summary()}."
        lines = [head, *(f"  - {finding.describe()}" for finding in self.findings)]
        if self.blocks:
            lines.append(
                "Fix each setting as its hint says, or accept a finding on purpose by listing its id under "
                f"{_SILENCED_KEY} in the flow's config; for local work deploy with environment='development' "
                "(LoomFlowSpec(environment=...), LOOM_ENV, or the run config's `environment`)."
            )
        return "\n".join(lines)

    def metadata(self) -> dict[str, Any]:
        """JSON-able facts for the asset check (loom's checks read config keys, never secret values)."""
        return {
            "environment": self.environment,
            "enforced": self.enforced,
            "errors": [f.describe() for f in self.errors],
            "warnings": [f.describe() for f in self.warnings],
            "silenced": list(self.silenced),
            "skipped": list(self.skipped),
        }


class DeployChecksFailed(DeploymentError):
    """loom's deploy checks found errors in an enforced environment; nothing was launched."""

    def __init__(self, flow_name: str, report: DeployChecksReport) -> None:
        super().__init__(report.describe(flow_name))
        self.report = report


def run_flow_deploy_checks(spec: LoomFlowSpec, environment: str | None = None) -> DeployChecksReport:
    """Run loom's deploy checks on the config *spec* loads in *environment* (never raises on findings).

    Example:
        >>> report = run_flow_deploy_checks(  # doctest: +SKIP
        ...     LoomFlowSpec("definitions.flows.orders:orders_flow", config="definitions/config/orders"))
        >>> report.blocks
        False
    """
    from loom.core.environment import resolve_environment

    env = spec.resolved_environment(environment)
    config = spec.load_config(env)
    return deploy_checks_for_config(config, env, enforced=resolve_environment(env).is_deployed)


def deploy_checks_for_config(
    config: ConfigContext, environment: str, *, enforced: bool
) -> DeployChecksReport:
    """Run loom's registered deploy checks (REST ones skipped) against a loaded config."""
    from loom.core.checks import run_deploy_checks
    from loom.core.config.errors import ConfigError

    for package in _CHECK_PACKAGES:
        importlib.import_module(package)
    try:
        report = run_deploy_checks(config, skip=_SKIPPED)
    except ConfigError as exc:
        # A bad `checks` section (a placeholder, an unknown key, a module that fails to import) stops
        # the job at start-up too: it is bad input, reported before launch.
        raise FlowLoadError(f"the config's checks section is invalid: {exc}") from exc
    findings = tuple(
        DeployFinding(id=r.id, level=str(r.level), message=r.message, hint=r.hint) for r in report.results
    )
    return DeployChecksReport(
        environment=environment, enforced=enforced, findings=findings, silenced=report.silenced
    )
