"""The typed description of a payload struct (``PayloadContract``): what a reader needs to know to tell
whether it can decode what a writer sends.

Derived from the class with ``msgspec.inspect``: the message type (``loom_message_type()``, which honours
``__loom_message_type__``), the message version, and every field's wire name, type, whether it is
required (no default) and its default; nested structs (also recursive ones), lists, sets, tuples, dicts,
unions, enums and literals; the struct flags that change decoding (``forbid_unknown_fields``,
``array_like``, ``omit_defaults``, a tag).

The message version: loom 9 declares none on a struct (its envelope carries ``message_version``, 1 unless
an incoming message brought another). A struct declares its contract version with the class attribute
``__loom_message_version__`` (an int, default 1), as ``__loom_message_type__`` declares its type.
"""

from __future__ import annotations

import enum
import weakref
from typing import Any

import msgspec
import msgspec.inspect as mi

DEFAULT_MESSAGE_VERSION = 1
"""The version of a struct that declares no ``__loom_message_version__`` (what loom 9 writes)."""


class TypeShape(msgspec.Struct, frozen=True, omit_defaults=True):
    """One type in a payload: ``kind`` (``int``, ``str``, ``list``, ``dict``, ``struct``, ``union``,
    ``enum``, ``literal``...), its arguments (item, key/value, union members, fixed tuple items), the
    struct or enum it names (``ref``), enum/literal values, and validation constraints."""

    kind: str
    args: tuple[TypeShape, ...] = ()
    ref: str | None = None
    values: tuple[str | int | float | bool | None, ...] = ()
    constraints: tuple[tuple[str, str], ...] = ()


class FieldShape(msgspec.Struct, frozen=True, omit_defaults=True):
    """One field: its name on the wire, type, whether the struct requires it (no default), the default."""

    name: str
    type: TypeShape
    required: bool = True
    default: str | None = None
    omittable: bool = False
    """Whether the writer may leave it out of a message: an ``UNSET`` default, or ``omit_defaults`` with
    a default value (or a ``list``/``dict``/``set``/``bytearray`` factory, the ones msgspec omits)."""


class StructShape(msgspec.Struct, frozen=True, omit_defaults=True):
    """One struct (or dataclass, TypedDict, NamedTuple) and the flags that change how it decodes."""

    name: str
    fields: tuple[FieldShape, ...] = ()
    forbid_unknown_fields: bool = False
    array_like: bool = False
    omit_defaults: bool = False
    tag_field: str | None = None
    tag: str | int | None = None

    def field(self, name: str) -> FieldShape | None:
        """The field with wire name *name*, if any."""
        return next((f for f in self.fields if f.name == name), None)


class PayloadContract(msgspec.Struct, frozen=True, omit_defaults=True):
    """A payload struct as a contract: message type and version, the root struct and every struct it
    nests (``structs[0]`` is the root).

    Example:
        >>> from loom.core.model import LoomStruct
        >>> class Order(LoomStruct):
        ...     __loom_message_type__ = "shop.order"
        ...     id: str
        ...     amount: float | None = None
        >>> contract = payload_contract(Order)
        >>> (contract.message_type, contract.message_version)
        ('shop.order', 1)
        >>> [(f.name, type_text(f.type, contract), f.required) for f in contract.root.fields]
        [('id', 'str', True), ('amount', 'float | None', False)]
    """

    message_type: str
    struct: str
    structs: tuple[StructShape, ...]
    message_version: int = DEFAULT_MESSAGE_VERSION

    @property
    def root(self) -> StructShape:
        """The payload struct itself."""
        return self.structs[0]

    def shape(self, name: str | None) -> StructShape | None:
        """The nested struct called *name*."""
        return next((s for s in self.structs if s.name == name), None)

    def describe(self) -> dict[str, object]:
        """JSON-safe summary: type, version, struct and its fields (``name: type`` with ``= default``)."""
        root = self.root
        flags = [f for f in ("forbid_unknown_fields", "array_like", "omit_defaults") if getattr(root, f)]
        return {
            "struct": self.struct,
            "message_type": self.message_type,
            "message_version": self.message_version,
            "fields": [field_text(f, self) for f in root.fields],
            **({"flags": flags} if flags else {}),
        }


_CONTRACTS: weakref.WeakKeyDictionary[type[Any], PayloadContract | None] = weakref.WeakKeyDictionary()


