"""Run one of this package's modules in a fresh Python child: the request on its stdin, the answer on
its stdout (never argv: requests carry credentials). Used where a step must not run in the calling
process (``kafka.isolation``) or must see another environment (``job_config``). No Dagster here."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def run_module(
    module: str, request: bytes, *, timeout_s: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``python -m module`` with *request* on stdin and this environment plus *env*, this package
    importable whatever the caller's ``sys.path``; raises ``subprocess.TimeoutExpired`` (the child
    killed by its pid) past *timeout_s*.

    Example:
        >>> run_module("loom_dagster.core.python_child", b"", timeout_s=30).returncode
        0
    """
    child_env = {**os.environ, **dict(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_PACKAGE_ROOT, child_env.get("PYTHONPATH", "")) if p
    )
    return subprocess.run(
        [sys.executable, "-m", module],
        input=request,
        capture_output=True,
        env=child_env,
        timeout=timeout_s,
        check=False,
    )
