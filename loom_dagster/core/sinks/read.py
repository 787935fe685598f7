"""Read sinks: one reading per target, dispatched to its backend's reader, in threads. Never raises:
a failure is a reading with a status and a secret-free message."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from msgspec.structs import replace as replace_struct

from loom_dagster.core.flows.records import SinkBackend
from loom_dagster.core.sinks.connections import DEFAULT_TIMEOUT_S
from loom_dagster.core.sinks.read_clickhouse import read_clickhouse
from loom_dagster.core.sinks.read_delta import read_delta
from loom_dagster.core.sinks.read_sql import read_sql
from loom_dagster.core.sinks.reading import ReadStatus, SinkReading, failed
from loom_dagster.core.sinks.targets import SinkTarget, scrub


def read_sink(
    target: SinkTarget, previous: SinkReading | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> SinkReading:
    """Read one sink's metadata; never raises (failures are readings with a status and message)."""
    started = time.perf_counter()
    now = time.time()
    prior = previous if previous is not None and previous.ok else None
    try:
        if target.backend is SinkBackend.DELTA:
            reading = read_delta(target, prior, now=now, timeout_s=timeout_s)
        elif target.backend is SinkBackend.CLICKHOUSE:
            reading = read_clickhouse(target, prior, now=now, timeout_s=timeout_s)
        else:
            reading = read_sql(target, prior, now=now, timeout_s=timeout_s)
    except Exception as exc:  # a reader bug must not take the whole tick down
        reading = failed(target, ReadStatus.ERROR, f"{type(exc).__name__}: {exc}", now)
    elapsed = round((time.perf_counter() - started) * 1000, 2)
    error = scrub(reading.error, target.secrets) if reading.error else None
    return replace_struct(reading, read_ms=elapsed, error=error)


def read_sinks(
    targets: Sequence[SinkTarget],
    previous: Mapping[str, SinkReading] | None = None,
    *,
    max_workers: int = 16,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[SinkReading]:
    """Read every target (in threads), in order; ``previous`` is keyed by asset key."""
    prior = previous or {}

    def one(target: SinkTarget) -> SinkReading:
        return read_sink(target, prior.get(target.asset_key), timeout_s=timeout_s)

    if len(targets) <= 1 or max_workers <= 1:
        return [one(t) for t in targets]
    with ThreadPoolExecutor(
        max_workers=min(max_workers, len(targets)), thread_name_prefix="sink-health"
    ) as pool:
        return list(pool.map(one, targets))
