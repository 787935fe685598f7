"""Old module paths of loom-dagster, still importable (with a ``DeprecationWarning``) after the move of the
Dagster-free core under ``loom_dagster.core`` (issue 19).

A user's ``defs.yaml`` may name ``loom_dagster.component.LoomFlowsComponent`` and a script may import
``loom_dagster.rewind``: this finder answers such an import with the module that now holds the code (the
same module object, so classes stay identical), and nothing else. Import from the new paths, or from
``loom_dagster`` itself for the names in its ``__all__``.

Written by hand because the standard library has no module alias: ``sys.modules`` entries alone do not
resolve a dotted import of a name that has no file.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    "loom_dagster.errors": "loom_dagster.core.errors",
    "loom_dagster.redact": "loom_dagster.core.redact",
    "loom_dagster.settings": "loom_dagster.core.sensor_settings",
    "loom_dagster.python_child": "loom_dagster.core.python_child",
    "loom_dagster.launchers.procfs": "loom_dagster.core.procfs",
    "loom_dagster.lineage_events": "loom_dagster.core.openlineage",
    "loom_dagster.spec": "loom_dagster.core.flows.spec",
    "loom_dagster.loading": "loom_dagster.core.flows.loading",
    "loom_dagster.job_config": "loom_dagster.core.flows.job_config",
    "loom_dagster.compile": "loom_dagster.core.flows.compile",
    "loom_dagster.describe": "loom_dagster.core.flows.describe",
    "loom_dagster.records": "loom_dagster.core.flows.records",
    "loom_dagster.catalog": "loom_dagster.core.flows.catalog",
    "loom_dagster.defs_state": "loom_dagster.core.flows.defs_state",
    "loom_dagster.lineage": "loom_dagster.core.flows.lineage_check",
    "loom_dagster.schema": "loom_dagster.core.flows.columns",
    "loom_dagster.deploy": "loom_dagster.core.deploy.deployer",
    "loom_dagster.deployments": "loom_dagster.core.deploy.store",
    "loom_dagster.progress": "loom_dagster.core.deploy.progress",
    "loom_dagster.rewind": "loom_dagster.core.deploy.rewind",
    "loom_dagster.orphans": "loom_dagster.core.deploy.orphans",
    "loom_dagster.deploy_checks": "loom_dagster.core.checks.loom_checks",
    "loom_dagster.topic_checks": "loom_dagster.core.checks.topics",
    "loom_dagster.offset_safety": "loom_dagster.core.checks.offsets",
    "loom_dagster.fence": "loom_dagster.core.checks.fence",
    "loom_dagster.sinks.check_tables": "loom_dagster.core.checks.tables",
    "loom_dagster.launchers": "loom_dagster.core.launchers",
    "loom_dagster.kafka": "loom_dagster.core.kafka",
    "loom_dagster.sinks": "loom_dagster.core.sinks",
    "loom_dagster.runtime.status": "loom_dagster.core.job.status",
    "loom_dagster.runtime.failure": "loom_dagster.core.job.failure",
    "loom_dagster.runtime.logs": "loom_dagster.core.job.logs",
    "loom_dagster.runtime.cli": "loom_dagster.runtime.args",
    "loom_dagster.checks": "loom_dagster.asset_check_names",
    "loom_dagster.decorator": "loom_dagster.asset_decorator",
    "loom_dagster.graph": "loom_dagster.asset_graph",
    "loom_dagster.resources": "loom_dagster.resource",
    "loom_dagster.definitions_builder": "loom_dagster.definitions",
    "loom_dagster.component_models": "loom_dagster.components.loom_flows.models",
    "loom_dagster.component": "loom_dagster.components.loom_flows.component",
    "loom_dagster.scaffold": "loom_dagster.components.loom_flows.scaffolder",
    "loom_dagster.manifests_cli": "loom_dagster.cli.manifests",
    "loom_dagster.refresh": "loom_dagster.cli.refresh",
    "loom_dagster.rewind_job": "loom_dagster.jobs.reset_offsets",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system put the alias spec on the shared module object: give it its own back
        module.__spec__ = self.own_spec


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolve an old module path of :data:`MOVED` to its new module, warning once per import."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = moved_to(fullname)
        if new is None:
            return None
        warnings.warn(
            f"{fullname} moved to {new}; import it from there (or from loom_dagster)",
            DeprecationWarning,
            stacklevel=3,
        )
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def moved_to(fullname: str) -> str | None:
    """The new path of an old module path (a module of a moved package included), or None."""
    if not fullname.startswith("loom_dagster.") or fullname in sys.modules:
        return None
    if fullname in MOVED:
        return MOVED[fullname]
    package, _, rest = fullname.rpartition(".")
    while package and package != "loom_dagster":
        if package in MOVED:
            return f"{MOVED[package]}.{fullname[len(package) + 1 :]}"
        package, _, _ = package.rpartition(".")
    return None


def install() -> None:
    """Put the finder first on ``sys.meta_path``, once (``loom_dagster/__init__`` calls it): first, because
    the path finder would otherwise load a module of a moved package a second time under its old name."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
