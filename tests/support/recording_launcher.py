"""A real custom ``Launcher`` for tests: runs jobs through ``LocalProcessLauncher`` and appends every
call it gets to a JSON-lines journal (method, flow, calling process), so a test can tell which process
(the Dagster run, the sensor, the CLI) went through it."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from loom_dagster.core.deploy.launch_records import JobReport, LaunchedJob, LaunchRequest, RuntimeProcess
from loom_dagster.core.launchers.base import Launcher
from loom_dagster.core.launchers.local import LocalProcessLauncher

PATH = "tests.support.recording_launcher:RecordingLauncher"


class RecordingLauncher(Launcher):
    """``LocalProcessLauncher`` behind a journal of calls.

    Example:
        >>> launcher = RecordingLauncher(journal="/tmp/calls.jsonl", heartbeat_timeout_s=5)
        >>> launcher.config()["journal"], launcher.name
        ('/tmp/calls.jsonl', 'recording')
    """

    name = "recording"

    def __init__(self, journal: str, **local: Any) -> None:
        self.journal = journal
        self.inner = LocalProcessLauncher(**local)

    def config(self) -> dict[str, Any]:
        return {"journal": self.journal, **self.inner.config()}

    def _note(self, call: str, flow: str = "") -> None:
        entry = {
            "call": call,
            "flow": flow,
            "pid": os.getpid(),
            "argv0": Path(sys.argv[0]).name,
            "at": time.time(),
        }
        with open(self.journal, "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def launch(self, request: LaunchRequest, log_dir: str) -> LaunchedJob:
        self._note("launch", request.flow_name)
        return msgspec.structs.replace(self.inner.launch(request, log_dir), launcher=self.name)

    def report(self, job: LaunchedJob) -> JobReport:
        self._note("report", job.flow_name)
        return self.inner.report(job)

    def stop(self, job: LaunchedJob, timeout_s: float) -> float:
        self._note("stop", job.flow_name)
        return self.inner.stop(job, timeout_s)

    def preflight(self, request: LaunchRequest, timeout_s: float) -> str | None:
        self._note("preflight", request.flow_name)
        return self.inner.preflight(request, timeout_s)

    def owns(self, job: LaunchedJob) -> bool:
        self._note("owns", job.flow_name)
        return self.inner.owns(job)

    def location(self) -> str:
        return self.inner.location()

    def uptime(self, job: LaunchedJob) -> float | None:
        self._note("uptime", job.flow_name)
        return self.inner.uptime(job)

    def logs(self, job: LaunchedJob, lines: int = 40) -> str:
        self._note("logs", job.flow_name)
        return self.inner.logs(job, lines)

    def follow_logs(self, job: LaunchedJob) -> Iterator[str]:
        self._note("follow_logs", job.flow_name)
        return self.inner.follow_logs(job)

    def runtime_processes(self) -> list[RuntimeProcess]:
        self._note("runtime_processes")
        return self.inner.runtime_processes()


def calls(journal: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """The journal's entries written at or after *since*."""
    if not journal.is_file():
        return []
    entries = [json.loads(line) for line in journal.read_text().splitlines() if line]
    return [e for e in entries if e["at"] >= since]
