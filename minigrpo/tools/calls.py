"""Tool calls parsed out of a model turn's text, in the chat template's format, and checked against the tools.

    calls = parse_tool_calls(text, tools, format="hermes")   # "llama3", "mistral"; detect_format(template) picks one
    for call in calls:
        call                 # ToolCall(name, arguments, raw), or ToolCallError(message, raw, name)

Formats (a registry keyed by name; `register_format` adds one):
- "hermes" (Qwen2.5, Hermes, Qwen3): any number of `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
  blocks anywhere in the text; text around them is ignored. An unclosed last block is read to the end
  of the text (generation may stop on `</tool_call>`).
- "llama3" (Llama-3.1/3.2/3.3 JSON tool calling): the whole message is a JSON object
  `{"name": ..., "parameters": {...}}` (several may follow each other, separated by ';'), optionally after
  `<|python_tag|>`, and optionally with `"type": "function"` (the OpenAI layout of a call). A message that is
  not such an object is plain text: no calls. A built-in tool's call (template variable `builtin_tools`) is
  `<|python_tag|>name.call(key="value", ...)`, its arguments strings, as the template writes it back.
- "mistral" (Mistral-7B-Instruct-v0.3 and later): `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`,
  or the newer `[TOOL_CALLS]name[ARGS]{...}` (Mistral Small 3.x, Magistral, Devstral; `[CALL_ID]id` may come
  before `[ARGS]`); each call gets an `id` of 9 letters and digits, which Mistral's template requires of
  every call and of the tool message answering it (`tool_call_id`).

JSON escapes of lone surrogates ("\\ud83d" without its pair) become U+FFFD in every string parsed:
no text a call gives the tools or the error messages can fail to encode as UTF-8.

A malformed call is never an exception: it is a `ToolCallError` whose message says exactly what was
wrong (bad JSON at char N, unknown tool 'x' (did you mean 'y'?), missing required argument 'a',
argument 'a' should be an integer, unexpected argument 'b', duplicate key 'a'); `run.call_tool` turns it
into a tool result the model reads on its next turn. A `</tool_call>` inside a JSON string is text, not the
end of a block; NaN and Infinity (which Python's json reads) are no numbers.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from minigrpo.tools.arguments import check_arguments
from minigrpo.tools.schema import Tool, as_tools

__all__ = [
    "FORMATS",
    "ToolCall",
    "ToolCallError",
    "ToolCallFormat",
    "check_arguments",
    "detect_format",
    "get_format",
    "parse_tool_calls",
    "register_format",
    "valid_text",
]


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


@dataclasses.dataclass(frozen=True)
class ToolCallFormat:
    """How one template family writes calls: `parse(text)` -> unchecked calls / errors, in order;
    `markers`: strings whose presence in a chat template identifies the family (any one suffices);
    `call_ids`: parse gives every call an id (9 letters and digits) that the template needs."""

    name: str
    parse: Callable[[str], list[ToolCall | ToolCallError]]
    markers: tuple[str, ...]
    call_ids: bool = False


# ----------------------------------------------------------------------------- reading one call


def _call_from_json(body: str, raw: str, args_keys: tuple[str, ...]) -> ToolCall | ToolCallError:
    """A call from the JSON text `body`: {"name": str, <one of args_keys>: object or JSON-object string}."""
    try:
        obj = _DECODER.decode(body)
    except (ValueError, RecursionError) as e:
        return ToolCallError(_bad_json(e), raw, _name_despite_duplicates(body, e))
    return _call_from_object(obj, raw, args_keys)


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


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)  # every JSON of model text goes through it


def _bad_json(e: Exception, where: str = "") -> str:
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


def _call_from_object(
    obj: Any, raw: str, args_keys: tuple[str, ...], other_keys: tuple[str, ...] = ()
) -> ToolCall | ToolCallError:
    """A call from a decoded JSON value: {"name": str, <one of args_keys>: object or JSON-object string},
    and optionally `other_keys` (read by the format, e.g. a call's "id")."""
    if _SURROGATE_ESCAPE.search(raw):
        try:
            obj = _valid_values(obj)
        except RecursionError:
            return ToolCallError("bad JSON: nested too deeply", raw)
    if not isinstance(obj, dict):
        return ToolCallError(f"a tool call must be a JSON object, got {_json_type(obj)}", raw)
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        what = "is missing" if name is None else f"should be a non-empty string, got {_json_type(name)}"
        return ToolCallError(f"the tool call's 'name' {what}", raw)
    key = next((k for k in args_keys if k in obj), None)
    arguments = {} if key is None else obj[key]
    if isinstance(arguments, str):  # OpenAI style: the arguments as a JSON string
        try:
            arguments = _valid_values(_DECODER.decode(arguments)) if arguments.strip() else {}
        except (ValueError, RecursionError) as e:
            return ToolCallError(_bad_json(e, f" in '{key}'"), raw, name)
    if not isinstance(arguments, dict):
        return ToolCallError(f"'{key}' should be a JSON object, got {_json_type(arguments)}", raw, name)
    tagged = {"type"} if obj.get("type") == "function" else set()  # {"type": "function", "name": ...} is a call too
    extra = sorted(set(obj) - {"name", *args_keys, *other_keys} - tagged)
    if extra:
        expected = f"expected 'name' and '{args_keys[0]}'"
        return ToolCallError(f"unexpected key {extra[0]!r} in the tool call ({expected})", raw, name)
    return ToolCall(name, arguments, raw)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    return "an integer" if isinstance(value, int) else "a number"


# ----------------------------------------------------------------------------- the formats

_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"


def parse_hermes(text: str) -> list[ToolCall | ToolCallError]:
    """Every `<tool_call>...</tool_call>` block of `text`, in order (Qwen2.5 / Hermes format)."""
    keys, calls = ("arguments", "parameters"), []
    start = text.find(_HERMES_OPEN)
    while start >= 0:
        body_at = start + len(_HERMES_OPEN)
        body_end, end = _hermes_block_end(text, body_at)
        calls.append(_call_from_json(text[body_at:body_end].strip(), text[start:end], keys))
        start = text.find(_HERMES_OPEN, end)
    return calls


def _hermes_block_end(text: str, at: int) -> tuple[int, int]:
    """(end of the body, end of the block) of the block whose body starts at `at`. The block ends after
    the JSON value that starts it, so "</tool_call>" inside one of its strings is text, not the closer;
    a body that is no JSON (the error names why) ends at the next closer, or the end of the text."""
    start = len(text) - len(text[at:].lstrip())
    try:
        _, stop = _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):
        stop = None
    if stop is not None:
        rest = len(text) - len(text[stop:].lstrip())
        if text.startswith(_HERMES_CLOSE, rest):
            return stop, rest + len(_HERMES_CLOSE)
        if rest == len(text):
            return stop, len(text)  # unclosed last block (generation stopped at the closer)
    close = text.find(_HERMES_CLOSE, at if stop is None else stop)  # JSON then more text: past the JSON
    return (len(text), len(text)) if close < 0 else (close, close + len(_HERMES_CLOSE))


