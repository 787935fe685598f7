"""What the ``loom-dagster`` commands share: the top options saying where the deployment records live
(``--launcher``, ``--launcher-config``, ``--state-dir``), the launcher of a record, a flow's current
deployment, and the ``loom-dagster: ...`` lines on stderr.

    loom-dagster --launcher kubernetes --launcher-config '{"namespace": "streaming"}' status
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import msgspec

from loom_dagster.core.deploy.launch_records import LauncherRef
from loom_dagster.core.deploy.store import Deployment, DeploymentStore
from loom_dagster.core.errors import LoomDagsterError
from loom_dagster.core.launchers.base import Launcher
from loom_dagster.core.launchers.registry import is_launcher_of, launcher_from_ref

LAUNCHER_VARIABLE = "LOOM_DAGSTER_LAUNCHER"
LAUNCHER_CONFIG_VARIABLE = "LOOM_DAGSTER_LAUNCHER_CONFIG"


class CliError(LoomDagsterError):
    """A user-facing CLI error (printed without a traceback, exit 2)."""


def add_launcher_options(parser: argparse.ArgumentParser) -> None:
    """``--launcher``, ``--launcher-config`` and ``--state-dir`` on the top ``loom-dagster`` parser."""
    parser.add_argument(
        "--launcher",
        default=None,
        help=f"where the flows run: local (default), kubernetes or a launcher registered under the entry "
        f"point group loom_dagster.launchers (default: ${LAUNCHER_VARIABLE})",
    )
    parser.add_argument(
        "--launcher-config",
        default=None,
        help=f'the launcher\'s settings as JSON, e.g. \'{{"namespace": "streaming"}}\' for kubernetes '
        f"(default: ${LAUNCHER_CONFIG_VARIABLE})",
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        help="deployment state dir (default: $LOOM_DAGSTER_STATE_DIR, "
        "else $DAGSTER_HOME/loom, else ~/.loom-dagster)",
    )


def cli_launcher(args: argparse.Namespace) -> Launcher:
    """The launcher ``--launcher`` / ``--launcher-config`` (or their environment variables) name:
    where the deployment records live (files here for ``local``; the cluster for ``kubernetes``)."""
    path = args.launcher or os.environ.get(LAUNCHER_VARIABLE) or "local"
    raw = args.launcher_config or os.environ.get(LAUNCHER_CONFIG_VARIABLE) or "{}"
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise CliError(f"--launcher-config is not JSON: {exc}") from exc
    try:
        return launcher_from_ref(LauncherRef(path, config))
    except LoomDagsterError as exc:
        raise CliError(str(exc)) from exc


def launcher_of(
    deployment: Deployment, built: dict[bytes, Launcher] | None = None, cli: Launcher | None = None
) -> Launcher:
    """The launcher that ran *deployment*, built again from its record (cached in *built*), only when
    the record names an allowed launcher (:func:`launcher_from_ref`); ``CliError`` saying how to
    register it otherwise.

    *cli* (the command's own ``--launcher``) is used instead when it is of the recorded class and reaches
    the job: the operator's credentials, never a kubeconfig path or context the deployer recorded."""
    if cli is not None and is_launcher_of(deployment.launcher, cli) and cli.owns(deployment.job):
        return cli
    built = {} if built is None else built
    key = msgspec.json.encode(deployment.launcher, order="sorted")
    if key not in built:
        try:
            built[key] = launcher_from_ref(deployment.launcher)
        except LoomDagsterError as exc:
            raise CliError(f"flow {deployment.flow_name!r}: {exc}") from exc
    return built[key]


def current_deployment(store: DeploymentStore, flow: str) -> Deployment:
    """The current deployment of *flow* in *store*; ``CliError`` naming the flows deployed there otherwise."""
    deployment = store.current(flow)
    if deployment is None:
        known = ", ".join(d.flow_name for d in store.all()) or "none"
        raise CliError(f"no deployment of flow {flow!r} in {store.location()}; deployed flows there: {known}")
    return deployment


def print_stderr(message: str) -> None:
    """``loom-dagster: MESSAGE`` on stderr (an error or a warning; stdout stays the command's output)."""
    print(f"loom-dagster: {message}", file=sys.stderr)
