"""Payload contracts: the struct description (``core.contracts.shape``) and the writer/reader comparison
(``core.contracts.compare``), checked against real msgspec decoding through loom's own codec."""

from __future__ import annotations

import datetime
import enum
import uuid
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loom.core.model import LoomStruct
from loom.streaming.kafka import MessageDescriptor, MsgspecCodec, build_message

from loom_dagster.core.contracts.compare import Finding, compare_contracts, compare_with_readers
from loom_dagster.core.contracts.shape import PayloadContract, payload_contract, type_text


class Color(enum.Enum):
    RED = "r"
    GREEN = "g"


class Red(enum.Enum):
    RED = "r"


class Point(msgspec.Struct):
    x: int


class PointF(msgspec.Struct):
    x: float


class PointXY(msgspec.Struct):
    x: int
    y: str


class PointXYd(msgspec.Struct):
    x: int
    y: str = "d"


class Tree(msgspec.Struct):
    value: int
    children: list[Tree] = []


def contract(cls: Any) -> PayloadContract:
    found = payload_contract(cls)
    assert found is not None
    return found


def breaking(writer: Any, reader: Any) -> dict[str, Finding]:
    return {f.path: f for f in compare_contracts(contract(writer), contract(reader)) if f.breaking}


def compatible(writer: Any, reader: Any) -> dict[str, Finding]:
    return {f.path: f for f in compare_contracts(contract(writer), contract(reader)) if not f.breaking}


# --------------------------------------------------------------------------- the description


def test_description_of_every_kind_of_field() -> None:
    class Order(LoomStruct, forbid_unknown_fields=True, rename="camel"):
        __loom_message_type__ = "shop.order"
        __loom_message_version__ = 3
        order_id: str
        amount: float | None
        lines: list[Point]
        tags: dict[str, list[int]]
        color: Color = Color.RED
        kind: Literal["a", "b"] = "a"
        when: datetime.datetime | None = None
        pair: tuple[int, str] = (1, "x")
        tree: Tree | None = None

    c = contract(Order)
    assert (c.message_type, c.message_version, c.struct) == (
        "shop.order",
        3,
        f"{__name__}.{Order.__qualname__}",
    )
    root = c.root
    assert root.forbid_unknown_fields and not root.array_like
    described = {f.name: (type_text(f.type, c), f.required, f.default) for f in root.fields}
    assert described == {
        "orderId": ("str", True, None),
        "amount": ("float | None", True, None),
        "lines": ("list[Point]", True, None),
        "tags": ("dict[str, list[int]]", True, None),
        "color": ("Color{'r', 'g'}", False, "Color.RED"),
        "kind": ("Literal['a', 'b']", False, "'a'"),
        "when": ("datetime | None", False, "None"),
        "pair": ("tuple[int, str]", False, "(1, 'x')"),
        "tree": ("Tree | None", False, "None"),
    }
    # nested structs once each, the recursive one referring to itself
    assert [s.name.rsplit(".", 1)[-1] for s in c.structs] == [
        Order.__qualname__.rsplit(".", 1)[-1],
        "Point",
        "Tree",
    ]
    tree = c.shape(f"{__name__}.Tree")
    assert tree is not None and type_text(tree.fields[1].type, c) == "list[Tree]"
    assert c.describe()["flags"] == ["forbid_unknown_fields"]


def test_contract_defaults_and_non_structs() -> None:
    class Plain(LoomStruct):
        id: str

    c = contract(Plain)
    assert c.message_type == Plain.loom_message_type() and c.message_version == 1
    assert payload_contract(int) is None
    assert payload_contract(contract) is None  # not a type at all
    assert payload_contract(Plain) is c  # computed once per class


def test_contracts_round_trip_through_msgpack() -> None:
    c = contract(Tree)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(c), type=PayloadContract) == c


# --------------------------------------------------------------------------- the comparison


class V1(LoomStruct):
    __loom_message_type__ = "chain.row"
    id: str
    amount: float
    note: str | None = None


class V1Renamed(LoomStruct):
    __loom_message_type__ = "chain.row"
    id: str
    total: float
    note: str | None = None


class V1Added(LoomStruct):
    __loom_message_type__ = "chain.row"
    id: str
    amount: int
    note: str | None = None
    region: str = "eu"


class V1Nullable(LoomStruct):
    __loom_message_type__ = "chain.row"
    id: str
    amount: float | None
    note: str | None = None


class V1Strict(LoomStruct, forbid_unknown_fields=True):
    __loom_message_type__ = "chain.row"
    id: str
    amount: float


class V1NewRequired(LoomStruct):
    __loom_message_type__ = "chain.row"
    id: str
    amount: float
    currency: str


class V2(LoomStruct):
    __loom_message_type__ = "chain.row"
    __loom_message_version__ = 2
    id: str
    amount: float


class Other(LoomStruct):
    __loom_message_type__ = "chain.other"
    id: str
    amount: float


