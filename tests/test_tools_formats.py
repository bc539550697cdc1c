"""Tool-call formats beyond the basics: Mistral's newer `[TOOL_CALLS]name[ARGS]{...}` form beside the
`[TOOL_CALLS] [...]` one, several calls in a turn, malformed arguments, unknown tools and unicode; each
checked through the chat template that writes the form (rendered by transformers' jinja renderer as the
reference). CPU only, no model."""

from __future__ import annotations

import re

import pytest

from minigrpo.chat_template import render_chat_template
from minigrpo.tools import (
    Tool,
    ToolCall,
    ToolCallError,
    assistant_message,
    calculator,
    detect_format,
    parse_tool_calls,
    renders_tool_calls,
    run_tool_calls,
    tool_messages,
)


def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Args:
        a: the first term.
        b: the second term.
    """
    return a + b


def echo(text: str) -> str:
    """Say it back.

    Args:
        text: what to say.
    """
    return text


TOOLS = [Tool.from_function(add), Tool.from_function(echo), Tool.from_function(calculator)]

# the assistant and tool parts of Mistral Small 3.x / Magistral / Devstral templates: each call written as
# [TOOL_CALLS]name[ARGS]{json} (with [CALL_ID]id before [ARGS] where `ids` is on), results without ids


def mistral_v11_template(ids: bool = False) -> str:
    call_id = "'[CALL_ID]' + tc.id + " if ids else ""
    return (
        "{{ bos_token }}{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
        "{%- for m in messages %}"
        "{%- if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
        "{%- elif m.role == 'assistant' %}{{ m.content or '' }}"
        "{%- for tc in m.tool_calls or [] %}{%- set a = tc.function.arguments %}"
        "{%- if a is not string %}{%- set a = a | tojson %}{%- endif %}"
        "{{- '[TOOL_CALLS]' + tc.function.name + " + call_id + "'[ARGS]' + a }}"
        "{%- endfor %}{{ eos_token }}"
        "{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]"
        "{%- endif %}{%- endfor %}"
    )


def render_with_transformers(template: str, messages: list[dict], **kwargs) -> str:
    """transformers' own jinja rendering (the reference)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=template, bos_token="<s>", eos_token="</s>", **kwargs
    )
    return rendered[0]


def test_mistral_named_calls_are_parsed_as_the_template_writes_them():
    """`[TOOL_CALLS]name[ARGS]{...}` (several in a row, `[CALL_ID]id` kept as the call's id): each call's
    text is its own, so the calls leave the assistant's content, and rendering the message back (ours and
    transformers') gives the model's text. Before, each was 'bad JSON after [TOOL_CALLS] at char 12'."""
    template = mistral_v11_template(ids=True)
    assert detect_format(template) == "mistral" and renders_tool_calls(template)
    text = (
        'Let me compute.[TOOL_CALLS]add[CALL_ID]Abc123xyz[ARGS]{"a": 2, "b": 3}'
        '[TOOL_CALLS]echo[CALL_ID]Zzz999aaa[ARGS]{"text": "Grüße, 日本 🙂"}'
    )
    first, second = parse_tool_calls(text, TOOLS, "mistral")
    assert first == ToolCall(
        "add", {"a": 2, "b": 3}, '[TOOL_CALLS]add[CALL_ID]Abc123xyz[ARGS]{"a": 2, "b": 3}', "Abc123xyz"
    )
    assert (second.name, second.arguments, second.id) == ("echo", {"text": "Grüße, 日本 🙂"}, "Zzz999aaa")
    message = assistant_message(text, [first, second])
    assert message["content"] == "Let me compute."
    messages = [{"role": "user", "content": "2+3?"}, message]
    ours = render_chat_template(template, messages, variables={"bos_token": "<s>", "eos_token": "</s>"})
    assert ours == render_with_transformers(template, messages)
    assert ours == f"<s>[INST]2+3?[/INST]{text}</s>"
    results = run_tool_calls([first, second], TOOLS)
    assert [r.content for r in results] == ["5", "Grüße, 日本 🙂"]
    assert [m["tool_call_id"] for m in tool_messages(results)] == ["Abc123xyz", "Zzz999aaa"]


def test_mistral_named_calls_without_ids_get_stable_ids():
    text = '[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]calculator[ARGS]{"expression": "2*3"}'
    calls = parse_tool_calls(text, TOOLS, "mistral")
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1}), ("calculator", {"expression": "2*3"})]
    assert all(re.fullmatch("[A-Za-z0-9]{9}", c.id) for c in calls) and calls[0].id != calls[1].id
    assert [c.id for c in parse_tool_calls(text, TOOLS, "mistral")] == [c.id for c in calls]  # the same every run
    assert [r.content for r in run_tool_calls(calls, TOOLS)] == ["1", "6"]
    # several calls after one tag, the older JSON form beside the newer one, arguments as a JSON string
    more = '[TOOL_CALLS]add[ARGS]{"a": 1}add[ARGS]"{\\"a\\": 4}" [TOOL_CALLS] [{"name": "add", "arguments": {"a": 7}}]'
    assert [c.arguments for c in parse_tool_calls(more, TOOLS, "mistral")] == [{"a": 1}, {"a": 4}, {"a": 7}]


@pytest.mark.parametrize(
    "text, message, name",
    [
        (
            '[TOOL_CALLS]add[ARGS]{"a": 1, "b": }',
            "bad JSON in the arguments of 'add' after [ARGS] at char 35: Expecting value",
            "add",
        ),
        ('[TOOL_CALLS]add[ARGS]{"a": "one"}', "argument 'a' should be an integer, got \"one\"", "add"),
        ('[TOOL_CALLS]ad[ARGS]{"a": 1}', "unknown tool 'ad' (did you mean 'add'?)", "ad"),
        ("[TOOL_CALLS]add[ARGS][1, 2]", "'arguments' should be a JSON object, got an array", "add"),
        ("[TOOL_CALLS]add(1, 2)", "bad JSON after [TOOL_CALLS] at char 12: Expecting value", None),
    ],
)
def test_malformed_mistral_named_calls_are_error_values(text, message, name):
    """A malformed call is an error result the model reads, never an exception; the error names the tool
    where it could be read."""
    (err,) = parse_tool_calls(text, TOOLS, "mistral")
    assert isinstance(err, ToolCallError) and err.message.startswith(message) and err.name == name, err
    (result,) = run_tool_calls([err], TOOLS)
    assert (result.ok, result.error_kind) == (False, "bad_call") and result.content == f"error: {err.message}"


def test_a_bad_call_does_not_hide_the_good_ones_after_it():
    """Two calls in one turn, the first malformed: the second still runs, each gets its own result."""
    text = '[TOOL_CALLS]add[ARGS]{"a": 1}[TOOL_CALLS]add[ARGS]{"a": }[TOOL_CALLS]add[ARGS]{"a": 3}'
    calls = parse_tool_calls(text, TOOLS, "mistral")
    assert [type(c).__name__ for c in calls] == ["ToolCall", "ToolCallError", "ToolCall"]
    assert [r.content for r in run_tool_calls(calls, TOOLS)][::2] == ["1", "3"]
    assert calls[1].raw == '[TOOL_CALLS]add[ARGS]{"a": }'
