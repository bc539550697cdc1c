"""Tool-call arguments checked against a tool's JSON schema (Tool.parameters): names, types, enums, unions
(anyOf), tuples (prefixItems) and nullable values.

    arguments, problems = check_arguments(tool.parameters, {"a": 3.0})   # ({"a": 3}, [])

Each problem is one line the model reads as its call's result ("argument 'a' should be an integer, got
\"one\""); an integral float for an integer parameter becomes an int, bools are never numbers, and NaN /
Infinity (which Python's json reads) are no numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["check_arguments"]


_TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "a boolean",
    "array": "an array",
    "object": "an object",
    "null": "null",
}


def check_arguments(schema: Mapping[str, Any], arguments: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(normalised arguments, problems) for `arguments` against an object schema (Tool.parameters).

    Problems, in this order: unexpected arguments, missing required ones, wrong types / values.
    """
    properties = schema.get("properties", {})
    problems = [f"unexpected argument {k!r}" for k in arguments if k not in properties]
    problems += [f"missing required argument {k!r}" for k in schema.get("required", []) if k not in arguments]
    out: dict[str, Any] = {}
    for key, value in arguments.items():
        if key in properties:
            value, problem = _check_value(properties[key], value, f"argument {key!r}")
            if problem:
                problems.append(problem)
            out[key] = value
    return out, problems


def _check_value(schema: Mapping[str, Any], value: Any, what: str) -> tuple[Any, str | None]:
    if value is None and schema.get("nullable"):  # transformers' spelling of Optional[X]
        return value, None
    if "anyOf" in schema:  # a union: the first member that takes the value (normalised as that member)
        return _check_any_of(schema["anyOf"], value, what)
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    if kinds:
        for kind in kinds:
            ok, value2 = _is_type(kind, value)
            if ok:
                value = value2
                break
        else:
            words = " or ".join(_TYPE_WORDS.get(k, k) for k in kinds)
            if _is_non_finite(value) and "number" in kinds:  # NaN / Infinity: Python's json reads them
                words = words.replace("a number", "a finite number")
            return value, f"{what} should be {words}, got {_show(value)}"
    if "enum" in schema and value not in schema["enum"]:
        return value, f"{what} should be one of {', '.join(json.dumps(v) for v in schema['enum'])}, got {_show(value)}"
    if isinstance(value, list) and "prefixItems" in schema:  # a tuple: one schema per position
        return _check_tuple(schema["prefixItems"], value, what)
    if isinstance(value, list) and "items" in schema:
        items = []
        for i, item in enumerate(value):
            item, problem = _check_value(schema["items"], item, f"{what} item {i}")
            if problem:
                return value, problem
            items.append(item)
        value = items
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        entries = {}
        for key, item in value.items():
            item, problem = _check_value(schema["additionalProperties"], item, f"{what} key {key!r}")
            if problem:
                return value, problem
            entries[key] = item
        value = entries
    return value, None


def _check_any_of(members: list[Mapping[str, Any]], value: Any, what: str) -> tuple[Any, str | None]:
    """`value` against a union's members: the first that accepts it; else, when no member's type takes
    it, every type named ("should be an array or a string"), or the problem of the member whose type did."""
    problems = []
    for member in members:
        checked, problem = _check_value(member, value, what)
        if problem is None:
            return checked, None
        problems.append(problem)
    wrong_type = f"{what} should be "  # how a type mismatch of the value itself starts (not an item's, an enum's)
    closer = [p for p in problems if not p.startswith(wrong_type) or p.startswith(f"{wrong_type}one of")]
    if closer:  # a member whose type took the value: its own problem
        return value, closer[0]
    if members and all(m.get("type") for m in members):
        kinds = [k for m in members for k in ([m["type"]] if isinstance(m["type"], str) else m["type"])]
        return value, f"{wrong_type}{' or '.join(_TYPE_WORDS.get(k, k) for k in kinds)}, got {_show(value)}"
    return value, problems[0] if problems else None


def _check_tuple(positions: list[Mapping[str, Any]], value: list, what: str) -> tuple[Any, str | None]:
    """A list against a tuple's per-position schemas: its length, then each item."""
    if len(value) != len(positions):
        return value, f"{what} should be an array of {len(positions)} items, got {_show(value)}"
    items = []
    for i, (schema, item) in enumerate(zip(positions, value)):
        item, problem = _check_value(schema, item, f"{what} item {i}")
        if problem:
            return value, problem
        items.append(item)
    return items, None


def _is_type(kind: str, value: Any) -> tuple[bool, Any]:
    """(value has JSON type `kind`, the value normalised): bools are never numbers; 3.0 is an integer."""
    if kind == "integer":
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind == "number":  # NaN and Infinity are no JSON numbers (and no tool's input)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not _is_non_finite(value), value
    python = {"string": str, "boolean": bool, "array": list, "object": dict, "null": type(None)}.get(kind)
    return (python is None or isinstance(value, python)), value


def _is_non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."