def test_same_struct_has_no_finding() -> None:
    assert compare_contracts(contract(V1), contract(V1)) == ()


def test_renamed_required_field_breaks_and_suggests_the_rename() -> None:
    found = breaking(V1Renamed, V1)
    assert list(found) == ["amount"]
    amount = found["amount"]
    assert amount.change == "missing from the writer"
    assert "Renamed? the writer has `total`" in amount.why
    assert "rename `total` back" in amount.fix and "default" in amount.fix
    assert compatible(V1Renamed, V1)["total"].change == "added in the writer"


def test_added_fields_and_widened_types_are_compatible_and_listed() -> None:
    assert breaking(V1Added, V1) == {}
    listed = compatible(V1Added, V1)
    assert listed["region"].change == "added in the writer"
    assert listed["amount"].change == "type int -> float"


def test_narrowed_type_and_null_break() -> None:
    assert breaking(V1, V1Added)["amount"].change == "type float -> int"
    null = breaking(V1Nullable, V1)["amount"]
    assert null.change == "nullable float | None -> float" and "null" in null.why
    assert compatible(V1, V1Nullable)["amount"].change == "type float -> float | None"


def test_reader_required_field_without_default_breaks() -> None:
    found = breaking(V1, V1NewRequired)
    assert list(found) == ["currency"]
    assert "default" in found["currency"].fix


def test_reader_default_is_used() -> None:
    assert compatible(V1Strict, V1)["note"].change == "missing from the writer"


def test_forbid_unknown_fields_reader_breaks_on_extra_fields() -> None:
    found = breaking(V1, V1Strict)
    assert list(found) == ["note"] and "forbid_unknown_fields" in found["note"].why


def test_message_type_and_version() -> None:
    assert set(breaking(Other, V1)) == {"<message_type>"}
    assert set(breaking(V2, V1)) == {"<message_version>", "note"} - {"note"}
    assert "__loom_message_version__" in breaking(V2, V1)["<message_version>"].why


def test_multi_type_reader_matches_by_message_type() -> None:
    matched, findings = compare_with_readers(contract(V1Added), (contract(Other), contract(V1)))
    assert matched == contract(V1) and not any(f.breaking for f in findings)

    class Third(LoomStruct):
        __loom_message_type__ = "chain.third"
        id: str

    matched, findings = compare_with_readers(contract(Third), (contract(Other), contract(V1)))
    assert matched is None and findings[0].breaking and "chain.other" in findings[0].why


def test_array_like_order_change_breaks() -> None:
    class AB(LoomStruct, array_like=True):
        __loom_message_type__ = "ab"
        a: int
        b: int

    class BA(LoomStruct, array_like=True):
        __loom_message_type__ = "ab"
        b: int
        a: int

    class ABMap(LoomStruct):
        __loom_message_type__ = "ab"
        a: int
        b: int

    for f in compare_contracts(contract(AB), contract(BA)):
        assert f.breaking and f.change.startswith("position"), f
    (only,) = [f for f in compare_contracts(contract(AB), contract(ABMap)) if f.breaking]
    assert "array_like" in only.change


def test_nested_struct_and_enum_findings_have_paths() -> None:
    class W(LoomStruct):
        __loom_message_type__ = "n"
        points: list[PointF]
        color: Color

    class R(LoomStruct):
        __loom_message_type__ = "n"
        points: list[Point]
        color: Red

    found = breaking(W, R)
    assert set(found) == {"points[].x", "color"}
    assert "'g'" in found["color"].why


# --------------------------------------------------------------------------- agreement with msgspec

WITNESSES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "int": (int, (0, -7, 2**40)),
    "float": (float, (0.5, -1.25)),
    "str": (str, ("x", "")),
    "bool": (bool, (True, False)),
    "bytes": (bytes, (b"\x00", b"\x01")),
    "int?": (int | None, (3, None, 4)),
    "float?": (float | None, (0.5, None, 1.5)),
    "str?": (str | None, ("s", None, "t")),
    "list[int]": (list[int], ([1, 2], [], [3])),
    "list[float]": (list[float], ([0.5], [], [1.5])),
    "set[int]": (set[int], ({4}, set(), {5})),
    "tuple[int,...]": (tuple[int, ...], ((1,), (1, 2, 3))),
    "tuple[int,int]": (tuple[int, int], ((1, 2), (3, 4))),
    "dict[str,int]": (dict[str, int], ({"a": 1}, {}, {"b": 2})),
    "dict[str,float]": (dict[str, float], ({"a": 0.5}, {}, {"b": 1.5})),
    "lit[a,b]": (Literal["a", "b"], ("a", "b")),
    "lit[a]": (Literal["a"], ("a",)),
    "Color": (Color, (Color.RED, Color.GREEN)),
    "Red": (Red, (Red.RED,)),
    "date": (datetime.date, (datetime.date(2024, 1, 2), datetime.date(1999, 12, 31))),
    "uuid": (uuid.UUID, (uuid.UUID(int=5), uuid.UUID(int=6))),
    "datetime(aware)": (
        datetime.datetime,
        (
            datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC),
            datetime.datetime(2020, 5, 6, tzinfo=datetime.UTC),
        ),
    ),
    "Point": (Point, (Point(1), Point(2))),
    "PointF": (PointF, (PointF(0.5), PointF(1.5))),
    "PointXY": (PointXY, (PointXY(1, "y"), PointXY(2, "z"))),
    "PointXYd": (PointXYd, (PointXYd(1), PointXYd(2, "e"))),
    "Point?": (Point | None, (Point(2), None, Point(5))),
    "list[Point]": (list[Point], ([Point(3)], [], [Point(4)])),
}
NAMES = ("a", "b", "c", "d")
"""A defaulted field defaults to its type's first witness, which omit_defaults leaves out of the message:
the other witnesses are what the writer sends in its place, so they cover every member and item type
(a union's non-null member, a container's items) again (single-valued types get no default)."""


