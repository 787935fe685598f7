"""How loom's own log lines look in a job log: one line per event, and one line per routed record.

Where the traceback per dead-lettered record came from (loom 9, measured): a step that raises is
caught by ``loom.streaming.bytewax._error_boundary._execute_in_boundary``, which calls
``logger.exception("unhandled_boundary_error", ...)`` (structlog, logger named after that module):
with structlog left unconfigured that is a rich traceback of ~60 lines per record. The same record
also produced, from loom's ``StructlogLifecycleObserver`` (logger ``loom.observability``), a NODE
``error`` line and a TERMINAL ``error_envelope`` ``end`` line, plus ~5 debug lines.

What the runtime does instead (:func:`configure_loom_logging`):

- structlog renders through the standard library at INFO (one ``key=value`` line per event), unless
  the flow's ``observability.log.config`` configures it (loom then does, later, and wins);
- a filter on the boundary's logger turns ``unhandled_boundary_error`` / ``managed_boundary_error``
  into one line: error kind, error type and message, the error topic the record went to
  (``error_topic``), source topic/partition/offset. Its traceback is dropped; nothing else is;
- a filter on ``loom.observability`` drops the two lifecycle lines that repeat that line: the NODE
  ``error`` event raised inside an error boundary (only when the exception is one the boundary
  catches) and the TERMINAL ``error_envelope`` ``end`` event. Every other event passes.

Error topics come from the compiled plan (:func:`note_error_routes`); loom wires every step error to
the ``task`` route (``business`` included) and every router error to the ``routing`` route.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from loom_dagster.core.job.failure import clip
from loom_dagster.core.redact import redact_text

BOUNDARY_LOGGER = "loom.streaming.bytewax._error_boundary"
LIFECYCLE_LOGGER = "loom.observability"
BOUNDARY_EVENTS = frozenset({"unhandled_boundary_error", "managed_boundary_error"})
NO_ROUTE = "(no error route: dropped)"
MAX_REASON_CHARS = 500
_BOUNDARY_FUNCTIONS = frozenset({"_execute_in_boundary", "_execute_batch_in_boundary"})
_error_topics: dict[str, str] = {}


def note_error_routes(runner: Any) -> None:
    """Remember each error kind's topic from a compiled runner's plan (``plan.error_routes``)."""
    routes = getattr(getattr(runner, "_plan", None), "error_routes", None) or {}
    _error_topics.clear()
    for kind, sink in routes.items():
        _error_topics[str(getattr(kind, "value", kind))] = str(getattr(sink, "topic", sink))


def error_topic(kind: object) -> str:
    """The topic a record of this error kind goes to (loom's wiring: steps -> task route)."""
    route = "routing" if str(kind) == "routing" else "task"
    return _error_topics.get(route, NO_ROUTE)


def _value(item: object) -> str:
    return str(getattr(item, "value", item))


def _event_dict(record: logging.LogRecord) -> dict[str, Any] | None:
    """The structlog event dict a record carries (``ProcessorFormatter.wrap_for_formatter``)."""
    return record.msg if isinstance(record.msg, dict) else None


def _one_line(text: object) -> str:
    return clip(redact_text(str(text)).replace("\r", "").replace("\n", " \\n "), MAX_REASON_CHARS)


class BoundaryErrorFilter(logging.Filter):
    """Turns a routed record's boundary error into one line (no traceback), with its error topic."""

    def filter(self, record: logging.LogRecord) -> bool:
        event = _event_dict(record)
        if event is None or event.get("event") not in BOUNDARY_EVENTS:
            return True
        exc = _exception_of(event.pop("exc_info", None))
        event.pop("exception", None)
        event.pop("stack", None)
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        if exc is not None:
            event["error_type"] = type(exc).__name__
        event["reason"] = _one_line(event.get("reason", exc if exc is not None else ""))
        event["error_topic"] = error_topic(event.get("kind"))
        return True


def _exception_of(exc_info: object) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        return exc_info[1] if isinstance(exc_info[1], BaseException) else None
    if exc_info:
        return sys.exc_info()[1]
    return None


class LifecycleDuplicateFilter(logging.Filter):
    """Drops the lifecycle lines that repeat a routed record's one line; passes everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        event = _event_dict(record)
        if event is None:
            return True
        scope, kind = _value(event.get("scope")), event.get("event")
        if scope == "terminal" and kind == "end" and event.get("name") == "error_envelope":
            return False
        return not (scope == "node" and kind == "error" and _inside_error_boundary())


def _inside_error_boundary() -> bool:
    """True when the exception being handled is an ``Exception`` raised under loom's error boundary
    (which catches it, routes the record and logs it on its own line)."""
    if not isinstance(sys.exc_info()[1], Exception):
        return False
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name in _BOUNDARY_FUNCTIONS and frame.f_globals.get("__name__") == BOUNDARY_LOGGER:
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class RedactingFormatter(logging.Formatter):
    """Formats with an inner formatter and masks credentials in the result."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(self.inner.format(record))


def configure_loom_logging(stream: Any) -> None:
    """Render loom's structlog events through stdlib logging on *stream* at INFO, one line each,
    redacted, and install the two filters."""
    _install_filters()
    try:
        import structlog
    except ImportError:  # loom always brings structlog; without it there is nothing to configure
        return
    shared = _shared_processors(structlog)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback),
        ],
        foreign_pre_chain=shared,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter(formatter))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("loom").setLevel(logging.INFO)
    # loom's lifecycle observer logs ~2 INFO lines per record (node end, sink_write end): at thousands of
    # records a second that is the whole log. Its warnings and errors still come through.
    logging.getLogger(LIFECYCLE_LOGGER).setLevel(logging.WARNING)


def _shared_processors(structlog: Any) -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S"),
    ]


def _install_filters() -> None:
    """Attach the filters once (they stay if loom reconfigures structlog from the flow's config)."""
    wanted: Mapping[str, type[logging.Filter]] = {
        BOUNDARY_LOGGER: BoundaryErrorFilter,
        LIFECYCLE_LOGGER: LifecycleDuplicateFilter,
    }
    for name, kind in wanted.items():
        logger = logging.getLogger(name)
        if not any(isinstance(item, kind) for item in logger.filters):
            logger.addFilter(kind())
