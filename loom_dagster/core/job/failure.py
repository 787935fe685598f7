"""Turn an exception (often a chain of bytewax errors around the real cause) into one clean line.

A reason is redacted as a whole (a PEM block or a YAML value spanning lines is recognized before the
lines are joined), then capped at ``MAX_REASON_CHARS`` keeping its head *and* its tail (loom puts
the remedy last, e.g. "list its id under checks.silenced"); a cut reason is logged in full first,
so the job's log always has the whole (redacted) text.
"""

from __future__ import annotations

import logging
import re

from loom_dagster.core.redact import redact_text

_BYTEWAX_LOCATION = re.compile(r"^\(src/[^)]*\):\s*")
MAX_REASON_CHARS = 8000
"""Cap of a failure reason in the status record and everything built from it (Dagster errors)."""

log = logging.getLogger("loom_dagster.runtime")


def clip(text: str, limit: int = MAX_REASON_CHARS, *, keep_tail: bool = True) -> str:
    """``text`` if it fits in *limit* characters, else ``head ... [N chars cut] ... tail``; with
    ``keep_tail=False``, its head and ``...`` (error texts of check descriptions, OpenLineage events).
    Never redacts: redact the text before clipping it.

    Example:
        >>> clip("a" * 50 + "remedy: do X", limit=42)
        'aaaaaaaaa ... [44 chars cut] ... edy: do X'
        >>> clip("a" * 50 + "remedy: do X", limit=12, keep_tail=False)
        'aaaaaaaaa...'
    """
    if len(text) <= limit:
        return text
    if not keep_tail:
        return text[: limit - 3] + "..."
    keep = limit - len(f" ... [{len(text)} chars cut] ... ")  # the widest the marker can be
    if keep <= 0:
        return text[:limit]
    head = keep // 2
    cut = len(text) - keep
    return f"{text[:head]} ... [{cut} chars cut] ... {text[len(text) - (keep - head) :]}"


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
    """Root cause first, then the step that hit it, on one redacted line of at most ``MAX_REASON_CHARS``.

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
    # Redacted while still multi-line (a PEM block, a YAML value under a secret key span lines), then joined.
    reason = " | ".join(part.strip() for part in redact_text(reason).splitlines() if part.strip())
    if len(reason) > MAX_REASON_CHARS:
        log.error(
            "failure reason in full (%d chars; the status record keeps head and tail): %s",
            len(reason),
            reason,
        )
    return clip(reason)
