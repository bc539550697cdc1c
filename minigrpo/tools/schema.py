"""Tools declared from Python functions: a name, a description and a JSON schema of the parameters.

    def add(a: int, b: int = 0) -> int:
        '''Add two integers.

        Args:
            a: the first term.
            b: the second term.
        '''
        return a + b

    tool = Tool.from_function(add)
    tool.spec()   # {"type": "function", "function": {"name": "add", "description": "Add two integers.",
                  #   "parameters": {"type": "object", "properties": {...}, "required": ["a"]}}}

`spec()` is the OpenAI-style dict chat templates (Qwen2.5, Llama-3.1) take in `tools=`. Parameter
types come from the annotations (int, float, str, bool, list[...], dict[str, ...], Literal[...],
Optional[...] / `X | None`); a parameter without a default is required; descriptions come from the
docstring (its text before the first section, and the Google-style "Args:" section). A function that
cannot be declared (an unannotated parameter, *args, **kwargs, positional-only parameters, a type
JSON cannot express) raises ValueError naming the function and the parameter.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["Tool", "as_tools", "json_schema_of", "parse_docstring"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_SECTIONS = ("args", "arguments", "parameters", "params", "returns", "return", "yields", "raises", "examples",
             "example", "note", "notes", "see also", "attributes", "warning", "warnings")  # fmt: skip
_SIMPLE = {int: "integer", float: "number", str: "string", bool: "boolean"}


@dataclasses.dataclass(frozen=True)
class Tool:
    """A function the model may call: `name(**arguments)` with `parameters` a JSON schema (type object)."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any] = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_function(cls, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None) -> Tool:
        """Declare `fn`: its signature's annotations give the schema, its docstring the descriptions."""
        name = name or getattr(fn, "__name__", "")
        where = f"cannot declare {name or fn!r} as a tool"
        if not _NAME.match(name):
            raise ValueError(f"{where}: the name must match {_NAME.pattern} (give one with name=...)")
        try:
            signature = inspect.signature(fn)
            hints = typing.get_type_hints(fn)
        except (TypeError, ValueError, NameError) as e:
            raise ValueError(f"{where}: its signature cannot be read: {e}") from e
        summary, arg_docs = parse_docstring(inspect.getdoc(fn) or "")
        properties: dict[str, Any] = {}
        required: list[str] = []
        kind = inspect.Parameter
        for p in signature.parameters.values():
            if p.kind is kind.VAR_POSITIONAL:
                raise ValueError(f"{where}: *{p.name} is not allowed (tool arguments are named JSON values)")
            if p.kind is kind.VAR_KEYWORD:
                raise ValueError(f"{where}: **{p.name} is not allowed (every argument must be declared)")
            if p.kind is kind.POSITIONAL_ONLY:
                raise ValueError(f"{where}: parameter {p.name!r} is positional-only (tools are called by keyword)")
            if p.name not in hints:
                raise ValueError(f"{where}: parameter {p.name!r} has no type annotation")
            try:
                prop = json_schema_of(hints[p.name])
            except ValueError as e:
                raise ValueError(f"{where}: parameter {p.name!r}: {e}") from e
            if p.name in arg_docs:
                prop["description"] = arg_docs[p.name]
            properties[p.name] = prop
            if p.default is kind.empty:
                required.append(p.name)
        parameters = {"type": "object", "properties": properties, "required": required}
        return cls(name=name, description=summary if description is None else description, parameters=parameters, fn=fn)

    def spec(self) -> dict[str, Any]:
        """The OpenAI-style declaration chat templates take: {"type": "function", "function": {...}}."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def __call__(self, **arguments: Any) -> Any:
        return self.fn(**arguments)


def as_tools(items: Sequence[Tool | Callable[..., Any]] | Mapping[str, Tool]) -> dict[str, Tool]:
    """Tools by name, from Tools or plain functions (declared on the fly); duplicate names are an error."""
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, Tool] = {}
    for item in items:
        tool = item if isinstance(item, Tool) else Tool.from_function(item)
        if tool.name in out:
            raise ValueError(f"two tools are named {tool.name!r}")
        out[tool.name] = tool
    return out


def json_schema_of(annotation: Any) -> dict[str, Any]:
    """The JSON schema of a Python annotation; ValueError for one JSON cannot express."""
    if annotation in _SIMPLE:
        return {"type": _SIMPLE[annotation]}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is list or origin in (list, Sequence, typing.Sequence):
        return {"type": "array", "items": json_schema_of(args[0])} if args else {"type": "array"}
    if annotation is dict or origin in (dict, Mapping, typing.Mapping):
        if args and args[0] is not str:
            raise ValueError(f"{_show(annotation)}: JSON object keys are strings")
        return {"type": "object", "additionalProperties": json_schema_of(args[1])} if args else {"type": "object"}
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        if len(kinds) != 1 or next(iter(kinds)) not in _SIMPLE:
            raise ValueError(f"{_show(annotation)}: a Literal's values must all be int, float, str or bool")
        return {"type": _SIMPLE[next(iter(kinds))], "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:  # Optional[X]
            schema = json_schema_of(rest[0])
            schema["type"] = [schema["type"], "null"]
            if "enum" in schema:  # Optional[Literal[...]]: null is one of the values
                schema["enum"] = [*schema["enum"], None]
            return schema
        raise ValueError(f"{_show(annotation)}: only Optional[X] unions are supported")
    raise ValueError(f"type {_show(annotation)} cannot be expressed in JSON schema")


def _show(annotation: Any) -> str:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(summary, {parameter: description}) from a Google-style docstring.

    The summary is the text before the first section header ("Args:", "Returns:", ...), lines of a
    paragraph joined by spaces. In "Args:", an entry is `name: text` or `name (type): text`; more
    deeply indented lines continue it.
    """
    summary_lines: list[str] = []
    args: dict[str, list[str]] = {}
    section: str | None = None
    entry_indent: int | None = None
    current: str | None = None
    for line in inspect.cleandoc(doc).splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        header = stripped[:-1].lower() if stripped.endswith(":") and indent == 0 else None
        if header in _SECTIONS:
            section, entry_indent, current = header, None, None
            continue
        if section is None:
            summary_lines.append(stripped)
        elif section in ("args", "arguments", "parameters", "params") and stripped:
            if entry_indent is None:
                entry_indent = indent
            m = re.match(r"^\*{0,2}(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", stripped)
            if indent <= entry_indent and m:
                current = m.group(1)
                args[current] = [m.group(3)] if m.group(3) else []
            elif current is not None:
                args[current].append(stripped)
    paragraphs = " ".join(line if line else "\n\n" for line in summary_lines)
    summary = re.sub(r" ?\n\n ?", "\n\n", paragraphs).strip()
    return summary, {name: " ".join(parts).strip() for name, parts in args.items()}