_PYTHON_TAG = "<|python_tag|>"
_LLAMA_END = ("<|eom_id|>", "<|eot_id|>")


def parse_llama3(text: str) -> list[ToolCall | ToolCallError]:
    """The JSON call(s) that make up the whole message (Llama-3.1 format); [] for a plain-text message."""
    body = text.strip()
    for end in _LLAMA_END:
        body = body.removesuffix(end).rstrip()
    tagged = body.startswith(_PYTHON_TAG)
    body = body.removeprefix(_PYTHON_TAG).strip()
    if not tagged and not (body.startswith("{") and '"name"' in body):
        return []  # an answer, not a call
    if not body.startswith("{"):
        return [_llama_builtin_call(body, text)]
    decoder, calls, pos = _DECODER, [], 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except (ValueError, RecursionError) as e:
            return [*calls, ToolCallError(_bad_json(e), body[pos:])]
        calls.append(_call_from_object(obj, body[pos:end], ("parameters", "arguments")))
        pos = end
        while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
            pos += 1
        if pos < len(body) and body[pos] != "{":
            return [*calls, ToolCallError(f"unexpected text after the tool call at char {pos}", body[pos:])]
    return calls


# a built-in tool's call (the `builtin_tools` template variable) as Llama-3.1's template writes it
_LLAMA_BUILTIN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\.call\((.*)\)", re.DOTALL)
# one `key="value"` of it: the template writes the value as is, so it ends at the quote before ', next="' or the end
_LLAMA_BUILTIN_ARG = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="(.*?)"(?:, (?=[A-Za-z_][A-Za-z0-9_]*=")|\Z)', re.DOTALL)


def _llama_builtin_call(body: str, text: str) -> ToolCall | ToolCallError:
    """The call `name.call(key="value", ...)` that follows `<|python_tag|>` in `body` (Llama-3.1's built-in
    tools: brave_search, wolfram_alpha), its arguments strings; an error value for any other text there."""
    expected = f'after {_PYTHON_TAG} a JSON tool call {{"name": ..., "parameters": {{...}}}} or name.call(arg="value")'
    m = _LLAMA_BUILTIN.fullmatch(body)
    if m is None:
        return ToolCallError(f"{expected} was expected", text)
    name, arguments, at = valid_text(m.group(1)), {}, 0
    args = m.group(2).strip()
    while at < len(args):
        arg = _LLAMA_BUILTIN_ARG.match(args, at)
        if arg is None:
            return ToolCallError(f"{expected} was expected: bad arguments at char {at} of {name}.call(...)", text, name)
        if arg.group(1) in arguments:
            return ToolCallError(f"duplicate key {arg.group(1)!r} in the tool call (each key once)", text, name)
        arguments[arg.group(1)], at = valid_text(arg.group(2)), arg.end()
    return ToolCall(name, arguments, body)


_MISTRAL_TAG = "[TOOL_CALLS]"
_ID_CHARS = string.ascii_letters + string.digits
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")


def parse_mistral(text: str) -> list[ToolCall | ToolCallError]:
    """The calls after each `[TOOL_CALLS]` of `text` (Mistral formats): a JSON array of
    {"name": ..., "arguments": {...}} objects (or one object), or the newer `name[ARGS]{...}` (Mistral
    Small 3.x, Magistral, Devstral; optionally `name[CALL_ID]id[ARGS]{...}`, and several in a row). Mistral's
    templates need every call to have an id of 9 letters and digits (its results name it): the model's own
    where it wrote a valid one not used by an earlier call of the text, else one made from the text and the
    call's place, the same on every run."""
    found: list[tuple[ToolCall | ToolCallError, Any]] = []  # (call, the "id" the model wrote)
    at = text.find(_MISTRAL_TAG)
    while at >= 0:
        start = len(text) - len(text[at + len(_MISTRAL_TAG) :].lstrip())
        named = None if text.startswith(("[", "{"), start) else _MISTRAL_NAMED.match(text, start)
        block, end = (_mistral_named_calls if named else _mistral_json_calls)(text, at, start)
        found, at = found + block, text.find(_MISTRAL_TAG, end)
    ids: list[str] = []
    for i, (_, given) in enumerate(found):  # a result names its call by id: an id the turn used already is remade
        ids.append(_mistral_id(None if given in ids else given, text, i))
    return [dataclasses.replace(c, id=id_) for (c, _), id_ in zip(found, ids)]


def _mistral_json_calls(text: str, at: int, start: int) -> tuple[list[tuple[ToolCall | ToolCallError, Any]], int]:
    """(calls, end) of the block `[TOOL_CALLS] [{...}, ...]` at `at` whose JSON starts at `start`."""
    try:
        value, end = _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError) as e:
        end = text.find(_MISTRAL_TAG, start)
        end = len(text) if end < 0 else end  # the error's text: up to the next tag
        expected = "" if text.startswith(("[", "{"), start) else " (a JSON array of calls or name[ARGS]{...})"
        return [(ToolCallError(_bad_json(e, f" after {_MISTRAL_TAG}") + expected, text[at:end]), None)], end
    raw = text[at:end]  # the whole block: its calls are cut from the assistant's content together
    items = value if isinstance(value, list) else [value]
    if not items:
        return [(ToolCallError(f"an empty list of calls after {_MISTRAL_TAG}", raw), None)], end
    keys, given = ("arguments", "parameters"), [item.get("id") if isinstance(item, dict) else None for item in items]
    return [(_call_from_object(item, raw, keys, ("id",)), id_) for item, id_ in zip(items, given)], end


# a call of the newer form: the name, optionally [CALL_ID] and an id, then [ARGS] and the arguments' JSON
_MISTRAL_NAMED = re.compile(r"\s*([^\s\[\]{}\\\"]+)(?:\[CALL_ID\]([^\[\]\s]*))?\[ARGS\]")


def _mistral_named_calls(text: str, at: int, start: int) -> tuple[list[tuple[ToolCall | ToolCallError, Any]], int]:
    """(calls, end) of `[TOOL_CALLS]name[ARGS]{...}` at `at` (the name at `start`), with the calls that
    follow it directly without a tag of their own. Each call's text is its own (the first one's with the tag)."""
    calls: list[tuple[ToolCall | ToolCallError, Any]] = []
    begin, m = at, _MISTRAL_NAMED.match(text, start)
    while m is not None:
        name, given = valid_text(m.group(1)), m.group(2)
        args_at = len(text) - len(text[m.end() :].lstrip())
        try:
            value, end = _DECODER.raw_decode(text, args_at)
        except (ValueError, RecursionError) as e:
            end = text.find(_MISTRAL_TAG, m.end())
            end = len(text) if end < 0 else end  # the error's text: up to the next tag
            where = f" in the arguments of {name!r} after [ARGS]"
            return [*calls, (ToolCallError(_bad_json(e, where), text[begin:end], name), given)], end
        call = _call_from_object({"name": name, "arguments": value}, text[begin:end], ("arguments",))
        calls, begin, m = [*calls, (call, given)], end, _MISTRAL_NAMED.match(text, end)
    return calls, begin


def _mistral_id(given: Any, text: str, index: int) -> str:
    """A call's id: `given` (the model's) if it is 9 letters and digits, else 9 made from (text, index)."""
    if isinstance(given, str) and _MISTRAL_ID.fullmatch(given):
        return given
    digest = hashlib.sha256(f"{index}\x00{text}".encode("utf-8", "surrogatepass")).digest()
    return "".join(_ID_CHARS[b % len(_ID_CHARS)] for b in digest[:9])


FORMATS: dict[str, ToolCallFormat] = {}


def register_format(fmt: ToolCallFormat) -> None:
    """Add (or replace) a tool-call format in the registry."""
    FORMATS[fmt.name] = fmt


register_format(ToolCallFormat("hermes", parse_hermes, ("<tool_call>",)))
register_format(ToolCallFormat("llama3", parse_llama3, ("<|python_tag|>", "ipython")))
register_format(ToolCallFormat("mistral", parse_mistral, (_MISTRAL_TAG,), call_ids=True))


def get_format(name: str | ToolCallFormat) -> ToolCallFormat:
    """A registered format by name (ValueError with a suggestion for an unknown one)."""
    if isinstance(name, ToolCallFormat):
        return name
    if name not in FORMATS:
        hint = difflib.get_close_matches(name, FORMATS, n=1)
        raise ValueError(
            f"unknown tool-call format {name!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; known: {', '.join(sorted(FORMATS))}"
        )
    return FORMATS[name]


def detect_format(chat_template: str | None) -> str | None:
    """The tool-call format a chat template uses, by its markers: "hermes" for `<tool_call>` (Qwen2.5),
    "llama3" for `<|python_tag|>` / the `ipython` role (Llama-3.1), "mistral" for `[TOOL_CALLS]`; None
    if the template shows none of them."""
    if not chat_template:
        return None
    for fmt in FORMATS.values():
        if any(marker in chat_template for marker in fmt.markers):
            return fmt.name
    return None


# ----------------------------------------------------------------------------- checking against the tools


def parse_tool_calls(
    text: str,
    tools: Sequence[Tool | Callable[..., Any]] | Mapping[str, Tool],
    format: str | ToolCallFormat = "hermes",
) -> list[ToolCall | ToolCallError]:
    """The calls in a model turn's `text`, each checked against `tools` (names, argument names and types).

    Well-formed calls come back with their arguments normalised (an integral float such as 3.0 for an
    integer parameter becomes 3); anything else is a ToolCallError value. Never raises on model text.
    """
    by_name = as_tools(tools)
    out: list[ToolCall | ToolCallError] = []
    for call in get_format(format).parse(text):
        if isinstance(call, ToolCallError):
            out.append(call)
            continue
        tool = by_name.get(call.name)
        if tool is None:
            hint = difflib.get_close_matches(call.name, by_name, n=1)
            more = f"did you mean {hint[0]!r}?" if hint else f"available: {', '.join(sorted(by_name)) or 'none'}"
            out.append(ToolCallError(f"unknown tool {call.name!r} ({more})", call.raw, call.name, call.id))
            continue
        arguments, problems = check_arguments(tool.parameters, call.arguments)
        if problems:
            out.append(ToolCallError("; ".join(problems), call.raw, call.name, call.id))
        else:
            out.append(ToolCall(call.name, arguments, call.raw, call.id))
    return out
