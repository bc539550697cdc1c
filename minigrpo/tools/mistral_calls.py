"""Mistral's tool-call formats (the "mistral" format of minigrpo/tools/calls.py).

    [TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}, ...]           Mistral-7B-Instruct-v0.3, Nemo
    [TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]mul[CALL_ID]Ab3456789[ARGS]{...}   Small 3.x, Magistral, Devstral

Mistral's templates need every call to have an id of 9 letters and digits (its result names it as
`tool_call_id`): the model's own where it wrote a valid one not used by an earlier call of the text, else
one made from the text and the call's place, the same on every run. Linear time in the text's length,
however many tags and calls it holds.
"""

from __future__ import annotations

import hashlib
import re
import string
from typing import Any

from minigrpo.tools.call_json import (
    DECODER,
    ToolCall,
    ToolCallError,
    bad_json,
    call_from_object,
    has_surrogate_escape,
    skip_space,
    valid_text,
)

__all__ = ["MISTRAL_TAG", "parse_mistral"]

MISTRAL_TAG = "[TOOL_CALLS]"
_ID_CHARS = string.ascii_letters + string.digits
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")
_Found = list[tuple[ToolCall | ToolCallError, Any]]  # (call, the "id" the model wrote)


def parse_mistral(text: str) -> list[ToolCall | ToolCallError]:
    """The calls after each `[TOOL_CALLS]` of `text`: a JSON array of {"name": ..., "arguments": {...}} objects
    (or one object), or the newer `name[ARGS]{...}` (optionally `name[CALL_ID]id[ARGS]{...}`, and several in
    a row); each with an id (see the module docstring)."""
    found: _Found = []
    at = text.find(MISTRAL_TAG)
    while at >= 0:
        start = skip_space(text, at + len(MISTRAL_TAG))
        named = None if text.startswith(("[", "{"), start) else _MISTRAL_NAMED.match(text, start)
        end = (_mistral_named_calls if named else _mistral_json_calls)(text, at, start, found)
        at = text.find(MISTRAL_TAG, end)
    return _with_ids(found, text)


def _with_ids(found: _Found, text: str) -> list[ToolCall | ToolCallError]:
    """The calls with their ids: a result names its call by id, so an id the turn used already is remade."""
    seed = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()  # once: each id hashes only this
    used: set[str] = set()
    out: list[ToolCall | ToolCallError] = []
    for i, (call, given) in enumerate(found):
        id_ = _mistral_id(given if isinstance(given, str) and given not in used else None, seed, i)
        used.add(id_)
        out.append(_replace_id(call, id_))
    return out


def _replace_id(call: ToolCall | ToolCallError, id_: str) -> ToolCall | ToolCallError:
    if isinstance(call, ToolCall):
        return ToolCall(call.name, call.arguments, call.raw, id_)
    return ToolCallError(call.message, call.raw, call.name, id_)


def _mistral_json_calls(text: str, at: int, start: int, found: _Found) -> int:
    """Append to `found` the calls of the block `[TOOL_CALLS] [{...}, ...]` at `at` whose JSON starts at
    `start`; the block's end."""
    try:
        value, end = DECODER.raw_decode(text, start)
    except (ValueError, RecursionError) as e:
        end = text.find(MISTRAL_TAG, start)
        end = len(text) if end < 0 else end  # the error's text: up to the next tag
        expected = "" if text.startswith(("[", "{"), start) else " (a JSON array of calls or name[ARGS]{...})"
        found.append((ToolCallError(bad_json(e, f" after {MISTRAL_TAG}") + expected, text[at:end]), None))
        return end
    raw = text[at:end]  # the whole block: its calls are cut from the assistant's content together
    items = value if isinstance(value, list) else [value]
    if not items:
        found.append((ToolCallError(f"an empty list of calls after {MISTRAL_TAG}", raw), None))
        return end
    keys, escaped = ("arguments", "parameters"), has_surrogate_escape(raw)  # searched once for the block
    for item in items:
        given = item.get("id") if isinstance(item, dict) else None
        found.append((call_from_object(item, raw, keys, ("id",), escaped=escaped), given))
    return end


# a call of the newer form: the name, optionally [CALL_ID] and an id, then [ARGS] and the arguments' JSON
_MISTRAL_NAMED = re.compile(r"\s*([^\s\[\]{}\\\"]+)(?:\[CALL_ID\]([^\[\]\s]*))?\[ARGS\]")


def _mistral_named_calls(text: str, at: int, start: int, found: _Found) -> int:
    """Append to `found` the calls of `[TOOL_CALLS]name[ARGS]{...}` at `at` (the name at `start`), with the
    calls that follow it directly without a tag of their own; the end of the last. Each call's text is its
    own (the first one's with the tag)."""
    begin, m = at, _MISTRAL_NAMED.match(text, start)
    while m is not None:
        name, given = valid_text(m.group(1)), m.group(2)
        args_at = skip_space(text, m.end())
        try:
            value, end = DECODER.raw_decode(text, args_at)
        except (ValueError, RecursionError) as e:
            end = text.find(MISTRAL_TAG, m.end())
            end = len(text) if end < 0 else end  # the error's text: up to the next tag
            where = f" in the arguments of {name!r} after [ARGS]"
            found.append((ToolCallError(bad_json(e, where), text[begin:end], name), given))
            return end
        call = call_from_object({"name": name, "arguments": value}, text[begin:end], ("arguments",))
        found.append((call, given))
        begin, m = end, _MISTRAL_NAMED.match(text, end)
    return begin


def _mistral_id(given: Any, seed: bytes, index: int) -> str:
    """A call's id: `given` (the model's) if it is 9 letters and digits, else 9 made from (seed, index)."""
    if isinstance(given, str) and _MISTRAL_ID.fullmatch(given):
        return given
    digest = hashlib.sha256(seed + index.to_bytes(8, "little")).digest()
    return "".join(_ID_CHARS[b % len(_ID_CHARS)] for b in digest[:9])
