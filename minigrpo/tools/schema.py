"""Tools declared from Python functions: a name, a description and a JSON schema of the parameters.

    def add(a: int, b: int | None = None) -> int:
        '''Add two integers.

        Args:
            a: the first term.
            b: the second term.

        Returns:
            the sum.
        '''
        return a + (b or 0)

    tool = Tool.from_function(add)
    tool.spec()        # {"type": "function", "function": {"name": "add", "description": "Add two integers.",
                       #   "parameters": {"type": "object", "properties": {"a": {...}, "b": {"type": "integer",
                       #   "nullable": True, ...}}, "required": ["a"]}, "return": {"type": "integer", ...}}}
    tool.parameters    # the same parameters in plain JSON Schema: "b": {"type": ["integer", "null"], ...}

`spec()` is the declaration chat templates (Qwen2.5, Llama-3.1) write into the prompt, and it equals
transformers' `get_json_schema(add)`, so prompts render as with transformers: Optional[X] is X's schema with
"nullable": true, Union[A, B] a list of types (or "anyOf" when a member is more than a type), tuple[A, B]
"prefixItems", an Enum class or Literal an "enum", Any an empty schema, "required" only when a parameter has
no default, and the return annotation with the docstring's "Returns:" text as "return". `parameters` is
what calls are checked against (tools.arguments): plain JSON Schema, where null is one of a type list.

Docstrings are read as transformers reads them: the description is the text before the first "Args:",
"Returns:" or "Raises:"; an "Args:" entry is `name: text` or `name (type): text`, continued by the lines
below it that do not start another entry at its indentation; "(choices: [...])" ending an entry is an enum.
Unlike transformers, a function without a docstring, or parameters without descriptions, can be declared
(their descriptions are left out). A function that cannot be declared (an unannotated parameter, *args,
**kwargs, positional-only parameters, a type JSON cannot express) raises ValueError naming the function
and the parameter.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["Tool", "as_tools", "json_schema_of", "parse_docstring"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}  # JSON values
_BARE = {**_SCALARS, list: "array", tuple: "array", dict: "object"}
_DESCRIPTION_END = re.compile(r"Args:|Returns:|Raises:")  # anywhere in the text, as transformers reads it
_ARGS_START = re.compile(r"\n\s*Args:\n")
_RETURNS_START = re.compile(r"\n\s*Returns:\n")
_ARGS_END = re.compile(r"Returns:|Raises:")
_ENTRY = re.compile(r"([ \t]*)(\w+)(?:[ \t]*\([^()\n]*\))?:(.*)")  # `name: text` or `name (type): text`
_CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Tool:
    """A function the model may call: `name(**arguments)` with `parameters` a JSON schema (type object).

    `declared_parameters` and `returns` are the parameters and the return value as `spec()` shows them to
    the model (transformers' form, see the module docstring); None for a Tool written by hand, whose
    `spec()` shows `parameters` and no return.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any] = dataclasses.field(repr=False, compare=False)
    declared_parameters: dict[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)
    returns: dict[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)

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
        summary, arg_docs, returns_doc = parse_docstring(inspect.getdoc(fn) or "")
        properties: dict[str, Any] = {}
        required: list[str] = []
        for p in signature.parameters.values():
            _check_parameter_kind(p, hints, where)
            try:
                properties[p.name] = _described(_declared_schema(hints[p.name]), arg_docs.get(p.name))
            except ValueError as e:
                raise ValueError(f"{where}: parameter {p.name!r}: {e}") from e
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
        declared = {"type": "object", "properties": properties, **({"required": required} if required else {})}
        return cls(
            name=name,
            description=summary if description is None else description,
            parameters={**_plain_schema(declared), "required": list(required)},
            fn=fn,
            declared_parameters=declared,
            returns=_returns_schema(hints, returns_doc),
        )

    def spec(self) -> dict[str, Any]:
        """The OpenAI-style declaration chat templates take: {"type": "function", "function": {...}}."""
        function = {"name": self.name, "description": self.description}
        function["parameters"] = self.parameters if self.declared_parameters is None else self.declared_parameters
        if self.returns is not None:
            function["return"] = self.returns
        return {"type": "function", "function": function}

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


