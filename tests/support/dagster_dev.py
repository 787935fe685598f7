"""Run the real ``dagster dev`` (webserver + daemon + code server) on a loopback port for a test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def dagster_dev(
    dagster_home: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 120.0,
    workspace: str = "workspace.yaml",
) -> Iterator[str]:
    """Start ``dagster dev -w workspace.yaml`` with a fresh DAGSTER_HOME; yield its base URL."""
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").touch()
    port = free_port()
    log = open(dagster_home / "dagster-dev.log", "ab")
    proc_env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "DAGSTER_DISABLE_TELEMETRY": "1",
        **(env or {}),
    }
    dagster = str(Path(sys.executable).with_name("dagster"))
    proc = subprocess.Popen(
        [dagster, "dev", "-w", workspace, "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT,
        env=proc_env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, timeout_s, dagster_home / "dagster-dev.log")
        yield url
    finally:
        _stop_group(proc)
        log.close()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster dev exited early:\n{log_path.read_text()[-4000:]}")
        try:
            data = graphql(
                url,
                "query { workspaceOrError { __typename ... on Workspace { locationEntries { "
                "name locationOrLoadError { __typename } } } } }",
            )
            entries = data["workspaceOrError"]["locationEntries"]
            if entries and all(e["locationOrLoadError"] for e in entries):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"dagster dev not ready in {timeout_s}s:\n{log_path.read_text()[-4000:]}")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop dagster dev and its children: it leads its own process group (pgid == pid)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent, same group
    except ProcessLookupError:
        pass


def graphql(
    url: str, query: str, variables: dict[str, Any] | None = None, timeout: float = 30.0
) -> dict[str, Any]:
    """POST a GraphQL query to the webserver; return ``data`` (raise on errors)."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"{url}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = json.load(response)
    if payload.get("errors"):
        raise RuntimeError(f"GraphQL errors: {payload['errors']}")
    return payload["data"]


LAUNCH = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
  }
}
"""

RUN_STATUS = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"


def launch_materialization(
    url: str,
    asset_paths: list[list[str]],
    location: str = "definitions.definitions",
    run_config: dict | None = None,
) -> str:
    """Launch a run materializing *asset_paths* through the webserver; return its run id."""
    params = {
        "selector": {
            "repositoryLocationName": location,
            "repositoryName": "__repository__",
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": p} for p in asset_paths],
        },
        "runConfigData": run_config or {},
    }
    result = graphql(url, LAUNCH, {"params": params})["launchRun"]
    if result["__typename"] != "LaunchRunSuccess":
        raise RuntimeError(f"launch failed: {result}")
    return str(result["run"]["runId"])


def launch_job(url: str, job: str, run_config: dict, location: str = "definitions.definitions") -> str:
    """Launch a job run (e.g. loom_undeploy) through the webserver; return its run id."""
    params = {
        "selector": {"repositoryLocationName": location, "repositoryName": "__repository__", "jobName": job},
        "runConfigData": run_config,
    }
    result = graphql(url, LAUNCH, {"params": params})["launchRun"]
    if result["__typename"] != "LaunchRunSuccess":
        raise RuntimeError(f"launch failed: {result}")
    return str(result["run"]["runId"])


def wait_run(url: str, run_id: str, timeout_s: float = 180.0) -> str:
    """Wait until a run finishes; return its final status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = graphql(url, RUN_STATUS, {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return str(status)
        time.sleep(0.5)
    raise TimeoutError(f"run {run_id} did not finish in {timeout_s}s")


def python_file_workspace(directory: Path, location_file: Path, location_name: str) -> Path:
    """A ``workspace.yaml`` in *directory* loading *location_file* (imports resolve from the repo root)."""
    workspace = directory / "workspace.yaml"
    workspace.write_text(
        "load_from:\n"
        "  - python_file:\n"
        f"      relative_path: {location_file}\n"
        f"      working_directory: {ROOT}\n"
        f"      location_name: {location_name}\n"
    )
    return workspace
