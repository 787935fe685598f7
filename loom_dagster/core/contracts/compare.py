"""One writer struct against one reader struct: can the reader decode every message the writer sends?

loom's single-type reader decodes ``msgspec.msgpack.decode(raw, type=MessageEnvelope[Reader])`` (strict),
so the rules are msgspec's: a field the reader requires (no default) must be sent; a type must be one the
reader's type accepts (``int`` is accepted as ``float``, a ``float`` never as ``int``; ``date``, ``uuid``,
``decimal``... travel as strings); a null only where the reader admits ``None``; extra writer fields are
ignored unless the reader forbids unknown fields; ``array_like`` structs are positional. A multi-type
reader (``FromMultiTypeTopic``) dispatches on the message type, and a contract also names its type and
version (``loom_dagster.core.contracts.shape``): a different one breaks.

Each finding names the field path, what changed, why it breaks or why it is fine, and the fix.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import msgspec

from loom_dagster.core.contracts.shape import FieldShape, PayloadContract, StructShape, TypeShape, type_text


class Finding(msgspec.Struct, frozen=True, omit_defaults=True):
    """One difference between a writer and a reader struct."""

    path: str
    change: str
    breaking: bool
    why: str
    fix: str = ""

    def describe(self) -> str:
        """``amount: missing from the writer (BREAKING): ... Fix: ...``."""
        label = "BREAKING" if self.breaking else "compatible"
        text = f"{self.path}: {self.change} ({label}): {self.why}"
        return f"{text} Fix: {self.fix}" if self.fix else text


_ARRAYS = frozenset({"list", "set", "frozenset", "tuple"})
_SCALAR_ACCEPTS: dict[str, frozenset[str]] = {
    "float": frozenset({"float", "int"}),
    "int": frozenset({"int"}),
    "str": frozenset({"str", "date", "time", "timedelta", "uuid", "decimal"}),
    "bytes": frozenset({"bytes"}),
    "bool": frozenset({"bool"}),
    "datetime": frozenset({"datetime"}),
    "date": frozenset({"date"}),
    "time": frozenset({"time"}),
    "timedelta": frozenset({"timedelta"}),
    "uuid": frozenset({"uuid"}),
    "decimal": frozenset({"decimal", "int", "float"}),
}
"""Reader kind -> writer kinds msgspec decodes into it from msgpack (strict)."""


@functools.lru_cache(maxsize=4096)
def compare_contracts(writer: PayloadContract, reader: PayloadContract) -> tuple[Finding, ...]:
    """Every difference that matters between what *writer* sends and what *reader* decodes, breaking
    ones first (computed once per distinct pair).

    Example:
        >>> import msgspec
        >>> from loom_dagster.core.contracts.shape import payload_contract
        >>> class Old(msgspec.Struct):
        ...     id: str
        ...     amount: float
        >>> class New(msgspec.Struct):
        ...     id: str
        ...     total: float
        >>> [f.path for f in compare_contracts(payload_contract(New), payload_contract(Old)) if f.breaking]
        ['<message_type>', 'amount']
    """
    findings: list[Finding] = []
    if writer.message_type != reader.message_type:
        findings.append(
            Finding(
                "<message_type>",
                f"message type {writer.message_type!r} -> {reader.message_type!r}",
                True,
                "the writer declares another message type than the reader: they name different contracts "
                "(a FromMultiTypeTopic reader dispatches on it and sends an unknown type to its "
                "dead-letter topic as a WIRE error).",
                "declare the same __loom_message_type__ on both structs (or read the new type).",
            )
        )
    if writer.message_version != reader.message_version:
        findings.append(
            Finding(
                "<message_version>",
                f"message version {writer.message_version} -> {reader.message_version}",
                True,
                "the writer declares another contract version (__loom_message_version__) than the reader.",
                "deploy the reader with the new version first (same __loom_message_version__), or keep the "
                "writer's version.",
            )
        )
    _Comparison(writer, reader, findings).structs(writer.root, reader.root, "")
    return tuple(sorted(findings, key=lambda f: not f.breaking))


def compare_with_readers(
    writer: PayloadContract, readers: tuple[PayloadContract, ...]
) -> tuple[PayloadContract | None, tuple[Finding, ...]]:
    """*writer* against a reader declaring *readers*: one struct (``FromTopic``) or several dispatched by
    message type (``FromMultiTypeTopic``); the reader struct it is decoded with, and the findings."""
    if len(readers) == 1:
        return readers[0], compare_contracts(writer, readers[0])
    match = next((r for r in readers if r.message_type == writer.message_type), None)
    if match is None:
        types = ", ".join(repr(r.message_type) for r in readers)
        return None, (
            Finding(
                "<message_type>",
                f"message type {writer.message_type!r} is not one the reader dispatches",
                True,
                f"the reader (FromMultiTypeTopic) decodes only {types}: every message would be a WIRE "
                "error (unknown message_type) on its dead-letter topic.",
                "add the writer's struct to the reader's payloads, or declare one of its message types.",
            ),
        )
    return match, compare_contracts(writer, match)


class _Comparison:
    """One writer/reader pair walked field by field (``findings`` collects what it finds)."""

    def __init__(self, writer: PayloadContract, reader: PayloadContract, findings: list[Finding]) -> None:
        self.writer, self.reader, self.findings = writer, reader, findings
        self.visiting: set[tuple[str, str]] = set()

    def add(self, path: str, change: str, breaking: bool, why: str, fix: str = "") -> None:
        self.findings.append(Finding(path or "<payload>", change, breaking, why, fix))

    def structs(self, w: StructShape, r: StructShape, prefix: str) -> None:
        key = (w.name, r.name)
        if key in self.visiting:  # recursive structs: this pair is being compared further up
            return
        self.visiting.add(key)
        try:
            self._structs(w, r, prefix)
        finally:
            self.visiting.discard(key)

    def _structs(self, w: StructShape, r: StructShape, prefix: str) -> None:
        if w.array_like != r.array_like:
            side = "writer" if w.array_like else "reader"
            self.add(
                prefix,
                f"array_like on the {side} only",
                True,
                "one side encodes the struct as an array (array_like=True), the other as a map: nothing decodes.",
                "give both structs the same array_like setting.",
            )
            return
        if r.tag_field is not None and (w.tag_field, w.tag) != (r.tag_field, r.tag):
            self.add(
                _join(prefix, r.tag_field),
                f"tag {w.tag_field}={w.tag!r} -> {r.tag_field}={r.tag!r}",
                True,
                "the reader's struct is tagged and expects its own tag value.",
                "give the writer's struct the reader's tag (tag_field and tag).",
            )
        if r.array_like:
            self._positions(w, r, prefix)
        else:
            self._by_name(w, r, prefix)

    def _by_name(self, w: StructShape, r: StructShape, prefix: str) -> None:
        for rf in r.fields:
            path = _join(prefix, rf.name)
            wf = w.field(rf.name)
            if wf is None:
                self._missing(w, r, rf, path)
                continue
            if rf.required and _may_omit(w, wf):
                self.add(
                    path,
                    "the writer may omit it",
                    True,
                    f"the writer omits `{rf.name}` when it holds its default ({wf.default})"
                    + (" (omit_defaults=True)" if w.omit_defaults else "")
                    + " and the reader requires it.",
                    f"give `{rf.name}` a default in the reader's struct, or always send it.",
                )
            if not rf.required and wf.required is False and rf.default != wf.default:
                self.add(
                    path,
                    f"default {wf.default} -> {rf.default}",
                    False,
                    "both sides have a default; the writer sends its value, so the reader's default is "
                    "used only when the writer omits the field.",
                )
            self.types(wf.type, rf.type, path)
        known = {f.name for f in r.fields} | ({r.tag_field} if r.tag_field else set())
        for wf in w.fields:
            if wf.name in known:
                continue
            path = _join(prefix, wf.name)
            if r.forbid_unknown_fields:
                self.add(
                    path,
                    "added in the writer",
                    True,
                    "the reader's struct has forbid_unknown_fields=True: a message with a field it does not "
                    "declare fails to decode.",
                    f"declare `{wf.name}` in the reader's struct (deploy the reader first), or drop "
                    "forbid_unknown_fields.",
                )
            else:
                self.add(path, "added in the writer", False, "the reader does not declare it and ignores it.")

    def _missing(self, w: StructShape, r: StructShape, rf: FieldShape, path: str) -> None:
        if not rf.required:
            self.add(
                path,
                "missing from the writer",
                False,
                f"the reader has a default ({rf.default}) and uses it.",
            )
            return
        renamed = [
            wf.name
            for wf in w.fields
            if r.field(wf.name) is None and not _breaks(self.writer, self.reader, wf.type, rf.type)
        ]
        hint = (
            f" Renamed? the writer has `{'`, `'.join(renamed)}` of a type the reader accepts."
            if renamed
            else ""
        )
        fix = (
            f"send `{rf.name}` from the writer"
            + (
                f" (rename `{renamed[0]}` back)"
                if renamed
                else " (keep it, or add it and deploy the writer first)"
            )
            + f", or give `{rf.name}` a default in the reader's struct (and deploy the reader first)."
        )
        self.add(
            path,
            "missing from the writer",
            True,
            f"the reader requires `{rf.name}` (no default): every message would fail to decode (a WIRE "
            f"error on the reader's dead-letter topic).{hint}",
            fix,
        )

    def _positions(self, w: StructShape, r: StructShape, prefix: str) -> None:
        for index, rf in enumerate(r.fields):
            path = _join(prefix, f"[{index}]{rf.name}")
            if index >= len(w.fields):
                if rf.required:
                    self.add(
                        path,
                        "missing from the writer",
                        True,
                        f"array_like: the reader requires position {index} and the writer sends "
                        f"{len(w.fields)} value(s).",
                        f"send `{rf.name}` at position {index}, or give it a default in the reader.",
                    )
                else:
                    self.add(
                        path, "missing from the writer", False, f"the reader uses its default ({rf.default})."
                    )
                continue
            wf = w.fields[index]
            if wf.name != rf.name:
                self.add(
                    path,
                    f"position {index}: `{wf.name}` -> `{rf.name}`",
                    True,
                    "array_like structs are positional: the writer's value lands in another field of the reader.",
                    "keep the fields of array_like structs in the same order; add new ones at the end.",
                )
            self.types(wf.type, rf.type, path)
        for index in range(len(r.fields), len(w.fields)):
            wf = w.fields[index]
            path = _join(prefix, f"[{index}]{wf.name}")
            if r.forbid_unknown_fields:
                self.add(
                    path,
                    "added in the writer",
                    True,
                    "the reader's array_like struct forbids unknown fields: a longer array fails to decode.",
                    f"declare `{wf.name}` at the end of the reader's struct first.",
                )
            else:
                self.add(path, "added in the writer", False, "trailing values the reader ignores.")

    def types(self, w: TypeShape, r: TypeShape, path: str) -> None:
        """Findings for a value of type *w* decoded as type *r*."""
        if w == r and w.kind not in (
            "struct",
            "list",
            "set",
            "frozenset",
            "tuple",
            "fixed_tuple",
            "dict",
            "union",
        ):
            return
        breaking = _type_problem(self, w, r, path)
        if breaking is None:
            wt, rt = type_text(w, self.writer), type_text(r, self.reader)
            if wt != rt and w.kind != "struct":
                self.add(
                    path,
                    f"type {wt} -> {rt}",
                    False,
                    "the reader's type accepts every value of the writer's.",
                )
            return
        change, why, fix = breaking
        self.add(path, change, True, why, fix)


Problem = tuple[str, str, str]
"""(change, why, fix) of a breaking type difference."""


def _type_problem(cmp: _Comparison, w: TypeShape, r: TypeShape, path: str) -> Problem | None:
    """Why a *w* value cannot always decode as *r*; ``None`` when it can (nested findings are added)."""
    wt, rt = type_text(w, cmp.writer), type_text(r, cmp.reader)
    change = f"type {wt} -> {rt}"
    if r.kind == "any":
        return None
    if w.kind == "union":
        members = [m for m in w.args if m.kind != "none"]
        if len(members) != len(w.args) and not _admits_none(r):
            return (
                f"nullable {wt} -> {rt}",
                "the writer may send null where the reader requires a value: those messages fail to decode.",
                f"make the reader's type {rt} | None, or make the writer's non-nullable.",
            )
        for member in members:
            problem = _type_problem(cmp, member, r, path)
            if problem is not None:
                return (
                    change,
                    f"the writer may send {type_text(member, cmp.writer)}: {problem[1]}",
                    problem[2],
                )
        return None
    if w.kind == "none":
        if _admits_none(r):
            return None
        return (
            change,
            "the writer sends null and the reader requires a value.",
            f"make the reader's type {rt} | None.",
        )
    if r.kind == "union":
        options = [m for m in r.args if _breaks(cmp.writer, cmp.reader, w, m) is False]
        if options:
            chosen = next((m for m in options if m == w), options[0])
            return _type_problem(cmp, w, chosen, path)
        return (change, f"no member of the reader's {rt} accepts {wt}.", f"add {wt} to the reader's type.")
    if r.constraints and w.constraints != r.constraints:
        limits = ", ".join(f"{k}={v}" for k, v in r.constraints)
        return (
            change,
            f"the reader validates {limits}, which the writer's type does not guarantee: values outside fail.",
            "declare the same constraints on the writer's field, or drop them from the reader's.",
        )
    return _kind_problem(cmp, w, r, path, change)


def _kind_problem(cmp: _Comparison, w: TypeShape, r: TypeShape, path: str, change: str) -> Problem | None:
    wt, rt = type_text(w, cmp.writer), type_text(r, cmp.reader)
    if r.kind in ("enum", "literal"):
        if w.kind in ("enum", "literal"):
            extra = [v for v in w.values if v not in r.values]
            if not extra:
                return None
            return (
                change,
                f"the writer may send {', '.join(map(repr, extra))}, which the reader's {rt} does not accept.",
                f"add {', '.join(map(repr, extra))} to the reader's {rt} first.",
            )
        return (
            change,
            f"the writer may send any {wt}; the reader accepts only {rt}.",
            f"send a {rt} from the writer.",
        )
    if w.kind in ("enum", "literal"):
        kinds = {_value_kind(v) for v in w.values}
        if kinds and all(k in _SCALAR_ACCEPTS.get(r.kind, ()) for k in kinds):
            return None
        return (
            change,
            f"the writer's {wt} values are not {rt} values.",
            f"make the reader's type accept {wt}.",
        )
    accepts = _SCALAR_ACCEPTS.get(r.kind)
    if accepts is not None:
        if w.kind in accepts:
            return None
        why = f"msgspec does not decode a {wt} as {rt}."
        if w.kind == "float" and r.kind == "int":
            why = "msgspec does not decode a float as int (1.5 has no int value); int -> float is the safe widening."
        return (
            change,
            why,
            f"keep the field {rt} in the writer, or change the reader's type to accept {wt}.",
        )
    if r.kind in _ARRAYS:
        if w.kind in _ARRAYS:
            cmp.types(w.args[0], r.args[0], f"{path}[]")
            return None
        if w.kind == "fixed_tuple":
            for item in w.args:
                cmp.types(item, r.args[0], f"{path}[]")
            return None
        return (
            change,
            f"the reader expects an array, the writer sends {wt}.",
            "send a list from the writer.",
        )
    if r.kind == "fixed_tuple":
        if w.kind == "fixed_tuple" and len(w.args) == len(r.args):
            for index, (wi, ri) in enumerate(zip(w.args, r.args, strict=True)):
                cmp.types(wi, ri, f"{path}[{index}]")
            return None
        return (
            change,
            f"the reader expects exactly {len(r.args)} item(s).",
            "send a tuple of the reader's length.",
        )
    if r.kind == "dict":
        if w.kind == "dict":
            cmp.types(w.args[0], r.args[0], f"{path}{{key}}")
            cmp.types(w.args[1], r.args[1], f"{path}{{}}")
            return None
        ws = cmp.writer.shape(w.ref) if w.kind == "struct" else None
        if ws is not None and not ws.array_like:  # a struct is a map of its wire names to its values
            cmp.types(TypeShape("str"), r.args[0], f"{path}{{key}}")
            for wf in ws.fields:
                cmp.types(wf.type, r.args[1], f"{path}.{wf.name}")
            return None
        return (change, f"the reader expects a map, the writer sends {wt}.", f"send a {rt} from the writer.")
    if r.kind == "struct":
        ws, rs = cmp.writer.shape(w.ref), cmp.reader.shape(r.ref)
        if w.kind == "struct" and ws is not None and rs is not None:
            cmp.structs(ws, rs, path)
            return None
        return (
            change,
            f"the reader expects the struct {rt}, the writer sends {wt}.",
            f"send a {rt} from the writer.",
        )
    if w.kind == r.kind and w.ref == r.ref:
        return None
    return (
        change,
        f"loom-dagster cannot tell whether a {wt} decodes as {rt}.",
        "use the same type on both sides.",
    )


def _breaks(writer: PayloadContract, reader: PayloadContract, w: TypeShape, r: TypeShape) -> bool:
    """Whether a *w* value may fail to decode as *r* (nested findings discarded)."""
    scratch: list[Finding] = []
    probe = _Comparison(writer, reader, scratch)
    probe.types(w, r, "")
    return any(f.breaking for f in scratch)


def _admits_none(t: TypeShape) -> bool:
    return t.kind in ("none", "any") or (t.kind == "union" and any(_admits_none(a) for a in t.args))


def _may_omit(struct: StructShape, field: FieldShape) -> bool:
    """Whether the writer may leave *field* out of a message (an UNSET default, or omit_defaults)."""
    return field.omittable


def _value_kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if value is None:
        return "none"
    return "str"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and not name.startswith("[") else f"{prefix}{name}"


def breaking(findings: Iterable[Finding]) -> list[Finding]:
    """The breaking findings among *findings*."""
    return [f for f in findings if f.breaking]
