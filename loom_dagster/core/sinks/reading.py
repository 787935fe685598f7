"""``SinkReading``: what a sink's own metadata says right now (a msgspec Struct, kept in sensor cursors),
and the small value helpers every reader uses."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, cast

import msgspec

from loom_dagster.core.flows.records import SinkBackend
from loom_dagster.core.sinks.targets import SinkTarget, scrub

JsonScalar = str | int | float | bool | None


class ReadStatus(StrEnum):
    """Outcome of reading one sink's metadata."""

    OK = "ok"
    MISSING = "missing"
    UNREACHABLE = "unreachable"
    ERROR = "error"


class SinkReading(msgspec.Struct, frozen=True):
    """What a sink's metadata says right now.

    ``marker`` changes exactly when new data landed (Delta: version of the latest data commit;
    ClickHouse: rows and block numbers of active parts; SQL: row count or max timestamp); it is
    ``None`` while the table holds no data. ``last_modified`` is when data last landed according to the
    table itself (epoch s), when it knows. ``rows``: total rows (ClickHouse, SQL count) or rows written
    by the latest data commit (Delta). ``rows_added``: since the ``previous`` reading given to the reader.

    Example:
        >>> r = SinkReading("delta/t", SinkBackend.DELTA, ReadStatus.OK, 1.0, marker="3", version=3)
        >>> SinkReading.from_json(r.to_json()) == r, r.to_json()["backend"]
        (True, 'delta')
    """

    asset_key: str
    backend: SinkBackend
    status: ReadStatus
    read_at: float
    marker: str | None = None
    version: int | None = None
    last_modified: float | None = None
    rows: int | None = None
    rows_added: int | None = None
    read_ms: float = 0.0
    error: str | None = None
    extra: Mapping[str, JsonScalar] = msgspec.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the read succeeded."""
        return self.status is ReadStatus.OK

    @property
    def has_data(self) -> bool:
        """Whether the table exists and holds data."""
        return self.ok and self.marker is not None

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (for sensor cursors); secrets are never part of a reading."""
        return cast("dict[str, Any]", msgspec.to_builtins(self))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SinkReading:
        """Inverse of ``to_json`` (a null ``read_ms`` or ``extra`` takes its default).

        Raises:
            ValueError: if a required key is missing or a value has the wrong type.
        """
        present = {k: v for k, v in data.items() if not (v is None and k in ("read_ms", "extra"))}
        return msgspec.convert(present, cls, strict=False)


def failed(target: SinkTarget, status: ReadStatus, message: str, now: float) -> SinkReading:
    """A reading that says why the sink could not be read."""
    return SinkReading(target.asset_key, target.backend, status, now, error=scrub(message, target.secrets))


def rows_difference(rows: int, previous: SinkReading | None) -> int | None:
    """Rows added since *previous* (``None`` without a previous row count)."""
    return rows - previous.rows if previous is not None and previous.rows is not None else None


def as_int(value: Any) -> int | None:
    """An int from a metadata/JSON value; ``None`` for bools, missing or non-numeric values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def to_epoch(value: Any) -> float | None:
    """Epoch seconds of a timestamp column value: datetime (naive = UTC), date, number or ISO string."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC).timestamp()
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number / 1000.0 if number > 1e11 else number