def _check_parameter_kind(p: inspect.Parameter, hints: dict[str, Any], where: str) -> None:
    """A tool's arguments are named JSON values: every parameter is annotated and can be given by keyword."""
    kind = inspect.Parameter
    if p.kind is kind.VAR_POSITIONAL:
        raise ValueError(f"{where}: *{p.name} is not allowed (tool arguments are named JSON values)")
    if p.kind is kind.VAR_KEYWORD:
        raise ValueError(f"{where}: **{p.name} is not allowed (every argument must be declared)")
    if p.kind is kind.POSITIONAL_ONLY:
        raise ValueError(f"{where}: parameter {p.name!r} is positional-only (tools are called by keyword)")
    if p.name not in hints:
        receiver = " (declare the bound method, obj.method)" if p.name in ("self", "cls") else ""
        raise ValueError(f"{where}: parameter {p.name!r} has no type annotation{receiver}")


def _described(schema: dict[str, Any], doc: str | None) -> dict[str, Any]:
    """`schema` with the parameter's docstring text as "description"; a trailing "(choices: [...])" (a JSON
    list) becomes the "enum" and leaves the description."""
    if doc is None:
        return schema
    choices = _CHOICES.search(doc)
    if choices:
        try:
            values = json.loads(choices.group(1))
        except ValueError as e:
            raise ValueError(f"(choices: {choices.group(1)}) in the docstring is no JSON list: {e}") from e
        if not isinstance(values, list):
            raise ValueError(f"(choices: {choices.group(1)}) in the docstring is no JSON list")
        schema["enum"] = [v.strip() if isinstance(v, str) else v for v in values]
        doc = doc[: choices.start()].strip()
    schema["description"] = doc
    return schema


def _returns_schema(hints: dict[str, Any], doc: str | None) -> dict[str, Any] | None:
    """The return annotation's schema with the "Returns:" text; None when there is no annotation or JSON
    cannot express it (the model never writes the return value, so that is no reason to refuse the tool)."""
    if "return" not in hints:
        return None
    try:
        schema = _declared_schema(hints["return"])
    except ValueError:
        return None
    return schema if doc is None else {**schema, "description": doc}


def json_schema_of(annotation: Any) -> dict[str, Any]:
    """The JSON schema of a Python annotation, null a type of the list for Optional[X] (as `Tool.parameters`);
    ValueError for one JSON cannot express."""
    return _plain_schema(_declared_schema(annotation))


def _declared_schema(annotation: Any) -> dict[str, Any]:
    """The schema of an annotation as transformers writes it (Optional[X] is X's with "nullable": true)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is None and isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _enum_class_schema(annotation)
    if origin is None:
        return _bare_schema(annotation)
    if origin in (typing.Union, types.UnionType):
        return _union_schema(args)
    if origin is typing.Literal:
        if any(type(a) not in _SCALARS for a in args):
            raise ValueError(f"{_show(annotation)}: a Literal's values must be int, float, str, bool or None")
        return _enum_schema(list(args))
    if origin is list:
        return {"type": "array", "items": _declared_schema(args[0])} if args else {"type": "array"}
    if origin is tuple:
        return _tuple_schema(annotation, args)
    if origin is dict:
        return {"type": "object", "additionalProperties": _declared_schema(args[1])} if args else {"type": "object"}
    raise ValueError(f"type {_show(annotation)} cannot be expressed in JSON schema")


def _bare_schema(annotation: Any) -> dict[str, Any]:
    """int, float, str, bool, None, list, tuple, dict, Any: the schema of an annotation without arguments."""
    if annotation is Any:
        return {}
    try:
        name = _BARE.get(annotation)
    except TypeError:  # unhashable
        name = None
    if name is None:
        raise ValueError(f"type {_show(annotation)} cannot be expressed in JSON schema")
    return {"type": name}


def _enum_schema(values: list[Any]) -> dict[str, Any]:
    """An "enum" of JSON scalars, "type" the JSON type of each kind of value in order of appearance."""
    kinds = list(dict.fromkeys(_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _enum_class_schema(cls: type[enum.Enum]) -> dict[str, Any]:
    """An Enum class: the model writes a member's value, so the "enum" lists the values."""
    values = [member.value for member in cls]
    if not values:
        raise ValueError(f"Enum {cls.__name__} has no members")
    if any(type(v) not in _SCALARS for v in values):
        raise ValueError(f"Enum {cls.__name__}'s values must be int, float, str, bool or None")
    return _enum_schema(values)


