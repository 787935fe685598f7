"""``loom-dagster manifests``: the exact objects a Kubernetes deploy of FLOW would apply.

    loom-dagster manifests orders -m my_location.definitions > orders.yaml
    loom-dagster manifests --rbac --read-only

Like ``helm template``: nothing is applied and no cluster is contacted. The flow is compiled with the
code location's own spec (so its config files, environment and processes are the deploy's), and the
launcher settings come from ``--launcher-config`` or the location's ``LoomDeployResource``.
``--rbac`` prints the Role the launcher needs instead; ``--rbac --read-only`` the Role of those who only
run ``status`` and ``logs`` (reads, no Secret, no write).

Nothing printed holds a secret: the flow's ``env=`` values are kept in a Secret the objects reference (the
Secret itself is created by the launcher, never printed); config files holding a literal secret and
``pod.env`` values that look like one are refused, naming where, never the value.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from importlib.resources import files
from typing import Any

import msgspec
import yaml

from loom_dagster.core.deploy.steps import config_hash_of_contents, launch_request
from loom_dagster.core.deploy.store import read_config_files
from loom_dagster.core.errors import LoomDagsterError
from loom_dagster.core.flows.catalog import compile_spec
from loom_dagster.core.flows.defs_state import forced_refresh
from loom_dagster.core.flows.spec import LoomFlowSpec
from loom_dagster.core.launchers.kubernetes.manifests import config_map_name, config_mount, flow_manifests
from loom_dagster.core.launchers.kubernetes.settings import KubernetesSettings
from loom_dagster.core.launchers.kubernetes.store import checked_texts
from loom_dagster.core.launchers.registry import KUBERNETES_LAUNCHER, canonical_path


class ManifestsError(LoomDagsterError):
    """The manifests could not be rendered (printed without a traceback, exit 2)."""


def rbac_role(read_only: bool = False) -> str:
    """The Role the Kubernetes launcher needs (``loom_dagster/core/launchers/kubernetes/rbac.yaml``), or with
    *read_only* the Role of ``status`` and ``logs`` only (``rbac-read-only.yaml``)."""
    name = "rbac-read-only.yaml" if read_only else "rbac.yaml"
    return (files("loom_dagster.core.launchers.kubernetes") / name).read_text()


def add_parser(commands: Any) -> None:
    """Register ``manifests`` on the ``loom-dagster`` sub-command parser *commands*."""
    parser = commands.add_parser("manifests", help="print the Kubernetes objects a deploy of FLOW applies")
    parser.add_argument("flow", nargs="?")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-m", "--module", help="the code location's module (as for dagster -m)")
    where.add_argument("-f", "--file", help="the code location's Python file (as for dagster -f)")
    parser.add_argument("--environment", default=None, help="loom environment (default: the spec's)")
    parser.add_argument(
        "--launcher-config",
        default=None,
        help="KubernetesLauncher settings as JSON (default: the resource's)",
    )
    parser.add_argument("--rbac", action="store_true", help="print the Role the launcher needs")
    parser.add_argument(
        "--read-only",
        action="store_true",
        help="with --rbac: the Role for `status` and `logs` only (get/list/watch, no Secrets, no writes)",
    )
    parser.set_defaults(run=cmd_manifests)


def cmd_manifests(args: argparse.Namespace) -> int:
    """Print the objects as one YAML stream."""
    if args.rbac:
        print(rbac_role(read_only=args.read_only), end="")
        return 0
    if args.read_only:
        raise ManifestsError("--read-only goes with --rbac: loom-dagster manifests --rbac --read-only")
    if not args.flow or not (args.module or args.file):
        raise ManifestsError("name a flow and its code location: loom-dagster manifests FLOW -m MODULE")
    namespace, specs = _run_location(args.module, args.file)
    spec = specs.get(args.flow)
    if spec is None:
        raise ManifestsError(
            f"flow {args.flow!r} is not in code location {args.module or args.file!r}; its flows: "
            f"{', '.join(sorted(specs)) or 'none'}"
        )
    settings = _settings(args.launcher_config, namespace)
    print(yaml.safe_dump_all(render(spec, settings, args.environment), sort_keys=False), end="")
    return 0


def render(
    spec: LoomFlowSpec, settings: KubernetesSettings, environment: str | None = None
) -> list[dict[str, Any]]:
    """Compile *spec* and return the ConfigMap, Service and StatefulSet a deploy would apply.

    Example:
        >>> render(LoomFlowSpec("flows.orders:flow", config="config"), KubernetesSettings())  # doctest: +SKIP
    """
    compiled = compile_spec(spec, environment)
    request = launch_request(spec, compiled, run_id=None)
    contents = read_config_files(request.config_files)
    if config_hash_of_contents(contents, compiled.flow.environment) != compiled.flow.config_hash:
        raise ManifestsError(
            f"the config of flow {compiled.flow.name!r} changed while it was read; try again"
        )
    texts = checked_texts(compiled.flow.name, contents)
    config_map = config_map_name(settings, compiled.flow.name, compiled.flow.config_hash[:12])
    pod_files = tuple(f"{config_mount(config_map)}/{name}" for name in texts)
    request = msgspec.structs.replace(request, config_files=pod_files, sys_path=(), cwd=None)
    return flow_manifests(settings, request, texts)


def _run_location(module: str | None, file: str | None) -> tuple[dict[str, Any], dict[str, LoomFlowSpec]]:
    """Run the code location (compiling every flow, as ``loom-dagster refresh`` does); return its
    module namespace and the loom flow specs its definitions load, by flow name."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as dagster does for -m / -f
    with forced_refresh() as loads:
        try:
            if module:
                namespace = runpy.run_module(module, run_name=module)
            else:
                namespace = runpy.run_path(str(file), run_name="__loom_manifests__")
        except LoomDagsterError:
            raise
        except Exception as exc:
            raise ManifestsError(
                f"code location {module or file!r} failed to load: {type(exc).__name__}: {exc}"
            ) from exc
    specs = {compiled.flow.name: compiled.spec for _, load in loads for compiled in load.compiled}
    return namespace, specs


def _definitions(namespace: dict[str, Any]) -> list[Any]:
    import dagster as dg  # deferred: Dagster takes a second to import, and only this path needs it

    return [value for value in namespace.values() if isinstance(value, dg.Definitions)]


def _settings(raw: str | None, namespace: dict[str, Any]) -> KubernetesSettings:
    if raw:
        try:
            return KubernetesSettings.from_config(json.loads(raw))
        except Exception as exc:
            raise ManifestsError(f"--launcher-config: {exc}") from exc
    from loom_dagster.resource import LoomDeployResource  # deferred: it imports Dagster (see _definitions)

    for defs in _definitions(namespace):
        for resource in (defs.resources or {}).values():
            if isinstance(resource, LoomDeployResource) and canonical_path(
                resource.launcher
            ) == canonical_path(KUBERNETES_LAUNCHER):
                try:
                    return KubernetesSettings.from_config(dict(resource.launcher_config))
                except msgspec.ValidationError as exc:
                    raise ManifestsError(f"the LoomDeployResource's launcher_config: {exc}") from None
    raise ManifestsError(
        "the code location's LoomDeployResource does not use the kubernetes launcher; pass its settings "
        'as --launcher-config \'{"namespace": ..., "pod": {"image": ...}}\''
    )
