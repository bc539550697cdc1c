"""Tool calls as models really write them beside the template's form: a block left open before the next one,
two calls in one block, calls in code fences, text before Llama's `<|python_tag|>`, a JSON array of calls,
the OpenAI layout {"type": "function", "function": {...}}; and parsing in linear time on long adversarial
generations. CPU only, no model."""

from __future__ import annotations

import time

import pytest

from minigrpo.tools import Tool, ToolCall, ToolCallError, assistant_message, parse_tool_calls


def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Args:
        a: the first term.
        b: the second term.
    """
    return a + b


TOOLS = [Tool.from_function(add)]
CALL_1 = '{"name": "add", "arguments": {"a": 1}}'
CALL_2 = '{"name": "add", "arguments": {"a": 2}}'


def test_a_hermes_block_left_open_before_the_next_is_an_error_and_the_next_call_runs():
    """Before, the first block ran to the second's closer: one 'bad JSON at char 39: Extra data' error
    and the second, well-formed call was lost."""
    first, second = f"<tool_call>\n{CALL_1}\n", f"<tool_call>\n{CALL_2}\n</tool_call>"
    err, call = parse_tool_calls(first + second, TOOLS)
    assert err == ToolCallError(
        "the tool call is not closed: </tool_call> must follow its JSON, before the next <tool_call>", first
    )
    assert call == ToolCall("add", {"a": 2}, second)
    message = assistant_message(first + second, [err, call])
    assert message["content"] == first.strip() and len(message["tool_calls"]) == 1  # the bad call stays in view


@pytest.mark.parametrize(
    "body, message",
    [
        (f"{CALL_1}\n{CALL_2}", "two JSON objects in one tool call (the second at char 39): one call per <tool_call>"),
        (f"```json\n{CALL_1}\n```", "a code fence (```) in the tool call: write the JSON object alone inside"),
        (f"{CALL_1} thanks", "bad JSON at char 39: Extra data"),  # text after the JSON: json's own words
    ],
)
def test_hermes_blocks_that_are_not_one_json_object_say_what_is_wrong(body, message):
    """Before, two calls in one block and a fenced call read 'Extra data' / 'Expecting value' at char N."""
    text = f"<tool_call>\n{body}\n</tool_call>"
    (err,) = parse_tool_calls(text, TOOLS)
    assert isinstance(err, ToolCallError) and err.message.startswith(message) and err.raw == text, err


def test_llama3_calls_after_text_in_arrays_and_in_fences():
    """Text before <|python_tag|> hid the call (the turn read as a final answer, []); so did a JSON array of
    calls; a call in a code fence is an error saying so (before: [], the episode ended silently)."""
    call = '{"name": "add", "parameters": {"a": 1}}'
    (got,) = parse_tool_calls(f"Let me add.\n<|python_tag|>{call}<|eom_id|>", TOOLS, "llama3")
    assert got == ToolCall("add", {"a": 1}, call)
    assert assistant_message(f"Let me add.\n<|python_tag|>{call}", [got])["content"] == "Let me add."
    pair = f"[{call}, {call.replace('1', '2')}]"
    assert [c.arguments for c in parse_tool_calls(pair, TOOLS, "llama3")] == [{"a": 1}, {"a": 2}]
    (fenced,) = parse_tool_calls(f"```json\n{call}\n```", TOOLS, "llama3")
    assert fenced.message == "a code fence (```) around the tool call: write the JSON object alone"
    assert parse_tool_calls("```python\nprint(1)\n```", TOOLS, "llama3") == []  # code in an answer is no call
    assert parse_tool_calls("[1, 2] is the list", TOOLS, "llama3") == []


@pytest.mark.parametrize("fmt, template", [("hermes", "<tool_call>{}</tool_call>"), ("llama3", "{}")])
def test_the_openai_layout_of_a_call_is_a_call(fmt, template):
    """Models imitate the declarations the prompt shows ({"type": "function", "function": {...}}); before,
    that read "the tool call's 'name' is missing" though the name was there."""
    nested = '{"type": "function", "function": {"name": "add", "arguments": {"a": 3}}}'
    (call,) = parse_tool_calls(template.format(nested), TOOLS, fmt)
    assert (call.name, call.arguments) == ("add", {"a": 3}), call
    other = '{"type": "tool", "function": {"name": "add", "arguments": {"a": 3}}}'
    (err,) = parse_tool_calls(template.format(other), TOOLS, fmt)
    assert err.message == "the tool call's 'name' is missing"


def _best_time(text: str, fmt: str) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        parse_tool_calls(text, TOOLS, fmt)
        best = min(best, time.perf_counter() - start)
    return best


ADVERSARIAL = {  # a unit repeated to the length: many calls (each with an id made for it) or many tags
    "mistral named calls": ('[TOOL_CALLS]add[ARGS]{"a": 1}', "", ""),
    "mistral JSON array": ('{"name": "add", "arguments": {"a": 1}},', "[TOOL_CALLS] [", "{}]"),
    "mistral bare tags": ("[TOOL_CALLS]", "", ""),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_mistral_parsing_is_linear_in_the_text_length(name):
    """Before, each call's id hashed the whole text and each call of an array searched the whole array for
    surrogate escapes: 100 KB of calls took seconds (200 KB of bare tags 15 s; 4x the text, 16-30x the time)."""
    unit, head, tail = ADVERSARIAL[name]
    small, large = (head + unit * (n // len(unit)) + tail for n in (25_000, 100_000))
    assert _best_time(large, "mistral") < 10 * _best_time(small, "mistral") + 0.02
