"""A defs-state refresh worker: ``python -m loom_dagster.core.flows.refresh_worker``, started and driven by
:mod:`loom_dagster.core.flows.refresh_pool` over its stdin and stdout (one flow at a time). Not for direct use.

The worker side of the pool lives here, the parent side in ``refresh_pool``: the worker imports the
defs state (to refresh an entry exactly as the serial refresh does), which imports the pool.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import time
import traceback
from typing import Any

import msgspec

from loom_dagster.core.flows.defs_state import refresh_entry
from loom_dagster.core.flows.refresh_pool import WorkerResult, receive, send
from loom_dagster.core.flows.spec import LoomFlowSpec
from loom_dagster.core.redact import redact_text


class _Collect(logging.Handler):
    """Keeps the records a task emits, to send them back with its result."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format: send what there is
            message = str(record.msg)
        exc_text = logging.Formatter().formatException(record.exc_info) if record.exc_info else None
        self.records.append(
            {
                "name": record.name,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "msg": message,
                "args": None,
                "pathname": record.pathname,
                "filename": record.filename,
                "module": record.module,
                "lineno": record.lineno,
                "funcName": record.funcName,
                "created": record.created,
                "msecs": record.msecs,
                "exc_text": exc_text,
                "processName": record.processName,
                "process": record.process,
            }
        )


_COLLECT: _Collect | None = None


def serve() -> None:
    """The worker's loop (``python -m loom_dagster.core.flows.refresh_worker``): the parent's settings, then one
    ``(spec, key)`` at a time on stdin, each answered on stdout, until stdin ends."""
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # nothing a flow module does reads the requests
    os.dup2(2, 1)  # what a flow module prints goes to stderr, never into the replies
    hello = receive(requests)
    if hello is None:
        return
    sys.path[:] = hello["sys_path"]
    _init_worker(hello["level"])
    while (task := receive(requests)) is not None:
        spec, key = task
        try:
            reply: tuple[str, Any] = ("ok", _refresh_in_worker(spec, key))
        except Exception as exc:  # the flow's own error, sent back as it is
            reply = ("error", _portable(exc))
        send(replies, reply)
    # Done: exit now, as multiprocessing's workers do. Tearing down an interpreter holding loom and
    # hundreds of flow modules takes most of a second, which the parent would wait for.
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _portable(exc: BaseException) -> tuple[bytes | None, str, str]:
    """*exc* pickled (``None`` if it does not pickle), described, and its traceback (redacted)."""
    described = redact_text(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}")
    trace = redact_text("".join(traceback.format_exception(exc)))
    try:
        pickled = pickle.dumps(exc.with_traceback(None), protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(pickled)  # a class whose arguments do not rebuild it fails here, not in the parent
    except Exception:
        return None, described, trace
    return pickled, described, trace


def _init_worker(level: int) -> None:
    """Route this worker's log records (at the parent's root level) to its replies, nowhere else."""
    global _COLLECT
    _COLLECT = _Collect()
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_COLLECT)
    root.setLevel(level)


def _refresh_in_worker(spec: LoomFlowSpec, key: str) -> WorkerResult:
    """Import, compile and describe one flow (``defs_state.refresh_entry``): its entry as JSON."""
    started = time.perf_counter()
    if _COLLECT is not None:
        _COLLECT.records = []
    _, entry = refresh_entry(spec, key)
    records = _COLLECT.records if _COLLECT is not None else []
    return msgspec.json.encode(entry), time.perf_counter() - started, records


if __name__ == "__main__":
    serve()
