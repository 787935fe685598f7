"""Samples and windows of every watched partition, and the compact cursor that carries them between
sensor ticks. No Dagster here."""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

import msgspec

from loom_dagster.core.kafka.offsets import LagFetch

CURSOR_VERSION = 1
CURSOR_COMPRESS_ABOVE = 4096
"""Cursors longer than this (characters of JSON) are stored zlib-compressed."""
_ZLIB_PREFIX = "z1:"


class LagSample(msgspec.Struct, frozen=True):
    """One observation of a partition: when, its end offset, the group's committed offset."""

    ts: float
    end: int
    committed: int | None

    @property
    def lag(self) -> int | None:
        """Messages behind (``None`` without a committed offset; never negative)."""
        return None if self.committed is None else max(0, self.end - self.committed)


class PartitionWindow(msgspec.Struct, frozen=True):
    """The last samples of one partition (oldest first) and since when its committed offset is unchanged."""

    topic: str
    partition: int
    samples: tuple[LagSample, ...] = ()
    since: float | None = None

    def add(self, sample: LagSample, size: int, max_age_s: float | None = None) -> PartitionWindow:
        """This window with *sample* appended, capped to *size* samples and *max_age_s* seconds."""
        previous = self.samples[-1] if self.samples else None
        moved = previous is None or previous.committed != sample.committed
        kept = [s for s in self.samples if max_age_s is None or sample.ts - s.ts <= max_age_s]
        samples = tuple([*kept, sample][-max(1, size) :])
        return PartitionWindow(self.topic, self.partition, samples, sample.ts if moved else self.since)


class LagWindows(msgspec.Struct, frozen=True):
    """Windows of every watched partition, by target name: what a sensor cursor carries between ticks."""

    flows: Mapping[str, Mapping[tuple[str, int], PartitionWindow]] = msgspec.field(default_factory=dict)

    def for_target(self, name: str) -> Mapping[tuple[str, int], PartitionWindow]:
        """The windows of one target (empty if unseen)."""
        return self.flows.get(name, {})

    def to_json(self) -> str:
        """Compact JSON for a cursor (see ``_encode_flow``): ``{"v": 1, "f": {name: {"t": [...], "p": {...}}}}``."""
        flows = {name: _encode_flow(parts) for name, parts in sorted(self.flows.items())}
        return json.dumps({"v": CURSOR_VERSION, "f": flows}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> LagWindows:
        """Inverse of ``to_json``; an empty, foreign or older cursor gives empty windows."""
        try:
            data = json.loads(text) if text else {}
            if not isinstance(data, dict) or data.get("v") != CURSOR_VERSION:
                return cls()
            return cls({name: _decode_flow(raw) for name, raw in data["f"].items()})
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            return cls()

    def to_cursor(self) -> str:
        """``to_json``, zlib-compressed (``z1:`` + base64) when longer than ``CURSOR_COMPRESS_ABOVE``.

        Dagster keeps the cursor on every tick row (7 days for skipped ticks), so its size counts.
        """
        text = self.to_json()
        if len(text) <= CURSOR_COMPRESS_ABOVE:
            return text
        return _ZLIB_PREFIX + base64.b64encode(zlib.compress(text.encode(), 9)).decode()

    @classmethod
    def from_cursor(cls, cursor: str | None) -> LagWindows:
        """Inverse of ``to_cursor``; an unreadable cursor gives empty windows."""
        if cursor and cursor.startswith(_ZLIB_PREFIX):
            try:
                cursor = zlib.decompress(base64.b64decode(cursor[len(_ZLIB_PREFIX) :])).decode()
            except (ValueError, zlib.error):
                return cls()
        return cls.from_json(cursor)


def _encode_flow(parts: Mapping[tuple[str, int], PartitionWindow]) -> dict[str, Any]:
    """One flow's windows, small: the partitions of a flow are sampled at the same ticks.

    ``t``: the flow's tick times in centiseconds, the first absolute, then deltas. ``p``: per
    ``"topic:partition"`` a row ``[since - first tick, end, end - committed, Δend, end - committed, ...]``
    with one (end, lag) pair per tick: the first end absolute, then deltas; ``null`` pairs for ticks without
    a sample, a ``null`` lag for no committed offset.
    """
    ticks = sorted({_centis(s.ts) for w in parts.values() for s in w.samples})
    index = {t: i for i, t in enumerate(ticks)}
    rows: dict[str, list[int | None]] = {}
    for (topic, partition), window in sorted(parts.items()):
        if not window.samples:
            continue
        row: list[int | None] = [None] * (1 + 2 * len(ticks))
        row[0] = None if window.since is None else _centis(window.since) - ticks[0]
        previous: int | None = None
        for sample in window.samples:
            at = 1 + 2 * index[_centis(sample.ts)]
            row[at] = sample.end if previous is None else sample.end - previous
            row[at + 1] = None if sample.committed is None else sample.end - sample.committed
            previous = sample.end
        rows[f"{topic}:{partition}"] = row
    deltas = [b - a for a, b in pairwise(ticks)]
    return {"t": ticks[:1] + deltas, "p": rows}


def _decode_flow(raw: Mapping[str, Any]) -> dict[tuple[str, int], PartitionWindow]:
    """Inverse of ``_encode_flow``."""
    ticks: list[int] = []
    for value in raw["t"]:
        ticks.append(int(value) + (ticks[-1] if ticks else 0))
    out: dict[tuple[str, int], PartitionWindow] = {}
    for key, row in raw["p"].items():
        topic, _, part = key.rpartition(":")
        samples: list[LagSample] = []
        previous: int | None = None
        for i, tick in enumerate(ticks):
            end, lag = row[1 + 2 * i], row[2 + 2 * i]
            if end is None:
                continue
            previous = int(end) if previous is None else previous + int(end)
            samples.append(LagSample(tick / 100, previous, None if lag is None else previous - int(lag)))
        since = None if row[0] is None else (ticks[0] + int(row[0])) / 100
        out[(topic, int(part))] = PartitionWindow(topic, int(part), tuple(samples), since)
    return out


def _centis(ts: float) -> int:
    return int(round(ts * 100))


def advance_windows(
    windows: LagWindows,
    fetch: LagFetch,
    *,
    size: int,
    at: float | None = None,
    max_age_s: float | None = None,
) -> LagWindows:
    """Windows with this fetch's samples appended (timestamp *at*, default the fetch time).

    Targets not in the fetch are dropped; partitions without an end offset keep their window unchanged.
    """
    flows: dict[str, dict[tuple[str, int], PartitionWindow]] = {}
    for name, offsets in fetch.targets.items():
        previous = windows.for_target(name)
        current: dict[tuple[str, int], PartitionWindow] = {}
        for part in offsets.partitions:
            key = (part.topic, part.partition)
            window = previous.get(key) or PartitionWindow(part.topic, part.partition)
            if part.end is not None and part.error is None:
                sample = LagSample(offsets.taken_at if at is None else at, part.end, part.committed)
                window = window.add(sample, size, max_age_s)
            current[key] = window
        flows[name] = current
    return LagWindows(flows)
