"""Errors raised by loom-dagster, each naming the flow and what to do about it.

Every error leaving the package is redacted here, once (:mod:`loom_dagster.core.redact`): the text of a
:class:`LoomDagsterError` (``str``, ``repr``, ``args``), and the exceptions chained to it
(``__cause__``/``__context__``: a flow module's own ``RuntimeError`` carrying a DSN, a driver's error).
Where a chained exception's text holds a secret, reading the chain gives a :class:`RedactedError`
standing in for it: its class name, its text redacted, its traceback, its own chain redacted the same
way. So a ``dg.Failure`` raised ``from`` one of these errors, a code location that fails to load, a
traceback printed with :mod:`traceback` and the ``loom-dagster`` CLI all show no secret.
"""

from __future__ import annotations

import threading
import traceback
import weakref
from typing import Any

from loom_dagster.core.redact import redact_text

_CAUSE: Any = BaseException.__dict__["__cause__"]
_CONTEXT: Any = BaseException.__dict__["__context__"]
_REDACTED: weakref.WeakKeyDictionary[BaseException, dict[str, tuple[Any, Any]]] = weakref.WeakKeyDictionary()
"""Per error, its chained exceptions as read last (real, redacted): outside the error, so that it
pickles as before."""
_REDACTED_LOCK = threading.Lock()


class LoomDagsterError(Exception):
    """Base class of every error loom-dagster raises on purpose; its text and chain are redacted."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact_text(arg) if isinstance(arg, str) else arg for arg in args))

    def __str__(self) -> str:
        return redact_text(super().__str__())

    @property  # type: ignore[override]
    def __cause__(self) -> BaseException | None:
        """The exception this one was raised from, redacted (see :func:`redacted_chain`)."""
        return self._redacted("cause", _CAUSE.__get__(self))

    @__cause__.setter
    def __cause__(self, value: BaseException | None) -> None:
        _CAUSE.__set__(self, value)

    @property  # type: ignore[override]
    def __context__(self) -> BaseException | None:
        """The exception being handled when this one was raised, redacted."""
        return self._redacted("context", _CONTEXT.__get__(self))

    @__context__.setter
    def __context__(self, value: BaseException | None) -> None:
        _CONTEXT.__set__(self, value)

    def _redacted(self, slot: str, real: BaseException | None) -> BaseException | None:
        """``redacted_chain(real)``, computed once per chained exception (the same object every read)."""
        if real is None:
            return None
        with _REDACTED_LOCK:
            cached = _REDACTED.setdefault(self, {}).get(slot)
        if cached is not None and cached[0] is real:
            return cached[1]  # type: ignore[no-any-return]
        clean = redacted_chain(real)
        with _REDACTED_LOCK:
            _REDACTED.setdefault(self, {})[slot] = (real, clean)
        return clean


class RedactedError(Exception):
    """Stands in, in the chain of a :class:`LoomDagsterError`, for an exception whose text held a secret.

    Its text is ``<original class>: <original text, redacted>``; its traceback is the original's
    (or, when a source line of it shows a secret, the redacted stack is appended to the text).
    """

    def __init__(self, message: str, original_type: str = "") -> None:
        super().__init__(message)
        self.original_type = original_type

    @classmethod
    def standing_in_for(cls, original: BaseException, text: str) -> RedactedError:
        """The stand-in of *original*, whose redacted text is *text*."""
        kind = type(original)
        name = (
            kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        )
        return cls(f"{name}: {text}" if text else name, name)


def redacted_chain(exc: BaseException | None) -> BaseException | None:
    """*exc* itself when neither its text, its stack's source lines nor anything chained to it holds
    a secret; else a :class:`RedactedError` standing in for it (redacted text and notes, the same
    traceback, or the stack as redacted text when a source line shows a secret; its chain redacted
    the same way).

    Example:
        >>> redacted_chain(ValueError("no such table"))
        ValueError('no such table')
        >>> redacted_chain(RuntimeError("cannot reach postgresql://app:s3cret@db/shop"))
        RedactedError('RuntimeError: cannot reach postgresql://app:***@db/shop')
    """
    return _redacted_chain(exc, {})


def _redacted_chain(exc: BaseException | None, seen: dict[int, BaseException | None]) -> BaseException | None:
    if exc is None or isinstance(exc, LoomDagsterError | RedactedError):
        return exc  # ours redact themselves
    if id(exc) in seen:
        return seen[id(exc)]
    seen[id(exc)] = None  # a cycle in the chain is cut here
    text = _text(exc)
    clean = redact_text(text)
    notes = [str(note) for note in getattr(exc, "__notes__", None) or ()]
    clean_notes = [redact_text(note) for note in notes]
    stack = "".join(traceback.format_tb(exc.__traceback__)) if exc.__traceback__ is not None else ""
    clean_stack = redact_text(stack)
    real_cause, real_context = _CAUSE.__get__(exc), _CONTEXT.__get__(exc)
    cause = _redacted_chain(real_cause, seen)
    context = _redacted_chain(real_context, seen)
    clean_texts = clean == text and clean_notes == notes and clean_stack == stack
    if clean_texts and cause is real_cause and context is real_context:
        seen[id(exc)] = exc
        return exc
    if clean_stack == stack:
        stand_in = RedactedError.standing_in_for(exc, clean).with_traceback(exc.__traceback__)
    else:  # a source line of the stack shows a secret (a literal DSN): the stack goes in as text
        stand_in = RedactedError.standing_in_for(
            exc, f"{clean}\nTraceback (redacted):\n{clean_stack.rstrip()}"
        )
    stand_in.__cause__ = cause
    stand_in.__context__ = context
    stand_in.__suppress_context__ = exc.__suppress_context__
    if clean_notes:
        stand_in.__notes__ = clean_notes
    seen[id(exc)] = stand_in
    return stand_in


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__: the class name says enough
        return ""


class FlowLoadError(LoomDagsterError):
    """A flow could not be imported, is not a StreamFlow, or its config could not be loaded."""


class FlowCompileError(LoomDagsterError):
    """loom refused to compile a flow against its config."""


class LineageMismatchError(LoomDagsterError):
    """The compiled plan's sinks disagree with the sink assets declared in the asset graph."""


class DuplicateAssetKeyError(LoomDagsterError):
    """Two flows (or a flow and a sink) map to the same asset key in conflicting roles."""


class DeploymentError(LoomDagsterError):
    """A deployment could not be launched, did not become healthy, or could not be stopped."""
