"""Second stage of the double spawn: start the job in its own session and exit at once.

Run as ``python -m loom_dagster.core.launchers._detach`` with a JSON request on stdin
(``{"argv": [...], "log_path": ..., "cwd": ...}``); prints the job's PID. The job is then a child of
init, not of the Dagster run worker, so it outlives the run, ``dagster dev`` and its Ctrl-C.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def main() -> int:
    """Spawn the job described on stdin, print its pid, exit."""
    request = json.load(sys.stdin)
    log_fd = os.open(request["log_path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(log_fd, "ab", buffering=0) as log:
        proc = subprocess.Popen(
            request["argv"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=request.get("cwd") or None,
            start_new_session=True,
            close_fds=True,
            env=os.environ.copy(),
        )
    print(proc.pid, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
