"""``LoomFlowSpec``: one loom flow to orchestrate, and how to load and compile it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loom_dagster.core.flows.loading import config_files, import_flow, load_config, resolve_environment_name

if TYPE_CHECKING:
    from loom.core.config import ConfigContext
    from loom.streaming import StreamFlow

ConfigSource = str | os.PathLike[str]


@dataclass(frozen=True)
class LoomFlowSpec:
    """One loom ``StreamFlow`` to turn into Dagster assets and deploy as a Bytewax job.

    Args:
        import_path: ``"package.module:attribute"`` of the StreamFlow (or of a function returning it);
            it must import in a separate process too (the job runtime imports it again).
        config: loom config: a YAML file, a directory with ``base.yaml`` + ``<environment>.yaml``
            overlays, or several of them merged left to right.
        environment: loom environment (``development``, ``test``, ``staging``, ``production``);
            defaults to ``LOOM_ENV``, else ``production``, as loom itself does.
        group_name / owners / tags / description: asset presentation of the flow.
        processes / workers_per_process: Bytewax cluster shape of the deployed job.
        env: extra environment variables for the job (put secrets here or in config files, never argv).

    Example:
        >>> spec = LoomFlowSpec("definitions.flows.orders:orders_flow", config="definitions/config",
        ...                     environment="development", group_name="orders")
        >>> spec.config_sources
        ('definitions/config',)
    """

    import_path: str
    config: ConfigSource | Sequence[ConfigSource]
    environment: str | None = None
    group_name: str | None = None
    owners: Sequence[str] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    description: str | None = None
    processes: int = 1
    workers_per_process: int = 1
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.processes < 1 or self.workers_per_process < 1:
            raise ValueError("processes and workers_per_process must be at least 1")

    @property
    def config_sources(self) -> tuple[str, ...]:
        """The config sources as strings, in merge order."""
        if isinstance(self.config, str | os.PathLike):
            return (os.fspath(self.config),)
        return tuple(os.fspath(c) for c in self.config)

    def resolved_environment(self, override: str | None = None) -> str:
        """The loom environment for a load: *override*, else the spec's, else ``LOOM_ENV``/production."""
        return resolve_environment_name(override or self.environment)

    def config_files(self, environment: str | None = None) -> tuple[str, ...]:
        """Absolute config files this spec loads in *environment*, in merge order."""
        env = self.resolved_environment(environment)
        return tuple(str(Path(p).resolve()) for p in config_files(self.config_sources, env))

    def load_flow(self) -> StreamFlow[Any, Any]:
        """Import the StreamFlow."""
        return import_flow(self.import_path)

    def load_config(self, environment: str | None = None) -> ConfigContext:
        """Load the loom config (overlays and ``LOOM__*`` overrides applied)."""
        return load_config(self.config_sources, self.resolved_environment(environment))

    def load_job_config(self, environment: str | None = None) -> ConfigContext:
        """The loom config as the job loads it: with ``env=`` in its environment (``LOOM__*`` overrides,
        ``${oc.env:...}``), loaded in a fresh process that has it (``loom_dagster.core.flows.job_config``)."""
        if not self.env:
            return self.load_config(environment)
        from loom_dagster.core.flows.job_config import load_job_config

        return load_job_config(self.config_sources, self.resolved_environment(environment), self.env)