def payload_contract(payload_type: Any) -> PayloadContract | None:
    """The contract of a payload struct class (computed once per class); ``None`` for what is not a
    struct-like class (``msgspec.inspect`` cannot describe it, or it is not a struct, dataclass,
    TypedDict or NamedTuple)."""
    try:
        return _CONTRACTS[payload_type]
    except (KeyError, TypeError):
        pass
    contract = _payload_contract(payload_type)
    try:
        _CONTRACTS[payload_type] = contract
    except TypeError:
        pass
    return contract


def _payload_contract(payload_type: Any) -> PayloadContract | None:
    try:
        info = mi.type_info(payload_type)
    except (TypeError, ValueError, AttributeError):
        return None
    info = _unwrap(info)
    if not isinstance(info, _STRUCT_LIKE):
        return None
    collector = _Collector()
    root = collector.struct(info)
    return PayloadContract(
        message_type=message_type(payload_type),
        struct=root,
        structs=tuple(collector.structs[n] for n in collector.order),
        message_version=message_version(payload_type),
    )


def message_type(cls: Any) -> str:
    """The struct's message type as loom names it (``loom_message_type()``, else ``module.qualname``)."""
    declared = getattr(cls, "__loom_message_type__", None)
    if declared is not None:
        return str(declared)
    method = getattr(cls, "loom_message_type", None)
    if callable(method):
        try:
            return str(method())
        except TypeError:
            pass
    return struct_name(cls)


def message_version(cls: Any) -> int:
    """The struct's declared contract version: ``__loom_message_version__``, else 1."""
    declared = getattr(cls, "__loom_message_version__", None)
    return (
        int(declared)
        if isinstance(declared, int) and not isinstance(declared, bool)
        else DEFAULT_MESSAGE_VERSION
    )


def struct_name(cls: Any) -> str:
    """``module.qualname`` of a class (its repr for a parametrised generic)."""
    qualname = getattr(cls, "__qualname__", None)
    if qualname is None:
        return repr(cls)
    return f"{getattr(cls, '__module__', '?')}.{qualname}"


_STRUCT_LIKE = (mi.StructType, mi.DataclassType, mi.TypedDictType, mi.NamedTupleType)

_SCALARS: dict[type[mi.Type], str] = {
    mi.StrType: "str",
    mi.IntType: "int",
    mi.FloatType: "float",
    mi.BoolType: "bool",
    mi.BytesType: "bytes",
    mi.ByteArrayType: "bytes",
    mi.MemoryViewType: "bytes",
    mi.DateTimeType: "datetime",
    mi.DateType: "date",
    mi.TimeType: "time",
    mi.TimeDeltaType: "timedelta",
    mi.UUIDType: "uuid",
    mi.DecimalType: "decimal",
    mi.AnyType: "any",
    mi.RawType: "any",
    mi.NoneType: "none",
    mi.ExtType: "ext",
}

_ARRAYS: dict[type[mi.Type], str] = {
    mi.ListType: "list",
    mi.SetType: "set",
    mi.FrozenSetType: "frozenset",
    mi.VarTupleType: "tuple",
}

_OMITTED_FACTORIES: tuple[Any, ...] = (list, dict, set, bytearray)
"""Default factories whose empty value ``omit_defaults`` leaves out (msgspec's rule)."""

_STRUCTURAL = frozenset(
    {"cls", "fields", "item_type", "item_types", "key_type", "value_type", "types", "values", "type"}
)


def _unwrap(info: mi.Type) -> mi.Type:
    while isinstance(info, mi.Metadata):
        info = info.type
    return info


