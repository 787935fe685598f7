"""Observe the Kafka source's polls: the "connected" (healthy) signal of a job.

loom 9 emits no event per poll cycle (``Scope.POLL_CYCLE`` wraps the whole run once) and no event
while a topic is idle, so the runtime wraps three methods of loom's bytewax Kafka source, in this
process only:

- ``KafkaPartitionedSource.list_parts``: the broker answered a metadata request;
- ``KafkaPartitionedSource.build_part``: a partition is being opened here (committed-offset fetch
  from the group coordinator, then ``assign``);
- ``_KafkaSourcePartition.next_batch``: one poll of an assigned partition returned.

A process is *connected* at its first completed poll. A process of a cluster that owns no
partition at all (more processes than partitions) never polls: it counts as connected
``NO_PARTITION_GRACE_S`` after its partition listing succeeded with no partition opened here.

If loom's internals move, :func:`install_poll_probe` returns ``None`` and the runtime falls back to
the first consumed record.
"""

from __future__ import annotations

import functools
import importlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NO_PARTITION_GRACE_S = 3.0
_MODULE = "loom.streaming.bytewax._runtime_io"
_MARK = "__loom_dagster_probe__"


@dataclass
class ProbeReading:
    """What the probe has seen so far."""

    listed_at: float | None = None
    partitions: int = 0
    first_poll_at: float | None = None
    last_poll_at: float | None = None

    def connected_at(self, now: float, grace_s: float = NO_PARTITION_GRACE_S) -> float | None:
        """When this process became healthy, or ``None`` if it has not yet."""
        if self.first_poll_at is not None:
            return self.first_poll_at
        if self.listed_at is not None and self.partitions == 0 and now - self.listed_at >= grace_s:
            return self.listed_at
        return None


class PollProbe:
    """Thread-safe recorder fed by the wrapped source methods."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reading = ProbeReading()

    def listed(self) -> None:
        """A partition listing succeeded."""
        now = time.time()
        with self._lock:
            if self._reading.listed_at is None:
                self._reading.listed_at = now

    def building(self) -> None:
        """A partition is being opened in this process."""
        with self._lock:
            self._reading.partitions += 1

    def polled(self) -> None:
        """One poll returned (with or without records)."""
        now = time.time()
        with self._lock:
            if self._reading.first_poll_at is None:
                self._reading.first_poll_at = now
            self._reading.last_poll_at = now

    def reading(self) -> ProbeReading:
        """A copy of what was seen."""
        with self._lock:
            r = self._reading
            return ProbeReading(r.listed_at, r.partitions, r.first_poll_at, r.last_poll_at)


_ACTIVE: PollProbe | None = None


def _after(method: Callable[..., Any], hook: Callable[[PollProbe], None]) -> Callable[..., Any]:
    """Wrap ``method`` so that ``hook`` runs after it returned normally."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        probe = _ACTIVE
        if probe is not None:
            hook(probe)
        return result

    setattr(wrapper, _MARK, method)
    return wrapper


def _before(method: Callable[..., Any], hook: Callable[[PollProbe], None]) -> Callable[..., Any]:
    """Wrap ``method`` so that ``hook`` runs before it."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        probe = _ACTIVE
        if probe is not None:
            hook(probe)
        return method(*args, **kwargs)

    setattr(wrapper, _MARK, method)
    return wrapper


_TARGETS: tuple[tuple[str, str, str], ...] = (
    ("KafkaPartitionedSource", "list_parts", "after"),
    ("KafkaPartitionedSource", "build_part", "before"),
    ("_KafkaSourcePartition", "next_batch", "after"),
)
_HOOKS: dict[str, Callable[[PollProbe], None]] = {
    "list_parts": PollProbe.listed,
    "build_part": PollProbe.building,
    "next_batch": PollProbe.polled,
}


def install_poll_probe() -> PollProbe | None:
    """Wrap loom's Kafka source methods once per process and return the active probe.

    Returns ``None`` (and changes nothing) if the expected classes or methods are missing.
    """
    global _ACTIVE
    try:
        module = importlib.import_module(_MODULE)
        methods = [(getattr(module, cls), name, where) for cls, name, where in _TARGETS]
        for owner, name, _ in methods:
            if not callable(getattr(owner, name, None)):
                return None
    except (ImportError, AttributeError):
        return None
    for owner, name, where in methods:
        current = getattr(owner, name)
        if hasattr(current, _MARK):
            continue
        wrap = _after if where == "after" else _before
        setattr(owner, name, wrap(current, _HOOKS[name]))
    _ACTIVE = PollProbe()
    return _ACTIVE
