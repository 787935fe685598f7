"""A flow's loom config as its job will see it, for the checks that run before a launch.

A flow's ``env=`` reaches the job's environment only: ``LOOM__SECTION__KEY`` overrides and
``${oc.env:VAR}`` values set there change what the job connects to (another broker, another table)
while the Dagster process, loading the same files, sees the old values. So when a spec has ``env=``, its
config is loaded again in a fresh process whose environment is the job's (this process's plus ``env=``)
and handed back resolved; the pre-launch checks then connect where the job will. Without ``env=`` the
job's view is this process's, loaded here. No Dagster here.

``python -m loom_dagster.core.flows.job_config`` reads ``{"sources": [...], "environment": "..."}`` on stdin and
writes the resolved config (msgpack) on stdout; exit 2 with the reason on stderr when it does not load.
The config carries secrets: it travels over pipes only, never argv or disk.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from loom_dagster.core.errors import FlowLoadError
from loom_dagster.core.python_child import run_module
from loom_dagster.core.redact import redact_text

if TYPE_CHECKING:
    from loom.core.config import ConfigContext
    from loom.streaming.bytewax import BytewaxRuntimeConfig


class _Request(msgspec.Struct, frozen=True):
    sources: tuple[str, ...]
    environment: str


def load_job_config(
    sources: Sequence[str], environment: str, env: Mapping[str, str], *, timeout_s: float = 120.0
) -> ConfigContext:
    """The config of *sources* in *environment* as a process with this environment plus *env* loads it.

    Raises ``FlowLoadError`` with the child's (redacted) reason when it does not load there.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "c.yaml"
        >>> _ = path.write_text("app:\\n  name: ${oc.env:APP_NAME,none}\\n")
        >>> load_job_config([str(path)], "development", {"APP_NAME": "from-env"}).raw("app.name")
        'from-env'
    """
    from loom.core.config import ConfigContext

    request = msgspec.json.encode(_Request(tuple(sources), environment))
    try:
        done = run_module(__name__, request, timeout_s=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:
        raise FlowLoadError(
            f"loading the config with the job's environment (env=) took over {timeout_s:.0f}s"
        ) from exc
    if done.returncode != 0:
        reason = done.stderr.decode("utf-8", "replace").strip() or f"exit {done.returncode}"
        raise FlowLoadError(
            f"the config does not load with the job's environment (env=): {redact_text(reason)}"
        )
    return ConfigContext.from_dict(msgspec.msgpack.decode(done.stdout))


def _resolved(config: Any) -> dict[str, Any]:
    """Every value resolved (interpolations read this process's environment): loom's ``ConfigContext``
    has no public dump of its resolved tree, so its OmegaConf node is read directly."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(config._config, resolve=True)
    assert isinstance(tree, dict)
    return {str(key): value for key, value in tree.items()}


def _main() -> int:
    from loom_dagster.core.flows.loading import load_config

    request = msgspec.json.decode(sys.stdin.buffer.read(), type=_Request)
    try:
        tree = _resolved(load_config(request.sources, request.environment))
    except Exception as exc:  # FlowLoadError, or a value that does not resolve in this environment
        print(redact_text(f"{exc}"), file=sys.stderr)
        return 2
    sys.stdout.buffer.write(msgspec.msgpack.encode(tree))
    return 0


if __name__ == "__main__":
    sys.exit(_main())


def runtime_config(
    config: ConfigContext,
    *,
    process_id: int | None = None,
    addresses: Sequence[str] | None = None,
    workers_per_process: int | None = None,
) -> BytewaxRuntimeConfig:
    """``streaming.runtime`` from config, with the cluster arguments given on the command line.

    loom hands ``process_id``, ``addresses`` and ``workers_per_process`` to ``bytewax.run.cli_main``
    as they are; every process of a cluster gets the same address list and its own id.
    """
    from loom.core.config import ConfigKey
    from loom.streaming.bytewax import BytewaxRuntimeConfig

    base = config.section_or_default(
        ConfigKey.STREAMING_RUNTIME, BytewaxRuntimeConfig, BytewaxRuntimeConfig()
    )
    changes: dict[str, Any] = {}
    if process_id is not None:
        changes["process_id"] = process_id
    if addresses is not None:
        changes["addresses"] = tuple(addresses)
    if workers_per_process is not None:
        changes["workers_per_process"] = workers_per_process
    return msgspec.structs.replace(base, **changes) if changes else base
