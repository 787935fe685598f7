"""``python -m loom_dagster.runtime``: run one loom streaming flow as a long-lived job.

The process leaves through ``os._exit`` once the final status record is written and the logs are
flushed: with deltalake 1.6 + pyarrow loaded, normal interpreter shutdown sometimes aborts
("terminate called without an active exception", exit 134), which would hide the real exit code.
"""

import logging
import os
import sys

from loom_dagster.runtime.args import main


def _exit(code: int) -> None:
    """Flush logs and stdio, then exit without running interpreter finalizers."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    try:
        exit_code = main()
    except SystemExit as exc:
        exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    _exit(exit_code)
