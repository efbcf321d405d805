"""`--set KEY=VALUE` on the command line: one parser, for search files and for single runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from dkd_tune.config.schema import SearchSpaceFile
from dkd_tune.core.errors import UserInputError
from dkd_tune.core.recipes import (
    RECIPE_FIELDS,
)
from dkd_tune.data.spec import short_form_mapping


def apply_set_override(raw: dict[str, Any], assignment: str) -> str | None:
    """Apply `--set a.b.c=value` (value parsed as YAML) to the raw mapping; returns a note to show, if any.

    A bare recipe field (`--set epochs=10`) means `overrides.epochs`, and when the file searches that
    field (in `space:` or a teacher's `space:`) it is fixed at the value instead, for every teacher:
    an override always takes effect, and the note says what it replaced. List items are indexed by
    number (`--set teachers.0.checkpoint=t.pth`); a `data: NAME:PATH` short form takes keys below
    `data` (`--set data.download=true`) as the mapping it stands for.
    """
    key, value = parse_assignment(assignment, example="search.num_samples=16")
    parts = key.split(".")
    note = None
    if len(parts) == 1 and parts[0] in RECIPE_FIELDS and parts[0] not in SearchSpaceFile.model_fields:
        note = _fix_searched_field(raw, parts[0], value)
        parts = ["overrides", parts[0]]
    if len(parts) > 1 and parts[0] == "data" and isinstance(raw.get("data"), str):
        raw["data"] = short_form_mapping(raw["data"])
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserInputError(
                    f"--set {key}: {'.'.join(parts[: depth + 1])} is not an index of the list"
                )
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise UserInputError(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserInputError(f"--set {key}: {last!r} is not an index of the list")
        node[int(last)] = value
    else:
        node[last] = value
    return note


def _fix_searched_field(raw: dict[str, Any], field: str, value: Any) -> str | None:
    """Replace every searched `field` of the file (shared and per-teacher spaces) by the fixed `value`."""
    spaces = [raw.get("space")] + [
        teacher.get("space") for teacher in raw.get("teachers") or [] if isinstance(teacher, dict)
    ]
    replaced = []
    for space in spaces:
        if isinstance(space, dict) and field in space:
            replaced.append(space[field])
            space[field] = value
    if not replaced:
        return None
    shown = {
        yaml.safe_dump(r, default_flow_style=True).strip().removesuffix("\n...").strip() for r in replaced
    }
    searched = ", ".join(sorted(shown))
    return f"--set {field}={value!r}: {field} is fixed at {value!r} for every teacher (the file searched it: {searched})"


def parse_set_overrides(assignments: Sequence[str]) -> dict[str, Any]:
    """`--set key=value` pairs (values read as YAML) -> {key: value}; the recipe validates them."""
    return dict(parse_assignment(assignment, example="epochs=30") for assignment in assignments)


def parse_assignment(assignment: str, example: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (key, value read as YAML; empty: ""), or one line saying what was expected."""
    key, separator, text = assignment.partition("=")
    key = key.strip()
    if not separator or not key:
        raise UserInputError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set {example}")
    try:
        return key, (yaml.safe_load(text) if text.strip() else "")
    except yaml.YAMLError:
        raise UserInputError(f"--set {key}: value {text!r} is not valid YAML") from None
