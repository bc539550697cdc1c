"""Tool calls parsed out of a model turn's text, in the chat template's format, and checked against the tools.

    calls = parse_tool_calls(text, tools, format="hermes")   # "llama3", "mistral"; detect_format(template) picks one
    for call in calls:
        call                 # ToolCall(name, arguments, raw), or ToolCallError(message, raw, name)

Formats (a registry keyed by name; `register_format` adds one):
- "hermes" (Qwen2.5, Hermes, Qwen3): any number of `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
  blocks anywhere in the text; text around them is ignored. An unclosed last block is read to the end
  of the text (generation may stop on `</tool_call>`); a block left open before the next `<tool_call>`, two
  JSON objects in one block and a code fence in one are errors saying so.
- "llama3" (Llama-3.1/3.2/3.3 JSON tool calling): the whole message is a JSON object
  `{"name": ..., "parameters": {...}}` (several may follow each other, separated by ';'), optionally after
  `<|python_tag|>`, and optionally with `"type": "function"` (the OpenAI layout of a call). A message that is
  not such an object is plain text: no calls. Text before `<|python_tag|>` is the model's own; a JSON array
  of calls is its calls; a call in a code fence is an error saying so. A built-in tool's call (template
  variable `builtin_tools`) is `<|python_tag|>name.call(key="value", ...)`, its arguments strings, as the
  template writes it back.
- "mistral" (Mistral-7B-Instruct-v0.3 and later): `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`,
  or the newer `[TOOL_CALLS]name[ARGS]{...}` (Mistral Small 3.x, Magistral, Devstral; `[CALL_ID]id` may come
  before `[ARGS]`); each call gets an `id` of 9 letters and digits, which Mistral's template requires of
  every call and of the tool message answering it (`tool_call_id`) (minigrpo/tools/mistral_calls.py).
Every format also reads the OpenAI layout of a call, {"type": "function", "function": {"name": ..., ...}}.
Parsing is linear in the text's length (100 KB of adversarial model text parses in a fraction of a second).

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
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from minigrpo.tools.arguments import check_arguments
from minigrpo.tools.call_json import (
    DECODER,
    ToolCall,
    ToolCallError,
    bad_json,
    call_from_json,
    call_from_object,
    has_surrogate_escape,
    skip_space,
    valid_text,
)
from minigrpo.tools.mistral_calls import MISTRAL_TAG, parse_mistral
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
class ToolCallFormat:
    """How one template family writes calls: `parse(text)` -> unchecked calls / errors, in order;
    `markers`: strings whose presence in a chat template identifies the family (any one suffices);
    `call_ids`: parse gives every call an id (9 letters and digits) that the template needs."""

    name: str
    parse: Callable[[str], list[ToolCall | ToolCallError]]
    markers: tuple[str, ...]
    call_ids: bool = False


# ----------------------------------------------------------------------------- the formats

_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_FENCE = "```"


def parse_hermes(text: str) -> list[ToolCall | ToolCallError]:
    """Every `<tool_call>...</tool_call>` block of `text`, in order (Qwen2.5 / Hermes format). Linear time:
    each search starts where the last one ended, and the next closer is looked up once for many blocks."""
    calls: list[ToolCall | ToolCallError] = []
    closers = _NextFinder(text, _HERMES_CLOSE)
    start = text.find(_HERMES_OPEN)
    while start >= 0:
        body_at = start + len(_HERMES_OPEN)
        call, end = _hermes_block(text, start, body_at, closers)
        calls.append(call)
        start = text.find(_HERMES_OPEN, end)
    return calls


class _NextFinder:
    """`at_or_after(pos)`: the first `needle` of `text` at or after pos (-1 if none), for growing `pos`:
    a match found once answers every pos up to it, so the searches together read the text once."""

    def __init__(self, text: str, needle: str) -> None:
        self.text, self.needle, self.found = text, needle, None

    def at_or_after(self, pos: int) -> int:
        if self.found is None or (self.found != -1 and self.found < pos):
            self.found = self.text.find(self.needle, pos)
        return self.found


def _hermes_block(text: str, start: int, body_at: int, closers: _NextFinder) -> tuple[ToolCall | ToolCallError, int]:
    """(the call, the end of its block) of the block opened at `start`. The block ends after the JSON value
    that starts it, so "</tool_call>" inside one of its strings is text, not the closer; an unclosed last
    block is read to the end of the text (generation may stop on the closer). A block not closed before the
    next `<tool_call>`, with two JSON objects, or with its JSON in a code fence is an error saying so."""
    keys, json_at = ("arguments", "parameters"), skip_space(text, body_at)
    try:
        _, stop = DECODER.raw_decode(text, json_at)
    except (ValueError, RecursionError):
        stop = None
    rest = len(text) if stop is None else skip_space(text, stop)
    if stop is not None and (rest == len(text) or text.startswith(_HERMES_CLOSE, rest)):
        end = min(rest + len(_HERMES_CLOSE), len(text))
        return call_from_json(text[json_at:stop], text[start:end], keys), end
    close = closers.at_or_after(body_at if stop is None else stop)  # JSON then more text: past the JSON
    opener = text.find(_HERMES_OPEN, body_at if stop is None else stop, None if close < 0 else close)
    body_end = len(text) if close < 0 else close
    if opener >= 0:  # no closer before the next block: that block is a call of its own
        body_end = end = opener
    else:
        end = body_end if close < 0 else close + len(_HERMES_CLOSE)
    body, raw = text[json_at:body_end].rstrip(), text[start:end]
    problem = _hermes_problem(text, json_at, stop, rest, opener)
    return (ToolCallError(problem, raw) if problem else call_from_json(body, raw, keys)), end


def _hermes_problem(text: str, json_at: int, stop: int | None, rest: int, opener: int) -> str | None:
    """What is wrong with a block that is not one JSON value then its closer, where a JSON error would not
    say it; None where the JSON error does (the body's bad JSON, text after it)."""
    block = f"{_HERMES_OPEN}...{_HERMES_CLOSE}"
    if text.startswith(_FENCE, json_at):
        return f"a code fence ({_FENCE}) in the tool call: write the JSON object alone inside {block}"
    if stop is not None and opener == rest:
        return f"the tool call is not closed: {_HERMES_CLOSE} must follow its JSON, before the next {_HERMES_OPEN}"
    if stop is not None and text.startswith("{", rest):
        return f"two JSON objects in one tool call (the second at char {rest - json_at}): one call per {block}"
    return None


_PYTHON_TAG = "<|python_tag|>"
_LLAMA_END = ("<|eom_id|>", "<|eot_id|>")


def parse_llama3(text: str) -> list[ToolCall | ToolCallError]:
    """The JSON call(s) that make up the whole message (Llama-3.1 format), or that follow `<|python_tag|>`
    (the text before the tag is the model's own); [] for a plain-text message. A JSON array of calls is
    read as its calls; a call in a code fence is an error saying so."""
    body = text.strip()
    for end in _LLAMA_END:
        body = body.removesuffix(end).rstrip()
    tag_at = body.find(_PYTHON_TAG)
    body = body if tag_at < 0 else body[tag_at + len(_PYTHON_TAG) :].strip()
    if _looks_like_fenced_call(body):
        return [ToolCallError(f"a code fence ({_FENCE}) around the tool call: write the JSON object alone", body)]
    if tag_at < 0 and not (body.startswith(("{", "[")) and '"name"' in body):
        return []  # an answer, not a call
    if not body.startswith(("{", "[")):
        return [_llama_builtin_call(body, text)]
    return _llama_json_calls(body)


def _looks_like_fenced_call(body: str) -> bool:
    """Whether `body` is a code fence whose content is a JSON object naming a tool (```json\n{"name": ...}```)."""
    if not body.startswith(_FENCE):
        return False
    inner = body[len(_FENCE) :].removeprefix("json").lstrip()
    return inner.startswith(("{", "[")) and '"name"' in inner


def _llama_json_calls(body: str) -> list[ToolCall | ToolCallError]:
    """The calls of `body`: JSON objects (or arrays of them) one after the other, separated by ';' or space."""
    calls: list[ToolCall | ToolCallError] = []
    keys, pos = ("parameters", "arguments"), 0
    while pos < len(body):
        try:
            obj, end = DECODER.raw_decode(body, pos)
        except (ValueError, RecursionError) as e:
            return [*calls, ToolCallError(bad_json(e), body[pos:])]
        raw, escaped = body[pos:end], None
        if isinstance(obj, list) and obj:  # [call, call]: the array's text is the raw of each
            escaped = has_surrogate_escape(raw)
        calls += [call_from_object(o, raw, keys, escaped=escaped) for o in (obj if escaped is not None else [obj])]
        pos = end
        while pos < len(body) and (body[pos].isspace() or body[pos] == ";"):
            pos += 1
        if pos < len(body) and body[pos] not in "{[":
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


FORMATS: dict[str, ToolCallFormat] = {}


def register_format(fmt: ToolCallFormat) -> None:
    """Add (or replace) a tool-call format in the registry."""
    FORMATS[fmt.name] = fmt


register_format(ToolCallFormat("hermes", parse_hermes, ("<tool_call>",)))
register_format(ToolCallFormat("llama3", parse_llama3, ("<|python_tag|>", "ipython")))
register_format(ToolCallFormat("mistral", parse_mistral, (MISTRAL_TAG,), call_ids=True))


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
