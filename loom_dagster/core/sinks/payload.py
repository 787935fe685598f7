"""A sink's payload as the table checks see it: the columns loom writes (``PayloadField``), each with a type
category, and which column categories accept which payload categories."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from loom_dagster.core.flows.columns import column_type

_ACCEPTS: dict[str, frozenset[str]] = {
    "string": frozenset({"string"}),
    "integer": frozenset({"integer", "floating"}),
    "floating": frozenset({"floating"}),
    "decimal": frozenset({"floating"}),
    "boolean": frozenset({"boolean", "integer"}),
    "binary": frozenset({"binary", "string"}),
    "timestamp": frozenset({"timestamp"}),
    "date": frozenset({"date"}),
    "time": frozenset({"time", "string"}),
    "uuid": frozenset({"uuid", "string"}),
    "json": frozenset({"json", "string"}),
    "list": frozenset({"list"}),
    "map": frozenset({"map", "struct", "json"}),
    "struct": frozenset({"struct", "map", "json", "string"}),
}
"""Column categories a payload category can be written into without failing or losing data."""
_PAYLOAD_CATEGORY = {
    "string": "string", "int64": "integer", "float64": "floating", "bool": "boolean",
    "binary": "binary", "timestamp": "timestamp", "date": "date", "time": "time", "uuid": "uuid",
    "decimal": "decimal",
}  # fmt: skip


@dataclass(frozen=True)
class PayloadField:
    """One payload column as loom writes it: name, readable type, category, nullability."""

    name: str
    type: str
    category: str | None
    nullable: bool
    spec: msgspec.inspect.Type = field(repr=False)


def payload_fields(payload: Any) -> tuple[PayloadField, ...]:
    """The columns loom writes for *payload*: loom's column fields, typed from the msgspec struct."""
    from loom.core.model.introspection import get_column_fields

    info = msgspec.inspect.type_info(payload)
    if not isinstance(info, msgspec.inspect.StructType):
        raise TypeError(f"payload {payload!r} is not a msgspec struct")
    names = set(get_column_fields(payload))
    found = []
    for f in info.fields:
        if f.name not in names:
            continue
        type_name, nullable = column_type(f.type)
        found.append(PayloadField(f.name, type_name, _payload_category(type_name), nullable, f.type))
    return tuple(found)


def _payload_category(type_name: str) -> str | None:
    for prefix, category in (("list<", "list"), ("map<", "map"), ("struct<", "struct")):
        if type_name.startswith(prefix):
            return category
    return _PAYLOAD_CATEGORY.get(type_name)


def compatible(expected: str | None, actual: str | None) -> bool:
    """Whether a value of payload category *expected* can be written into a column of category *actual*
    (unknown categories are not judged)."""
    if expected is None or actual is None:
        return True
    return actual in _ACCEPTS.get(expected, frozenset({expected}))
