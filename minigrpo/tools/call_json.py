"""One tool call read from model text: the call values (`ToolCall`, `ToolCallError`) and the JSON reading every
format shares (minigrpo/tools/calls.py holds the formats).

    call = call_from_json('{"name": "add", "arguments": {"a": 1}}', raw, ("arguments",))

JSON escapes of lone surrogates ("\\ud83d" without its pair) become U+FFFD in every string parsed; a key given
twice, NaN / Infinity, deep nesting and huge integers are errors, never exceptions (see calls.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

__all__ = ["DECODER", "ToolCall", "ToolCallError", "bad_json", "call_from_json", "call_from_object",
           "has_surrogate_escape", "json_type", "skip_space", "valid_text"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One well-formed call: `name(**arguments)`; `raw` is the text it was parsed from."""

    name: str
    arguments: dict[str, Any]
    raw: str
    id: str = ""  # the call's id where the format gives calls ids ("mistral"), else ""


@dataclasses.dataclass(frozen=True)
class ToolCallError:
    """A call that cannot be run, as a value: `message` says what was wrong; `name` if it could be read."""

    message: str
    raw: str
    name: str | None = None
    id: str = ""  # as ToolCall.id: the tool result answering it carries it


_SPACE = re.compile(r"\s*")


def skip_space(text: str, at: int) -> int:
    """The index of the first non-space character of `text` from `at` (len(text) if none): no copy of the
    rest of the text, so a parser that skips space before each of many calls stays linear."""
    return _SPACE.match(text, at).end()


def call_from_json(body: str, raw: str, args_keys: tuple[str, ...]) -> ToolCall | ToolCallError:
    """A call from the JSON text `body`: {"name": str, <one of args_keys>: object or JSON-object string}."""
    try:
        obj = DECODER.decode(body)
    except (ValueError, RecursionError) as e:
        return ToolCallError(bad_json(e), raw, _name_despite_duplicates(body, e))
    return call_from_object(obj, raw, args_keys)


def _name_despite_duplicates(body: str, e: Exception) -> str | None:
    """For a call refused for a duplicate key (other than "name"), its name: the error names the tool."""
    if not isinstance(e, _DuplicateKey) or e.key == "name":
        return None
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):  # a syntax error after the duplicate
        return None
    name = obj.get("name") if isinstance(obj, dict) else None
    return valid_text(name) if isinstance(name, str) and name else None


class _DuplicateKey(ValueError):
    """A JSON object of model text names `key` twice: json would keep the last value silently, so
    the call would run with an argument the model may not have meant."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object from its (key, value) pairs; _DuplicateKey on a key given twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)  # every JSON of model text goes through it


def bad_json(e: Exception, where: str = "") -> str:
    """Why model text is no JSON. Beside syntax errors, json raises RecursionError on deep nesting
    and ValueError on integers past Python's digit limit: model text must never end the run."""
    if isinstance(e, _DuplicateKey):
        return f"duplicate key {valid_text(e.key)!r} in {where.removeprefix(' in ') or 'the tool call'} (each key once)"
    if isinstance(e, json.JSONDecodeError):
        return f"bad JSON{where} at char {e.pos}: {e.msg}"
    reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
    return f"bad JSON{where}: {reason}"


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a surrogate gets into JSON text


def has_surrogate_escape(json_text: str) -> bool:
    """Whether JSON text may decode to a lone surrogate (it holds an escape of one half of a pair)."""
    return _SURROGATE_ESCAPE.search(json_text) is not None


def valid_text(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD. JSON escapes such as "\\ud83d" without their pair
    decode to them: Python strings may hold them, UTF-8 (the tokenizer, a file) cannot."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def _valid_values(value: Any) -> Any:
    """A decoded JSON value with every string (keys included) made valid_text."""
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, list):
        return [_valid_values(v) for v in value]
    if isinstance(value, dict):
        return {valid_text(k): _valid_values(v) for k, v in value.items()}
    return value


def call_from_object(
    obj: Any, raw: str, args_keys: tuple[str, ...], other_keys: tuple[str, ...] = (), *, escaped: bool | None = None
) -> ToolCall | ToolCallError:
    """A call from a decoded JSON value: {"name": str, <one of args_keys>: object or JSON-object string},
    and optionally `other_keys` (read by the format, e.g. a call's "id"); the OpenAI layout
    {"type": "function", "function": {"name": ..., "arguments": ...}} too. `escaped`: whether the JSON text
    may hold a surrogate escape (None: search `raw`; a format reading many calls from one text searches once)."""
    if has_surrogate_escape(raw) if escaped is None else escaped:
        try:
            obj = _valid_values(obj)
        except RecursionError:
            return ToolCallError("bad JSON: nested too deeply", raw)
    obj = _unwrapped(obj, other_keys)
    if not isinstance(obj, dict):
        return ToolCallError(f"a tool call must be a JSON object, got {json_type(obj)}", raw)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        what = "is missing" if name is None else f"should be a non-empty string, got {json_type(name)}"
        return ToolCallError(f"the tool call's 'name' {what}", raw)
    key = next((k for k in args_keys if k in obj), None)
    arguments = {} if key is None else obj[key]
    if isinstance(arguments, str):  # OpenAI style: the arguments as a JSON string
        try:
            arguments = _valid_values(DECODER.decode(arguments)) if arguments.strip() else {}
        except (ValueError, RecursionError) as e:
            return ToolCallError(bad_json(e, f" in '{key}'"), raw, name)
    if not isinstance(arguments, dict):
        return ToolCallError(f"'{key}' should be a JSON object, got {json_type(arguments)}", raw, name)
    tagged = {"type"} if obj.get("type") == "function" else set()  # {"type": "function", "name": ...} is a call too
    extra = sorted(set(obj) - {"name", *args_keys, *other_keys} - tagged)
    if extra:
        expected = f"expected 'name' and '{args_keys[0]}'"
        return ToolCallError(f"unexpected key {extra[0]!r} in the tool call ({expected})", raw, name)
    return ToolCall(name, arguments, raw)


def _unwrapped(obj: Any, other_keys: tuple[str, ...]) -> Any:
    """The call inside the OpenAI layout {"type": "function", "function": {...}, "id": ...} (the layout of the
    tool declarations the prompt shows, which models imitate), with the outer `other_keys`; else `obj`."""
    if not isinstance(obj, dict) or "name" in obj or not isinstance(obj.get("function"), dict):
        return obj
    if obj.get("type", "function") != "function" or not set(obj) <= {"type", "function", "id"}:
        return obj
    return {**obj["function"], **{k: obj[k] for k in other_keys if k in obj}}


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    return "an integer" if isinstance(value, int) else "a number"
