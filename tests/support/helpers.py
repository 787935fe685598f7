"""Small helpers shared by the tests: polling, the installed CLI, a port that never speaks Kafka."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def wait_for(
    predicate: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition", interval_s: float = 0.2
) -> Any:
    """Poll *predicate* until it returns something truthy; return it (fail naming *what* on timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def run_cli(state_dir: Path | str, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run the installed ``loom-dagster`` console script on *state_dir*."""
    exe = str(Path(sys.executable).with_name("loom-dagster"))
    return subprocess.run(
        [exe, "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
    )


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A loopback port that accepts TCP connections but never speaks Kafka; yields the port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def hold() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=2)
        for conn in accepted:
            conn.close()
        server.close()


def step_failure_message(result: Any) -> str:
    """The error message of a failed materialization's (first) failed step."""
    assert not result.success
    event = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return str(event.event_specific_data.error.message)


def materialization_metadata(result: Any, node: str = "loom_deploy") -> dict[str, Any]:
    """The plain values of the one materialization *node* produced in *result*."""
    (materialization,) = result.asset_materializations_for_node(node)
    return {key: value.value for key, value in materialization.metadata.items()}


class Poller:
    """Calls ``poll()`` every *period_s* in a background thread while the ``with`` block runs
    (subclasses keep what they see)."""

    period_s = 0.1

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Any:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def poll(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.poll()


def http_get(url: str, timeout: float = 5.0) -> tuple[int | None, str]:
    """(HTTP status, body) of a GET; (None, "") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None, ""