@st.composite
def structs(draw: st.DrawFn, label: str) -> tuple[type[Any], list[tuple[str, str, bool]]]:
    """A LoomStruct with 0-4 fields of random witness types (some with defaults) and random flags."""
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=4))
    kinds = [draw(st.sampled_from(sorted(WITNESSES))) for _ in names]
    # a single-valued type gets no default: omit_defaults would leave it out of every message
    fields = [
        (n, k, len(WITNESSES[k][1]) > 1 and draw(st.booleans())) for n, k in zip(names, kinds, strict=True)
    ]
    specs: list[Any] = []
    for name, kind, has_default in fields:
        annotation, witnesses = WITNESSES[kind]
        if has_default:
            default = witnesses[0]
            if isinstance(default, list | dict | set | msgspec.Struct):  # mutable: a factory
                specs.append((name, annotation, msgspec.field(default_factory=lambda w=default: w)))
            else:
                specs.append((name, annotation, default))
        else:
            specs.append((name, annotation))
    cls = msgspec.defstruct(
        label,
        specs,
        bases=(LoomStruct,),
        kw_only=True,
        forbid_unknown_fields=draw(st.booleans()),
        array_like=draw(st.sampled_from([False, False, True])),
        omit_defaults=draw(st.booleans()),
        namespace={"__loom_message_type__": "agreement"},
    )
    return cls, fields


def writer_instances(cls: type[Any], fields: list[tuple[str, str, bool]]) -> list[Any]:
    """Instances covering every witness value of every field (others at their first witness), and one
    leaving every defaulted field at its default."""
    first = {name: WITNESSES[kind][1][0] for name, kind, _ in fields}
    out = [cls(**first), cls(**{n: first[n] for n, _, d in fields if not d})]
    for name, kind, _ in fields:
        for value in WITNESSES[kind][1][1:]:
            out.append(cls(**{**first, name: value}))
    return out


def decodes(writer: type[Any], instances: list[Any], reader: type[Any]) -> str | None:
    """``None`` when loom's codec decodes every instance as *reader*, else the first error."""
    codec = MsgspecCodec[Any]()
    descriptor = MessageDescriptor(message_type="agreement", message_version=1)
    for instance in instances:
        raw = codec.encode(build_message(instance, descriptor))
        try:
            codec.decode(raw, reader)
        except msgspec.ValidationError as exc:
            return f"{instance!r}: {exc}"
    return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_verdict_agrees_with_real_msgspec_decoding(data: st.DataObject) -> None:
    """The comparison says compatible exactly when loom's codec decodes every witness message the
    writer can send as the reader's struct. Field order of array_like structs is the one breaking change
    decoding cannot see (values land in the wrong field), so it is left out of the decode verdict."""
    writer, writer_fields = data.draw(structs("Writer"))
    reader, _ = data.draw(structs("Reader"))
    findings = compare_contracts(contract(writer), contract(reader))
    visible = [f for f in findings if f.breaking and not f.change.startswith("position ")]
    error = decodes(writer, writer_instances(writer, writer_fields), reader)
    assert (error is None) == (not visible), (
        f"writer {contract(writer).describe()}\nreader {contract(reader).describe()}\n"
        f"decode: {error}\nfindings: {[f.describe() for f in findings]}"
    )


@pytest.mark.parametrize(
    ("writer", "reader", "ok"),
    [
        (int, float, True),
        (float, int, False),
        (int, float | None, True),
        (datetime.date, str, True),
        (str, datetime.date, False),
        (bool, int, False),
        (tuple[int, ...], tuple[int, int], False),
        (Literal["a"], Literal["a", "b"], True),
    ],
)
def test_single_field_rules(writer: Any, reader: Any, ok: bool) -> None:
    w = msgspec.defstruct("W", [("v", writer)], bases=(LoomStruct,), namespace={"__loom_message_type__": "t"})
    r = msgspec.defstruct("R", [("v", reader)], bases=(LoomStruct,), namespace={"__loom_message_type__": "t"})
    assert (not breaking(w, r)) is ok
