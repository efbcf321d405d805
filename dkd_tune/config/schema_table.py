"""`dkd-tune schema` as a reader wants it: every key of a search file, recipe fields included, with
its type, default and meaning, read from the schema itself so the table cannot drift from it."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from dkd_tune.config.schema import Distribution, SearchSpaceFile
from dkd_tune.core.recipes import RECIPE_FIELD_MEANINGS, RECIPE_FIELDS, cifar100


@dataclass(frozen=True)
class SchemaRow:
    key: str  # dotted; `<name>` stands for a name the user chooses, `[]` for any list item
    type: str
    default: str
    meaning: str


def schema_rows() -> list[SchemaRow]:
    """Every key of a search file, then the recipe fields (under overrides:, space: or --set)."""
    rows = _model_rows(SearchSpaceFile, "")
    defaults = cifar100()
    for name in RECIPE_FIELDS:
        field_type = {field.name: field.type for field in dataclasses.fields(defaults)}[name]
        value = getattr(defaults, name)
        rows.append(
            SchemaRow(
                key=f"overrides.{name}",
                type={"tuple[int, ...]": "list of int"}.get(str(field_type), str(field_type)),
                default=_shown(list(value) if isinstance(value, tuple) else value) + " (cifar100)",
                meaning=RECIPE_FIELD_MEANINGS[name]
                + ("" if name == "lr_milestones" else f"; searched as space.{name}")
                + f"; --set {name}=VALUE",
            )
        )
    return rows


def _model_rows(model: type[BaseModel], prefix: str) -> list[SchemaRow]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        default = "(required)" if field.is_required() else _shown(_default(field))
        rows.append(SchemaRow(key, _type_name(field.annotation), default, field.description or ""))
        nested, suffix = _nested_model(field.annotation)
        if nested is not None and nested is not model:
            rows += _model_rows(nested, f"{key}{suffix}.")
    return rows


def _default(field: Any) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def _nested_model(annotation: Any) -> tuple[type[BaseModel] | None, str]:
    """The model a field holds (directly, in a list, as mapping values or in a union) and the key suffix."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    if origin is list and args:
        inner, _ = _nested_model(args[0])
        return inner, "[]"
    if origin is dict and len(args) == 2:
        inner, _ = _nested_model(args[1])
        return inner, ".<name>"
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            inner, suffix = _nested_model(arg)
            if inner is not None:
                return inner, suffix
    return None, ""


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(arg) for arg in args if arg is not type(None)]
        optional = type(None) in args
        return " or ".join(names) + (" (optional)" if optional else "")
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_name(args[1])}" if len(args) == 2 else "mapping"
    if origin is tuple:
        return "pair of " + _type_name(args[0]) if args else "tuple"
    if annotation is Distribution:
        return "distribution"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, BaseModel):
        return "(see below)"
    if value == {} or value == []:
        return "{}" if isinstance(value, dict) else "[]"
    return str(value)
