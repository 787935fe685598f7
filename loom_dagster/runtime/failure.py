"""Turn an exception (often a chain of bytewax errors around the real cause) into one clean line."""

from __future__ import annotations

import re

from loom_dagster.runtime.redact import redact

_BYTEWAX_LOCATION = re.compile(r"^\(src/[^)]*\):\s*")
MAX_REASON_CHARS = 600


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` followed by its causes/contexts, outermost first (cycles cut)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def interrupted(exc: BaseException) -> bool:
    """True if ``exc`` is, or was caused by, a ``KeyboardInterrupt`` (a signal-initiated drain)."""
    return any(isinstance(item, KeyboardInterrupt) for item in exception_chain(exc))


def _text(exc: BaseException) -> str:
    message = _BYTEWAX_LOCATION.sub("", str(exc).strip())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def one_line_reason(exc: BaseException) -> str:
    """Root cause first, then the step that hit it, on one redacted line.

    Example:
        ``KafkaException: KafkaError{code=_TRANSPORT,...} (while: error calling
        `FixedPartitionSource.list_parts` in step "orders.source")``
    """
    chain = exception_chain(exc)
    root = chain[-1]
    reason = _text(root)
    if len(chain) > 1:
        context = _BYTEWAX_LOCATION.sub("", str(chain[-2]).strip())
        if context and context not in reason:
            reason = f"{reason} (while: {context})"
    reason = " | ".join(part.strip() for part in reason.splitlines() if part.strip())
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS] + "..."
    return redact(reason)