def _union_schema(args: tuple[Any, ...]) -> dict[str, Any]:
    """Union[A, B, ...]: one type, a sorted list of plain types, or "anyOf"; "nullable" if None is a member."""
    members = [_declared_schema(a) for a in args if a is not type(None)]
    if len(members) == 1:
        schema = members[0]
    elif all(m.keys() == {"type"} and isinstance(m["type"], str) for m in members):
        names = sorted({m["type"] for m in members})
        schema = {"type": names[0] if len(names) == 1 else names}
    else:
        schema = {"anyOf": members}
    if type(None) in args:
        schema["nullable"] = True
    return schema


def _tuple_schema(annotation: Any, args: tuple[Any, ...]) -> dict[str, Any]:
    """tuple[A, B]: an array whose items are A then B ("prefixItems")."""
    if not args:
        return {"type": "array"}
    if len(args) == 1:
        raise ValueError(f"{_show(annotation)} has a single element: annotate the element itself, or use a list")
    if ... in args:
        raise ValueError(f"{_show(annotation)}: a tuple of any length is a list (use list[...])")
    return {"type": "array", "prefixItems": [_declared_schema(a) for a in args]}


def _plain_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` in plain JSON Schema, as tools.arguments checks calls: "nullable": true becomes "null" in the
    type list (and in the "enum", or a member of the "anyOf"), at every level."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("items", "additionalProperties") and isinstance(value, dict):
            value = _plain_schema(value)
        elif key in ("prefixItems", "anyOf"):
            value = [_plain_schema(v) for v in value]
        elif key == "properties":
            value = {name: _plain_schema(v) for name, v in value.items()}
        if key != "nullable":
            out[key] = value
    if schema.get("nullable"):
        if "type" in out:
            kinds = [out["type"]] if isinstance(out["type"], str) else list(out["type"])
            out["type"] = kinds if "null" in kinds else [*kinds, "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        if "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    return out


def _show(annotation: Any) -> str:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def parse_docstring(doc: str) -> tuple[str, dict[str, str], str | None]:
    """(description, {parameter: description}, returns text or None) from a Google-style docstring, read
    as transformers reads it so that declarations equal its get_json_schema (see the module docstring)."""
    doc = doc.strip()
    end = _DESCRIPTION_END.search(doc)
    description = doc[: end.start() if end else len(doc)].strip()
    return description, _arg_descriptions(doc), _returns_text(doc)


def _arg_descriptions(doc: str) -> dict[str, str]:
    """{name: text} from the "Args:" section: it ends at the first "Returns:" or "Raises:"; a line
    `name: text` (or `name (type): text`) starts an entry unless it is indented deeper than the entry it
    follows or ends a bare `name:` line; the other lines continue the entry, joined by spaces."""
    start = _ARGS_START.search(doc)
    if start is None:
        return {}
    block = doc[start.end() :]
    stop = _ARGS_END.search(block)
    lines = [line for line in block[: stop.start() if stop else len(block)].split("\n") if line.strip()]
    entries: dict[str, list[str]] = {}
    name, indent, text_below = None, "", False
    for line in lines:
        entry = _ENTRY.match(line)
        deeper = name is not None and line.startswith(indent) and line[len(indent) : len(indent) + 1] in (" ", "\t")
        if entry and not deeper and not text_below:
            indent, name = entry.group(1), entry.group(2)
            entries[name] = [entry.group(3)]
            text_below = not entry.group(3).strip()  # `name:` alone: its text is the next line, whatever it is
        elif name is not None:
            entries[name].append(line)
            text_below = False
    return {name: " ".join(p.strip() for p in parts if p.strip()) for name, parts in entries.items()}


def _returns_text(doc: str) -> str | None:
    """The "Returns:" section (from the line below the header to the first "Raises:"), its line breaks
    kept; None without one."""
    start = _RETURNS_START.search(doc)
    if start is None:
        return None
    text = doc[start.end() :]
    stop = text.find("Raises:")
    return text[: stop if stop >= 0 else len(text)].strip()
