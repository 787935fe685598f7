"""YAML models of ``LoomFlowsComponent``, generated at import from the objects they configure.

The settings dataclasses (``loom_dagster.core.sensor_settings``, Dagster-free), ``LoomFlowSpec`` and
``LoomDeployResource`` are the one place that declares a field, its type, its default and its
description: :func:`settings_model` turns each into a ``Resolvable`` pydantic model, so a new field
shows up in ``defs.yaml`` (and in ``dg check yaml``'s schema) without a second edit. This module
adds only what YAML needs on top: range checks that report the line, and how a model becomes the
object again (``to_value``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import textwrap
import typing
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from types import UnionType
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

from dagster.components import Model, ResolutionContext, Resolvable, Resolver
from dagster.components.resolved.base import derive_model_type
from dagster.components.resolved.errors import ResolutionException
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator
from pydantic.fields import FieldInfo

__all__ = ["YamlModel", "describe_errors", "non_negative", "positive", "settings_model"]

Check = Callable[[Any], Any]


def positive(value: float) -> float:
    """Validator: greater than 0."""
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def non_negative(value: float) -> float:
    """Validator: 0 or more."""
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


class YamlModel(Resolvable, Model):
    """A resolvable model whose errors name the defs.yaml, the line and the field, and whose YAML
    schema accepts a template string only where one can stand (scalars and resolver fields)."""

    @classmethod
    def model(cls) -> type[BaseModel]:
        return _yaml_schema(cls)

    @classmethod
    def resolve_from_model(cls, context: ResolutionContext, model: BaseModel) -> Any:
        try:
            return super().resolve_from_model(context, model)
        except ValidationError as exc:
            raise ResolutionException(describe_errors(context, exc)) from None


class SettingsModel(YamlModel):
    """A model generated from ``source`` (a dataclass or a pydantic model) by :func:`settings_model`."""

    source: ClassVar[type]

    def to_value(self) -> Any:
        """The ``source`` object, built from the fields set in YAML; the others keep its defaults."""
        return self.source(**{name: _to_value(getattr(self, name)) for name in self.model_fields_set})


def _to_value(value: Any) -> Any:
    if isinstance(value, SettingsModel):
        return value.to_value()
    if isinstance(value, Mapping):
        return {key: _to_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_to_value(item) for item in value]
    return value


def settings_model(
    source: type,
    *,
    name: str,
    base: type[SettingsModel] = SettingsModel,
    nested: Mapping[type, type[SettingsModel]] | None = None,
    checks: Mapping[str, Check] | None = None,
    descriptions: Mapping[str, str] | None = None,
) -> type[SettingsModel]:
    """A ``Resolvable`` model with every field of *source*: same names, defaults and descriptions.

    *nested* maps dataclasses used as field types to their models; *checks* adds a validator per
    field (its ``ValueError`` is reported at the field's line); *descriptions* overrides some.
    """
    nested = nested or {}
    fields = (
        _dataclass_fields(source, nested) if dataclasses.is_dataclass(source) else _pydantic_fields(source)
    )
    for field_name, text in (descriptions or {}).items():
        fields[field_name] = (
            fields[field_name][0],
            FieldInfo.merge_field_infos(fields[field_name][1], description=text),
        )
    validators = {
        f"_check_{field_name}": field_validator(field_name)(check)
        for field_name, check in (checks or {}).items()
    }
    model = create_model(name, __base__=base, __doc__=_summary(source), __validators__=validators, **fields)
    model.source = source
    return model


def _summary(source: type) -> str:
    doc = inspect.getdoc(source) or source.__name__
    return f"YAML form of ``{source.__name__}``: {doc.split(chr(10) + chr(10))[0]}"


def _pydantic_fields(source: type) -> dict[str, Any]:
    assert issubclass(source, BaseModel), source
    return {
        name: (info.annotation, FieldInfo.merge_field_infos(info))
        for name, info in source.model_fields.items()
    }


def _dataclass_fields(source: type, nested: Mapping[type, type[SettingsModel]]) -> dict[str, Any]:
    hints = typing.get_type_hints(source)
    docs = field_descriptions(source)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(source):
        annotation = yaml_type(hints[field.name], nested)
        description = docs.get(field.name)
        if field.default is not dataclasses.MISSING:
            info = Field(default=field.default, description=description)
        elif field.default_factory is not dataclasses.MISSING:
            produced = field.default_factory()
            factory = nested[type(produced)] if type(produced) in nested else field.default_factory
            info = Field(default_factory=factory, description=description)
        else:
            info = Field(description=description)
        fields[field.name] = (annotation, info)
    return fields


def yaml_type(annotation: Any, nested: Mapping[type, type[SettingsModel]]) -> Any:
    """The YAML-side type of a field: nested dataclasses become their models, abstract containers
    become ``list`` / ``dict``, ``os.PathLike`` becomes ``str``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return yaml_type(args[0], nested)
    if origin in (Union, UnionType):
        members = list(dict.fromkeys(yaml_type(arg, nested) for arg in args))
        return Union[tuple(members)]  # noqa: UP007 - built from a runtime tuple
    if annotation in nested:
        return nested[annotation]
    if annotation is os.PathLike or origin is os.PathLike:
        return str
    if origin in (Sequence, list) or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return list[yaml_type(args[0], nested)]  # type: ignore[misc]
    if origin in (Mapping, dict):
        return dict[yaml_type(args[0], nested), yaml_type(args[1], nested)]  # type: ignore[misc]
    return annotation


@cache
def field_descriptions(source: type) -> dict[str, str]:
    """Per-field descriptions of a dataclass: its attribute docstrings, else its ``Args:`` entries
    (``a / b: text`` documents both ``a`` and ``b``)."""
    descriptions = _args_section(inspect.getdoc(source) or "")
    descriptions.update(_attribute_docstrings(source))
    return descriptions


def _attribute_docstrings(source: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(source)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    found = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            found[node.target.id] = inspect.cleandoc(following.value.value)
    return found


def _args_section(doc: str) -> dict[str, str]:
    section = re.search(r"^Args:\n((?:[ ]+.*\n?|\n)+)", doc, re.MULTILINE)
    if not section:
        return {}
    found: dict[str, str] = {}
    for entry in re.split(r"\n(?=\S)", textwrap.dedent(section.group(1)).strip("\n")):
        names, _, text = entry.partition(":")
        text = " ".join(text.split())
        for name in names.split("/"):
            found[name.strip()] = text
    return found


# --- the YAML schema ---------------------------------------------------------------------------------
# Dagster derives the schema from the model and lets EVERY field also be a template string. For lists,
# mappings and nested objects that makes pydantic report an extra, misleading "Input should be a valid
# string" and hides the line of a wrong nested key; scalars keep the string alternative
# (``processes: "{{ env('P') }}"`` stays possible) and are checked when resolved. Dagster also drops
# the description of a field with a default; it is put back for editors and ``dg``.


@cache
def _yaml_schema(resolvable: type[YamlModel]) -> type[BaseModel]:
    derived = derive_model_type(resolvable)
    fields: dict[str, Any] = {}
    for name, info in derived.model_fields.items():
        declared = resolvable.model_fields.get(name)
        if declared is not None and declared.description and not info.description:
            info = FieldInfo.merge_field_infos(info, description=declared.description)
        annotation = info.annotation
        if declared is not None and not _has_resolver(declared):
            annotation = _without_template_string(annotation, declared.annotation)
        fields[name] = (annotation, info)
    schema = create_model(derived.__name__, __base__=Model, **fields)
    schema.model_config["json_schema_extra"] = derived.model_config.get("json_schema_extra")
    return schema


def _has_resolver(info: FieldInfo) -> bool:
    return any(isinstance(item, Resolver) for item in info.metadata)


def _members(annotation: Any) -> tuple[Any, ...]:
    return get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)


def _is_structured(annotation: Any) -> bool:
    return get_origin(annotation) in (list, tuple, dict) or (
        isinstance(annotation, type) and issubclass(annotation, BaseModel)
    )


def _without_template_string(derived: Any, declared: Any) -> Any:
    members = _members(derived)
    if str in _members(declared) or not any(_is_structured(m) for m in members):
        return derived
    kept = tuple(m for m in members if m is not str)
    return kept[0] if len(kept) == 1 else Union[kept]  # noqa: UP007 - built from a runtime tuple


def describe_errors(context: ResolutionContext, exc: ValidationError) -> str:
    """One entry per error: ``file:line - attributes.flows.0.processes: message (got 'two')`` + snippet."""
    parts = []
    for error in exc.errors():
        path = [*context.path, *error["loc"]]
        where = ".".join(str(p) for p in path)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] != "missing":
            message += f" (got {error['input']!r})"
        tree = context.source_position_tree
        if tree is None:
            parts.append(f"{where}: {message}")
            continue
        source = tree.source_error(yaml_path=path, inline_error_message=message, value_error=True)
        parts.append(f"{source.file_name}:{source.start_line_no} - {where}: {message}\n{source.snippet}")
    count = len(parts)
    return f"{count} invalid LoomFlowsComponent attribute{'s' if count > 1 else ''}:\n" + "\n".join(parts)