class _Collector:
    """Walks a type, collecting each nested struct once (recursive structs refer to themselves by name)."""

    def __init__(self) -> None:
        self.structs: dict[str, StructShape] = {}
        self.order: list[str] = []

    def struct(self, info: Any) -> str:
        name = struct_name(info.cls)
        if name in self.structs or name in self.order:
            return name
        self.order.append(name)
        self.structs[name] = StructShape(name)  # placeholder while its fields are walked
        config = getattr(info.cls, "__struct_config__", None)
        omit_defaults = bool(getattr(config, "omit_defaults", False))
        self.structs[name] = StructShape(
            name=name,
            fields=tuple(self.field(f, omit_defaults) for f in info.fields),
            forbid_unknown_fields=bool(getattr(info, "forbid_unknown_fields", False)),
            array_like=bool(getattr(info, "array_like", False)) or isinstance(info, mi.NamedTupleType),
            omit_defaults=omit_defaults,
            tag_field=getattr(info, "tag_field", None),
            tag=getattr(info, "tag", None),
        )
        return name

    def field(self, field: mi.Field, omit_defaults: bool) -> FieldShape:
        default, omittable = None, False
        if not field.required:
            if field.default is not msgspec.NODEFAULT:
                default = _value_text(field.default)
                omittable = omit_defaults or field.default is msgspec.UNSET
            elif field.default_factory is not msgspec.NODEFAULT:
                default = f"{getattr(field.default_factory, '__name__', 'factory')}()"
                omittable = omit_defaults and field.default_factory in _OMITTED_FACTORIES
        return FieldShape(
            name=field.encode_name,
            type=self.type(field.type),
            required=field.required,
            default=default,
            omittable=omittable,
        )

    def type(self, info: mi.Type) -> TypeShape:
        info = _unwrap(info)
        constraints = _constraints(info)
        scalar = _SCALARS.get(type(info))
        if scalar is not None:
            return TypeShape(scalar, constraints=constraints)
        array = _ARRAYS.get(type(info))
        if array is not None:
            return TypeShape(array, (self.type(info.item_type),), constraints=constraints)  # type: ignore[attr-defined]
        if isinstance(info, mi.TupleType):
            return TypeShape("fixed_tuple", tuple(self.type(t) for t in info.item_types))
        if isinstance(info, mi.DictType | mi.FrozenDictType):
            return TypeShape(
                "dict", (self.type(info.key_type), self.type(info.value_type)), constraints=constraints
            )
        if isinstance(info, mi.UnionType):
            return TypeShape("union", tuple(self.type(t) for t in info.types))
        if isinstance(info, mi.EnumType):
            values = tuple(_plain(m.value) for m in info.cls)
            return TypeShape("enum", ref=struct_name(info.cls), values=values)
        if isinstance(info, mi.LiteralType):
            return TypeShape("literal", values=tuple(_plain(v) for v in info.values))
        if isinstance(info, _STRUCT_LIKE):
            return TypeShape("struct", ref=self.struct(info))
        if isinstance(info, mi.CustomType):
            return TypeShape("custom", ref=struct_name(info.cls))
        return TypeShape(type(info).__name__.removesuffix("Type").lower() or "unknown")


def _constraints(info: mi.Type) -> tuple[tuple[str, str], ...]:
    """Validation constraints of a type (``ge``, ``max_length``, ``pattern``, ``tz``...), as text."""
    names = getattr(type(info), "__struct_fields__", ())
    found = []
    for name in names:
        if name in _STRUCTURAL:
            continue
        value = getattr(info, name, None)
        if value is not None:
            found.append((name, _value_text(value)))
    return tuple(found)


def _plain(value: Any) -> str | int | float | bool | None:
    if isinstance(value, enum.Enum):
        value = value.value
    return value if isinstance(value, str | int | float | bool) or value is None else repr(value)


def _value_text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    return repr(value)


def type_text(t: TypeShape, contract: PayloadContract | None = None) -> str:
    """A type as a reader writes it: ``int``, ``list[str]``, ``dict[str, float]``, ``Address``,
    ``int | None``, ``Literal['a', 'b']``, ``Color{'red', 'blue'}``."""
    if t.kind == "union":
        return " | ".join(type_text(a, contract) for a in t.args)
    if t.kind in ("list", "set", "frozenset"):
        return f"{t.kind}[{type_text(t.args[0], contract)}]"
    if t.kind == "tuple":
        return f"tuple[{type_text(t.args[0], contract)}, ...]"
    if t.kind == "fixed_tuple":
        return f"tuple[{', '.join(type_text(a, contract) for a in t.args)}]"
    if t.kind == "dict":
        return f"dict[{type_text(t.args[0], contract)}, {type_text(t.args[1], contract)}]"
    if t.kind == "struct":
        return (t.ref or "?").rsplit(".", 1)[-1]
    if t.kind == "enum":
        return f"{(t.ref or '?').rsplit('.', 1)[-1]}{{{', '.join(map(repr, t.values))}}}"
    if t.kind == "literal":
        return f"Literal[{', '.join(map(repr, t.values))}]"
    if t.kind == "custom":
        return (t.ref or "?").rsplit(".", 1)[-1]
    text = "None" if t.kind == "none" else t.kind
    if t.constraints:
        text += "(" + ", ".join(f"{k}={v}" for k, v in t.constraints) + ")"
    return text


def field_text(field: FieldShape, contract: PayloadContract | None = None) -> str:
    """``amount: float | None = None``; ``id: str``."""
    text = f"{field.name}: {type_text(field.type, contract)}"
    return text if field.required else f"{text} = {field.default or '...'}"
