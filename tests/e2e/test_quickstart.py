"""The README quickstart, literally: ``scripts/dev`` under a pseudo-terminal (it starts its own Kafka and
ClickHouse), both example flows materialized through the webserver's GraphQL API, 1000 orders produced
with the README's command, every flow healthy with writes on every sink as ``loom-dagster status`` shows,
then Ctrl-C stops everything: dagster dev, the jobs, the broker and ClickHouse."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.dagster_dev import ROOT, free_port, graphql, launch_materialization, wait_run

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

FLOWS = {
    "orders_enrichment": {"orders_delta", "orders_ch", "orders.enriched"},
    "order_ledger": {"ledger_sql"},
}


class _Terminal:
    """``bash scripts/dev`` as a user runs it: its own session, a pty as its controlling terminal."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        pid, fd = pty.fork()
        if pid == 0:  # the child: exec the README's first command
            os.chdir(ROOT)
            os.execve("/bin/bash", ["bash", "scripts/dev"], env)
        self.pid, self.fd = pid, fd
        self.code: int | None = None
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        with open(self.log_path, "ab") as log:
            while True:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                log.write(chunk)
                log.flush()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ctrl_c(self) -> None:
        os.write(self.fd, b"\x03")

    def wait(self, timeout_s: float) -> int | None:
        """The exit code once ``scripts/dev`` has exited (checked at least once), else ``None``."""
        if self.code is not None:
            return self.code
        deadline = time.monotonic() + timeout_s
        while True:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.code = os.waitstatus_to_exitcode(status)
                return self.code
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.5)


def _processes_using(path: str) -> dict[int, str]:
    """Live processes whose command line or environment mentions *path* (our own excluded)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if path in cmdline or path in environ:
            found[int(entry.name)] = cmdline[:200]
    return found


def _read_env(state: Path) -> dict[str, str]:
    """The variables ``scripts/dev`` wrote to ``.state/env`` (``source .state/env``)."""
    out = subprocess.run(
        ["bash", "-c", f"source {state / 'env'} && env -0"], capture_output=True, check=True
    ).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def _status(env: dict[str, str]) -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(ROOT / ".venv/bin/loom-dagster"), "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return list(json.loads(out.stdout))


def _wait_for(predicate: Any, timeout_s: float, what: str, terminal: _Terminal) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}:\n{terminal.output()[-4000:]}")


def test_readme_quickstart_literally(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LOOM_", "DAGSTER_HOME", "PYTEST"))
    }
    env.update(
        LOOM_DAGSTER_DEV_STATE=str(state),
        DAGSTER_PORT=str(port),
        LOOM_DEV_CLICKHOUSE_PORT=str(free_port()),
        DAGSTER_DISABLE_TELEMETRY="1",
        TERM="dumb",
    )
    terminal = _Terminal(env, tmp_path / "terminal.log")
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            if terminal.wait(0) is not None:
                raise AssertionError(f"scripts/dev exited early:\n{terminal.output()[-4000:]}")
            try:
                data = graphql(url, "query { assetNodes { assetKey { path } } }")
            except OSError:
                return False
            return len(data["assetNodes"]) > 0

        _wait_for(ready, 240, "the webserver of scripts/dev", terminal)
        user_env = {**env, **_read_env(state)}

        for flow in FLOWS:
            run_id = launch_materialization(url, [["loom", flow]])
            status = wait_run(url, run_id, timeout_s=240)
            assert status == "SUCCESS", f"materializing {flow}: {status}\n{terminal.output()[-4000:]}"

        produced = subprocess.run(
            [str(ROOT / ".venv/bin/python"), "-m", "loom_dagster.dev.produce", "orders", "1000"],
            env=user_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert produced.returncode == 0, produced.stderr

        def every_sink_written() -> list[dict[str, Any]] | None:
            rows = {row["flow"]: row for row in _status(user_env)}
            for flow, sinks in FLOWS.items():
                row = rows.get(flow)
                if (
                    row is None
                    or row.get("health") != "healthy"
                    or not sinks <= set(row.get("last_write") or {})
                ):
                    return None
            return list(rows.values())

        rows = _wait_for(every_sink_written, 120, "every flow healthy with writes on every sink", terminal)
        assert {row["flow"] for row in rows} == set(FLOWS)
        human = subprocess.run(
            [str(ROOT / ".venv/bin/loom-dagster"), "status"], env=user_env, capture_output=True, text=True
        ).stdout
        for flow in FLOWS:
            assert flow in human and "healthy" in human, human
        assert "dead" not in human, human
        job_pids = [pid for row in rows for pid in row["pids"]]
        assert job_pids

        terminal.ctrl_c()
        code = terminal.wait(120)
        assert code is not None, f"scripts/dev did not stop on Ctrl-C:\n{terminal.output()[-4000:]}"
        deadline = time.monotonic() + 30
        while _processes_using(str(state)) and time.monotonic() < deadline:
            time.sleep(1.0)
        leftovers = _processes_using(str(state))
        assert not leftovers, f"still running after Ctrl-C: {leftovers}"
        for pid in job_pids:
            assert (
                not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
            )
    finally:
        if terminal.wait(0) is None:
            os.kill(terminal.pid, signal.SIGKILL)
            terminal.wait(10)
        for pid in _processes_using(str(state)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
