"""Long-running job runtime for loom streaming flows.

``python -m loom_dagster.runtime --import-path PKG.MOD:ATTR --config PATH --status-file PATH``
runs one flow until SIGTERM/SIGINT (both drain gracefully) and keeps a JSON status record.

Importing this package (and :mod:`loom_dagster.core.job.status`) does not import loom or bytewax:
launchers and sensors use :func:`read_status`, :class:`JobStatus` and the exit-code constants.
"""

from loom_dagster.core.job.status import (
    EXIT_BAD_INPUT,
    EXIT_DRAIN_TIMEOUT,
    EXIT_FLOW_FAILED,
    EXIT_STARTUP_FAILED,
    EXIT_STOPPED,
    JobStatus,
    SinkStatus,
    read_status,
    write_status,
)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_DRAIN_TIMEOUT",
    "EXIT_FLOW_FAILED",
    "EXIT_STARTUP_FAILED",
    "EXIT_STOPPED",
    "JobStatus",
    "SinkStatus",
    "read_status",
    "write_status",
]
