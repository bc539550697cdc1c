"""minigrpo.tools: declaring tools, parsing calls (Qwen2.5/Hermes and Llama-3.1 formats), the calculator,
the Python sandbox and rendering results through chat templates. CPU only; the sandbox tests start a few
short-lived processes."""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
import typing
from typing import Literal

import pytest

from minigrpo.chat_template import render_chat_template
from minigrpo.tools import (
    Tool,
    ToolCall,
    ToolCallError,
    ToolResult,
    ToolStats,
    as_tools,
    assistant_message,
    builtin_tools,
    calculator,
    call_tool,
    detect_format,
    get_format,
    json_schema_of,
    parse_tool_calls,
    python,
    python_tool,
    run_python,
    run_tool_calls,
    tool_messages,
)


def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Longer explanation
    on two lines.

    Args:
        a: the first term.
        b (int): the second term,
            which defaults to zero.

    Returns:
        the sum.
    """
    return a + b


def search(
    query: str,
    limit: int | None = None,
    tags: list[str] | None = None,
    fuzzy: bool = False,
    mode: Literal["web", "news"] = "web",
    weights: list[float] = (),
) -> dict:
    """Search the web.

    Args:
        query: what to look for.
    """
    return {"query": query, "limit": limit}


TOOLS = [Tool.from_function(add), Tool.from_function(search), Tool.from_function(calculator)]


# ----------------------------------------------------------------------------- schema


def test_schema_from_function():
    spec = Tool.from_function(add).spec()
    assert spec == {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.\n\nLonger explanation\non two lines.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "description": "the first term."},
                    "b": {"type": "integer", "description": "the second term, which defaults to zero."},
                },
                "required": ["a"],
            },
            "return": {"type": "integer", "description": "the sum."},
        },
    }
    params = Tool.from_function(search).parameters
    assert params["required"] == ["query"]
    assert params["properties"] == {
        "query": {"type": "string", "description": "what to look for."},
        "limit": {"type": ["integer", "null"]},
        "tags": {"type": ["array", "null"], "items": {"type": "string"}},
        "fuzzy": {"type": "boolean"},
        "mode": {"type": "string", "enum": ["web", "news"]},
        "weights": {"type": "array", "items": {"type": "number"}},
    }
    assert json_schema_of(typing.Optional[float]) == {"type": ["number", "null"]}  # noqa: UP045
    assert json_schema_of(dict[str, int]) == {"type": "object", "additionalProperties": {"type": "integer"}}
    assert Tool.from_function(add, name="plus").name == "plus"
    with pytest.raises(ValueError, match="two tools are named 'add'"):
        as_tools([add, Tool.from_function(add)])
    assert Tool.from_function(add)(a=2, b=3) == 5


def _unannotated(a, b: int) -> int:
    return b


def _star_args(*xs: int) -> int:
    return 0


def _star_kwargs(a: int, **kw: int) -> int:
    return 0


def _bad_type(a: int, s: set[int]) -> int:
    return 0


def _bad_tuple(a: tuple[int, ...]) -> int:
    return 0


@pytest.mark.parametrize(
    "fn, message",
    [
        (_unannotated, "cannot declare '_unannotated' as a tool: parameter 'a' has no type annotation"),
        (_star_args, "cannot declare '_star_args' as a tool: *xs is not allowed"),
        (_star_kwargs, "cannot declare '_star_kwargs' as a tool: **kw is not allowed"),
        (_bad_type, "parameter 's': type set[int] cannot be expressed in JSON schema"),
        (_bad_tuple, "parameter 'a': tuple[int, ...]: a tuple of any length is a list"),
        (lambda x: x, "the name must match"),
    ],
)
def test_undeclarable_functions(fn, message):
    with pytest.raises(ValueError) as info:
        Tool.from_function(fn)
    assert message in str(info.value)


# ----------------------------------------------------------------------------- parsing


def test_hermes_several_calls_with_text_around():
    text = (
        'Let me compute both.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3.0}}\n</tool_call>\n'
        'and\n<tool_call>\n{"name": "search", "arguments": {"query": "pi", "tags": ["math"]}}\n</tool_call>'
        " done"
    )
    calls = parse_tool_calls(text, TOOLS, "hermes")
    assert calls == [
        ToolCall(
            "add", {"a": 2, "b": 3}, '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3.0}}\n</tool_call>'
        ),
        ToolCall("search", {"query": "pi", "tags": ["math"]}, calls[1].raw),
    ]
    assert isinstance(calls[0].arguments["b"], int)  # 3.0 for an integer parameter becomes 3
    assert parse_tool_calls("no calls here", TOOLS, "hermes") == []
    # an unclosed last block (generation stopped at </tool_call>) still counts; arguments as a JSON string too
    unclosed = parse_tool_calls('<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1}"}\n', TOOLS, "hermes")
    assert [(c.name, c.arguments) for c in unclosed] == [("add", {"a": 1})]


def _error(body: str, fmt: str = "hermes") -> ToolCallError:
    text = f"<tool_call>\n{body}\n</tool_call>" if fmt == "hermes" else body
    (call,) = parse_tool_calls(text, TOOLS, fmt)
    assert isinstance(call, ToolCallError), call
    return call


@pytest.mark.parametrize(
    "body, message",
    [
        (
            '{"name": "add", "arguments": {"a": 1,}}',
            "bad JSON at char 37: Expecting property name enclosed in double quotes",
        ),
        ('{"name": "add" "arguments": {}}', "bad JSON at char 15: Expecting ',' delimiter"),
        ('["add", 1]', "a tool call must be a JSON object, got an array"),
        ('{"arguments": {"a": 1}}', "the tool call's 'name' is missing"),
        ('{"name": 3, "arguments": {}}', "the tool call's 'name' should be a non-empty string, got an integer"),
        ('{"name": "add", "arguments": [1]}', "'arguments' should be a JSON object, got an array"),
        ('{"name": "ad", "arguments": {"a": 1}}', "unknown tool 'ad' (did you mean 'add'?)"),
        ('{"name": "zzz", "arguments": {}}', "unknown tool 'zzz' (available: add, calculator, search)"),
        ('{"name": "add", "arguments": {"b": 1}}', "missing required argument 'a'"),
        ('{"name": "add", "arguments": {"a": "3"}}', "argument 'a' should be an integer, got \"3\""),
        ('{"name": "add", "arguments": {"a": true}}', "argument 'a' should be an integer, got true"),
        ('{"name": "add", "arguments": {"a": 1.5}}', "argument 'a' should be an integer, got 1.5"),
        ('{"name": "add", "arguments": {"a": 1, "c": 2}}', "unexpected argument 'c'"),
        ('{"name": "add", "arguments": {"c": 2}}', "unexpected argument 'c'; missing required argument 'a'"),
        (
            '{"name": "search", "arguments": {"query": "x", "limit": null, "tags": ["a", 2]}}',
            "argument 'tags' item 1 should be a string, got 2",
        ),
        (
            '{"name": "search", "arguments": {"query": "x", "mode": "books"}}',
            'argument \'mode\' should be one of "web", "news", got "books"',
        ),
        (
            '{"name": "search", "arguments": {"query": "x", "limit": "5"}}',
            "argument 'limit' should be an integer or null, got \"5\"",
        ),
    ],
)
def test_malformed_calls_are_error_values(body, message):
    err = _error(body)
    assert err.message == message
    assert err.raw == f"<tool_call>\n{body}\n</tool_call>"


@pytest.mark.parametrize("fmt", ["hermes", "llama3"])
@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ("[" * 5000 + "]" * 5000, "nested too deeply"),  # json raises RecursionError, not JSONDecodeError
        ("9" * 5000, "Exceeds the limit (4300 digits) for integer string conversion"),  # a ValueError
        ('"' + "[" * 5000 + '"', "nested too deeply"),  # the OpenAI style: arguments as a JSON string
    ],
)
def test_model_text_json_cannot_parse_is_an_error_value(fmt, arguments, reason):
    """Whatever the model writes is a ToolCallError at worst: json's RecursionError on deep nesting and
    ValueError on huge integers must not end the run."""
    body = f'{{"name": "add", "{"parameters" if fmt == "llama3" else "arguments"}": {arguments}}}'
    text = body if fmt == "llama3" else f"<tool_call>{body}</tool_call>"
    (err,) = parse_tool_calls(text, TOOLS, fmt)
    assert isinstance(err, ToolCallError) and err.message.startswith("bad JSON") and reason in err.message, err


def test_an_optional_literal_takes_null():
    """Optional[Literal[...]]: null is one of the values (the enum lists it), so an explicit null is a call."""

    def sort(order: Literal["asc", "desc"] | None = None) -> str:
        """Sort."""
        return str(order)

    tool = Tool.from_function(sort)
    assert tool.parameters["properties"]["order"] == {"type": ["string", "null"], "enum": ["asc", "desc", None]}
    (call,) = parse_tool_calls('<tool_call>{"name": "sort", "arguments": {"order": null}}</tool_call>', [tool])
    assert call == ToolCall("sort", {"order": None}, call.raw)
    (bad,) = parse_tool_calls('<tool_call>{"name": "sort", "arguments": {"order": "up"}}</tool_call>', [tool])
    assert bad.message == 'argument \'order\' should be one of "asc", "desc", null, got "up"'


def test_lone_surrogate_escapes_become_replacement_characters():
    """JSON lets the model write half of a surrogate pair ("\\ud83d"): json.loads makes it a lone surrogate,
    which no UTF-8 encoder (the tokenizer, the sandbox's code file) takes. Every parsed string gets U+FFFD."""
    echo = Tool.from_function(shout, name="echo")
    text = '<tool_call>{"name": "echo", "arguments": {"text": "hi \\ud83d!"}}</tool_call>'
    (call,) = parse_tool_calls(text, [echo])
    assert call.arguments == {"text": "hi \ufffd!"}
    (result,) = run_tool_calls([call], [echo])
    assert result.content == "HI \ufffd!" and result.content.encode("utf-8")
    bad = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": "\\udc00"}}</tool_call>', TOOLS)
    assert bad[0].message == "argument 'a' should be an integer, got \"\ufffd\""
    as_string = '{"name": "echo", "parameters": "{\\"text\\": \\"\\\\ud800\\"}"}'  # arguments as a JSON string
    assert parse_tool_calls(as_string, [echo], "llama3")[0].arguments == {"text": "\ufffd"}
    pair = '<tool_call>{"name": "echo", "arguments": {"text": "\\ud83d\\ude00"}}</tool_call>'
    assert parse_tool_calls(pair, [echo])[0].arguments == {"text": "\U0001f600"}  # a whole pair is kept
    surrogate_tool = Tool.from_function(lambda: "x\udcff", name="raw_bytes")  # a tool's own result
    assert call_tool(surrogate_tool, ToolCall("raw_bytes", {}, "")).content == "x\ufffd"
    assert run_python("print('a\udc80b')").stdout == "a?b\n"  # code a caller passes with one runs


def test_a_closing_tag_inside_a_json_string_does_not_end_the_hermes_block():
    """The model passes code or text that holds "</tool_call>": the block ends after its JSON, not at
    the tag inside the string (which cut the JSON and made a valid call a "bad JSON" error)."""
    echo = Tool.from_function(shout, name="echo")
    first = '<tool_call>\n{"name": "echo", "arguments": {"text": "a </tool_call> b"}}\n</tool_call>'
    second = '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    calls = parse_tool_calls(f"Let me see.\n{first}\n{second} done", [echo, *TOOLS])
    assert calls == [ToolCall("echo", {"text": "a </tool_call> b"}, first), ToolCall("add", {"a": 1}, second)]
    assert assistant_message(f"{first}{second}", calls)["content"] == ""  # each raw is the whole block
    # an unclosed block with the tag in a string, and JSON followed by junk (still an error, quoted whole)
    (unclosed,) = parse_tool_calls('<tool_call>{"name": "echo", "arguments": {"text": "</tool_call>"}}', [echo])
    assert unclosed.arguments == {"text": "</tool_call>"}
    junk = '<tool_call>{"name": "echo", "arguments": {"text": "</tool_call>"}} junk</tool_call>'
    (err,) = parse_tool_calls(junk, [echo])
    assert err == ToolCallError("bad JSON at char 56: Extra data", junk)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused(literal):
    """Python's json reads NaN, Infinity and 1e999 (inf): none is a number a tool can compute with."""
    text = '<tool_call>{"name": "search", "arguments": {"query": "x", "weights": [1, %s]}}</tool_call>'
    (err,) = parse_tool_calls(text % literal, TOOLS)
    shown = {"1e999": "Infinity"}.get(literal, literal)
    assert err.message == f"argument 'weights' item 1 should be a finite number, got {shown}"
    as_int = '<tool_call>{"name": "add", "arguments": {"a": %s}}</tool_call>'
    (int_err,) = parse_tool_calls(as_int % literal, TOOLS)
    assert int_err.message == f"argument 'a' should be an integer, got {shown}"
    (ok,) = parse_tool_calls(text % "2.5", TOOLS)
    assert ok.arguments["weights"] == [1, 2.5]


@pytest.mark.parametrize(
    "body, fmt, message, name",
    [
        ('{"name": "add", "arguments": {"a": 1, "a": 2}}', "hermes", "duplicate key 'a' in the tool call", "add"),
        ('{"name": "add", "name": "search", "arguments": {}}', "hermes", "duplicate key 'name' in the tool call", None),
        (
            '{"name": "add", "arguments": "{\\"b\\": 1, \\"b\\": 2}"}',
            "hermes",
            "duplicate key 'b' in 'arguments'",
            "add",
        ),
        (
            '{"name": "add", "parameters": {"a": 1, "b": 2, "b": 3}}',
            "llama3",
            "duplicate key 'b' in the tool call",
            None,
        ),
    ],
)
def test_duplicate_keys_are_an_error_naming_the_key(body, fmt, message, name):
    """json keeps the last of two equal keys silently: {"a": 1, "a": 2} would run add(a=2)."""
    text = f"<tool_call>{body}</tool_call>" if fmt == "hermes" else body
    (err,) = parse_tool_calls(text, TOOLS, fmt)
    assert err == ToolCallError(f"{message} (each key once)", text, name)
    result = call_tool(None, err)
    assert (result.ok, result.error_kind, result.content) == (False, "bad_call", f"error: {err.message}")


def test_a_tool_that_exits_is_a_failed_result_without_a_timeout():
    """sys.exit in a tool (argparse does it on bad arguments) is the tool's failure; without a timeout it
    ran in this thread and ended the run. A KeyboardInterrupt there is the user's Ctrl-C: it stops."""
    import sys

    def quits(code: int) -> str:
        """Exit."""
        sys.exit(code if code else None)

    def interrupted() -> str:
        """Ctrl-C."""
        raise KeyboardInterrupt

    tool = Tool.from_function(quits)
    for timeout_s in (None, 5.0):
        result = call_tool(tool, ToolCall("quits", {"code": 3}, ""), timeout_s=timeout_s)
        assert result == ToolResult("error: SystemExit: 3", False, "exception", "quits")
        bare = call_tool(tool, ToolCall("quits", {"code": 0}, ""), timeout_s=timeout_s)
        assert bare == ToolResult("error: SystemExit", False, "exception", "quits")
    with pytest.raises(KeyboardInterrupt):
        call_tool(Tool.from_function(interrupted), ToolCall("interrupted", {}, ""), timeout_s=None)


def shout(text: str) -> str:
    """Say it louder.

    Args:
        text: what to say
    """
    return text.upper()


def test_error_keeps_the_name_when_known():
    assert _error('{"name": "add", "arguments": {}}').name == "add"
    assert _error('{"name": "add", "arguments": {').name is None


def test_llama3_format():
    call = ToolCall("add", {"a": 1, "b": 2}, '{"name": "add", "parameters": {"a": 1, "b": 2}}')
    assert parse_tool_calls('{"name": "add", "parameters": {"a": 1, "b": 2}}', TOOLS, "llama3") == [call]
    assert parse_tool_calls(
        '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}<|eom_id|>', TOOLS, "llama3"
    ) == [call]
    two = parse_tool_calls(
        '{"name": "add", "parameters": {"a": 1}}; {"name": "calculator", "parameters": {"expression": "2*3"}}',
        TOOLS,
        "llama3",
    )
    assert [(c.name, c.arguments) for c in two] == [("add", {"a": 1}), ("calculator", {"expression": "2*3"})]
    assert parse_tool_calls("The answer is 4.", TOOLS, "llama3") == []  # plain text: no call
    assert parse_tool_calls('{"x": 1} is a dict', TOOLS, "llama3") == []  # JSON without "name": an answer
    assert (
        _error('{"name": "add", "parameters": {"a": 1}', "llama3").message
        == "bad JSON at char 38: Expecting ',' delimiter"
    )
    call, trailing = parse_tool_calls('{"name": "add", "parameters": {"a": 1}} thanks', TOOLS, "llama3")
    assert call == ToolCall("add", {"a": 1}, '{"name": "add", "parameters": {"a": 1}}')
    assert trailing == ToolCallError("unexpected text after the tool call at char 40", "thanks")
    assert _error("<|python_tag|>print(1)", "llama3").message.startswith("after <|python_tag|> a JSON tool call")
    assert (
        _error('{"name": "add", "parameters": {"a": "x"}}', "llama3").message
        == "argument 'a' should be an integer, got \"x\""
    )
    # the OpenAI layout's "type": "function" is a call too; any other "type" is not
    typed = '{"type": "function", "name": "add", "parameters": {"a": 1}}'
    assert parse_tool_calls(typed, TOOLS, "llama3") == [ToolCall("add", {"a": 1}, typed)]
    assert parse_tool_calls(f"<tool_call>{typed}</tool_call>", TOOLS)[0].arguments == {"a": 1}
    assert _error('{"type": "tool", "name": "add", "parameters": {"a": 1}}', "llama3").message == (
        "unexpected key 'type' in the tool call (expected 'name' and 'parameters')"
    )


QWEN_STYLE = """\
{%- if tools %}
<|im_start|>system
You are a helpful assistant.

# Tools

You may call one or more functions. Function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ '\\n' }}{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a JSON object within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '\\n<|im_start|>user' }}{% endif %}
{{ '\\n<tool_response>\\n' }}{{ message.content }}{{ '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>' }}{% endif %}
{%- elif message.role == 'assistant' and message.tool_calls %}
{{ '\\n<|im_start|>assistant' }}{% if message.content %}{{ '\\n' + message.content }}{% endif %}
{%- for tc in message.tool_calls %}
{{ '\\n<tool_call>\\n{"name": "' + tc.function.name + '", "arguments": ' }}{{ tc.function.arguments | tojson }}{{ '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>' }}
{%- else %}
{{ '\\n<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '\\n<|im_start|>assistant\\n' }}{% endif %}
"""  # noqa: E501

LLAMA_STYLE = """\
{{- bos_token }}
{%- if tools %}{{ '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython<|eot_id|>' }}{% endif %}
{%- for message in messages %}
{%- if message.role == 'tool' or message.role == 'ipython' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}
{%- if message.content is mapping %}{{ message.content | tojson }}{% else %}{{ message.content }}{% endif %}
{{- '<|eot_id|>' }}
{%- elif message.tool_calls %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- for tc in message.tool_calls %}{{ '<|python_tag|>{"name": "' + tc.function.name + '", "parameters": ' }}{{ tc.function.arguments | tojson }}{{ '}' }}{% endfor %}
{{- '<|eom_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}
"""  # noqa: E501


def test_detect_format_and_registry():
    assert detect_format(QWEN_STYLE) == "hermes"
    assert detect_format(LLAMA_STYLE) == "llama3"
    assert detect_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert detect_format(None) is None
    with pytest.raises(ValueError, match="unknown tool-call format 'herms' \\(did you mean 'hermes'\\?\\)"):
        get_format("herms")


# ----------------------------------------------------------------------------- running calls and built-ins


def test_calculator_answers():
    assert calculator("(3 + 4) * 2 ** 5") == 224
    assert calculator("7 // 2") == 3 and calculator("-7 % 3") == 2 and calculator("6 / 4") == 1.5
    assert calculator("1 / 3") == pytest.approx(1 / 3, rel=0, abs=1e-15)
    assert calculator("2 ** 100") == 2**100 and calculator("-(2.5)") == -2.5
    assert calculator("6 / 2") == 3 and isinstance(calculator("6 / 2"), int)  # integral floats read as ints


@pytest.mark.parametrize(
    "expression, message",
    [
        ("x + 1", "names are not allowed ('x')"),
        ("__import__('os')", "function calls are not allowed"),
        ("(1).real", "Attribute is not allowed"),
        ("2 ** 100000", "exponent too large (100000, at most 10000)"),
        ("9 ** 9 ** 9", "exponent too large (387420489, at most 10000)"),
        ("10 ** 5000", "the result is too large (more than 4096 bits)"),
        ("1e308 * 10", "the result is too large (not a finite number)"),
        ("1 / 0", "division by zero"),
        ("'a' * 3", "only numbers are allowed, got 'a'"),
        ("1 +", "not an arithmetic expression"),
        ("1" * 501, "expression too long (501 characters, at most 500)"),
    ],
)
def test_calculator_refuses(expression, message):
    with pytest.raises(ValueError) as info:
        calculator(expression)
    assert message in str(info.value)


def test_a_tool_result_of_any_value_is_text():
    """A tool returning its own ToolResult with a dict as content crashed the run (TypeError from the
    text check) and a dict with tuple keys, which JSON cannot write, was a failed call: both are now
    text, the first as JSON keeping the tool's verdict, the second through str()."""

    def verdict(x: int) -> ToolResult:
        return ToolResult({"value": x, "unit": "m"}, False, "range")

    def pairs(x: int) -> dict:
        return {(1, 2): x}

    r = call_tool(Tool.from_function(verdict), ToolCall("verdict", {"x": 3}, ""))
    assert r == ToolResult('{"value": 3, "unit": "m"}', False, "range", "verdict")
    cut = call_tool(Tool.from_function(verdict), ToolCall("verdict", {"x": 3}, ""), max_chars=10)
    assert cut.content == '{"value": ' + "\n... [truncated: 15 more characters]"
    p = call_tool(Tool.from_function(pairs), ToolCall("pairs", {"x": 3}, ""))
    assert p == ToolResult("{(1, 2): 3}", True, None, "pairs")


def test_call_tool_results_and_failures():
    tools = {t.name: t for t in TOOLS}
    ok = call_tool(tools["add"], ToolCall("add", {"a": 2, "b": 3}, ""))
    assert ok == ToolResult("5", True, None, "add")
    data = call_tool(tools["search"], ToolCall("search", {"query": "pi"}, ""))
    assert json.loads(data.content) == {"query": "pi", "limit": None} and data.ok
    err = call_tool(tools["calculator"], ToolCall("calculator", {"expression": "1/0"}, ""))
    assert err == ToolResult("error: ValueError: division by zero", False, "exception", "calculator")
    assert "Traceback" not in err.content
    bad = call_tool(None, ToolCallError("missing required argument 'a'", "<raw>", "add"))
    assert bad == ToolResult("error: missing required argument 'a'", False, "bad_call", "add")

    def slow(seconds: float) -> str:
        time.sleep(seconds)
        return "done"

    t0 = time.monotonic()
    late = call_tool(Tool.from_function(slow), ToolCall("slow", {"seconds": 2.0}, ""), timeout_s=0.2)
    assert time.monotonic() - t0 < 1.0
    assert late == ToolResult("error: the tool did not answer within 0.2 s", False, "timeout", "slow")

    def chatty() -> str:
        return "x" * 150

    cut = call_tool(Tool.from_function(chatty), ToolCall("chatty", {}, ""), max_chars=100)
    assert cut.content == "x" * 100 + "\n... [truncated: 50 more characters]"

    def huge() -> int:
        return 10**5000  # past Python's int -> str digit limit: the result fails, not the run

    big = call_tool(Tool.from_function(huge), ToolCall("huge", {}, ""))
    assert not big.ok and big.error_kind == "exception"
    assert big.content.startswith("error: the result cannot be written as text (ValueError: Exceeds the limit")

    calls = parse_tool_calls(
        '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call><tool_call>{"name": "ad"}</tool_call>', TOOLS
    )
    results = run_tool_calls(calls, TOOLS)
    assert [(r.content, r.ok, r.error_kind) for r in results] == [
        ("1", True, None),
        ("error: unknown tool 'ad' (did you mean 'add'?)", False, "bad_call"),
    ]
    stats = ToolStats()
    stats.add([*results, err, late])
    assert stats.metrics() == {
        "tools/calls": 4.0,
        "tools/failures": 3.0,
        "tools/failures/bad_call": 1.0,
        "tools/failures/exception": 1.0,
        "tools/failures/timeout": 1.0,
        "tools/add/calls": 1.0,
        "tools/ad/calls": 1.0,
        "tools/calculator/calls": 1.0,
        "tools/slow/calls": 1.0,
    }
    assert set(builtin_tools()) == {"calculator", "python"}


# ----------------------------------------------------------------------------- the sandbox


def _sandbox_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "minigrpo-sandbox-*")))


def test_sandbox_output_result_and_exception():
    before = _sandbox_dirs()
    run = run_python("import math\nprint('hi')\nmath.factorial(10)")
    assert (run.stdout, run.stderr, run.exit_status, run.timed_out) == ("hi\n3628800\n", "", 0, False)
    assert run.ok
    boom = run_python("def f(x):\n    return 1 / x\nprint('before')\nf(0)")
    assert boom.exit_status == 1 and not boom.ok and boom.stdout == "before\n"
    assert boom.stderr.splitlines()[-1] == "ZeroDivisionError: division by zero"
    assert 'File "<code>", line 2, in f' in boom.stderr and "<string>" not in boom.stderr  # bootstrap hidden
    assert run_python("import sys; sys.exit(3)").exit_status == 3
    code = "import resource as r\n[r.getrlimit(r.RLIMIT_AS), r.getrlimit(r.RLIMIT_FSIZE), r.getrlimit(r.RLIMIT_CPU)]"
    limits = run_python(code, timeout_s=2.5, memory_mb=300, max_file_mb=2)
    assert limits.stdout == f"[({300 << 20}, {300 << 20}), ({2 << 20}, {2 << 20}), (4, 5)]\n"  # CPU: ceil(2.5 + 1)
    result = python("print(6 * 7)")
    assert result == ToolResult("42", True, None, "python")
    failed = python("raise ValueError('no good')")
    assert (failed.ok, failed.error_kind) == (False, "error")
    assert failed.content.endswith("ValueError: no good\n[exit status 1]")
    assert _sandbox_dirs() - before == set()  # every run's folder is gone


def test_sandbox_time_memory_and_output_limits():
    t0 = time.monotonic()
    loop = run_python("while True:\n    pass", timeout_s=1.0)
    assert time.monotonic() - t0 < 2.0  # killed within timeout + 1 s
    assert loop.timed_out and loop.exit_status == -9 and not loop.ok
    t0 = time.monotonic()
    cpu = run_python("while True:\n    pass", timeout_s=10.0, cpu_s=1)
    assert time.monotonic() - t0 < 8.0 and cpu.cpu_exceeded and not cpu.timed_out and cpu.exit_status == -24
    memory = run_python("b = bytearray(2 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert memory.memory_exceeded and memory.stdout == "" and "MemoryError" in memory.stderr
    loud = run_python(
        "print('x' * 100_000)\nimport sys\n_ = sys.stderr.write('e' * 5000 + 'END')", max_output_chars=100
    )
    assert loud.output_truncated
    assert loud.stdout == "x" * 100 + "\n... [output truncated: 99901 more characters]"
    assert loud.stderr == "[... 4903 earlier characters cut]\n" + "e" * 97 + "END"
    tool = python_tool(timeout_s=1.0)
    slow = call_tool(tool, ToolCall("python", {"code": "import time\ntime.sleep(10)"}, ""), timeout_s=5.0)
    assert (slow.ok, slow.error_kind) == (False, "timeout") and "killed: time limit exceeded" in slow.content


def test_sandbox_output_split_inside_a_character_decodes_whole():
    """A UTF-8 character whose bytes arrive in two reads of the pipe (a flush between them) is one
    character, not two replacement characters; bytes that are no UTF-8 still become U+FFFD."""
    code = (
        "import sys, time\n"
        "e, u = 'é'.encode(), 'ü'.encode()\n"
        "sys.stdout.buffer.write(b'a' + e[:1]); sys.stdout.flush(); time.sleep(0.3)\n"
        "sys.stdout.buffer.write(e[1:] + u + b'\\xff'); sys.stdout.flush()\n"
        "sys.stderr.buffer.write(u[:1]); sys.stderr.flush(); time.sleep(0.3); _ = sys.stderr.buffer.write(u[1:])"
    )
    run = run_python(code)
    assert (run.stdout, run.stderr, run.exit_status) == ("aéü\ufffd", "ü", 0)


def test_sandbox_refuses_network_and_writes_outside(tmp_path):
    outside = tmp_path / "outside.txt"
    code = f"""
import os, socket, urllib.request
for attempt in (lambda: socket.socket(), lambda: urllib.request.urlopen("http://127.0.0.1:9"),
                lambda: open({str(outside)!r}, "w"), lambda: os.remove({str(tmp_path / "x")!r}),
                lambda: __import__("subprocess").run(["true"])):
    try:
        attempt()
        print("allowed")
    except PermissionError as e:
        print("refused:", str(e).split(":")[1].strip())
    except Exception as e:
        print("refused by", type(e).__name__, e)
with open("inside.txt", "w") as f:
    f.write("ok")
print(open("inside.txt").read(), os.listdir("."), os.environ["HOME"] == os.getcwd(), "http_proxy" in os.environ)
"""
    run = run_python(code)
    assert run.exit_status == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "refused: socket.__new__ is not allowed"
    assert lines[1].startswith("refused by URLError") and "socket" in lines[1]
    assert lines[2:5] == [
        "refused: writing outside the working directory is not allowed",
        "refused: os.remove outside the working directory is not allowed",
        "refused: subprocess.Popen is not allowed",
    ]
    assert lines[5] == "ok ['inside.txt'] True False"
    assert not outside.exists()


def test_sandbox_counts_relative_paths_from_where_the_code_moved(tmp_path):
    """A relative path was checked as if the code still stood in its working directory: after
    os.chdir to another folder, open("x", "w") wrote there (the sandbox promises no writes outside).
    It now counts from the current directory: refused outside, allowed in a subfolder of its own."""
    code = f"""
import os
os.mkdir("sub")
os.chdir("sub")
open("inner.txt", "w").write("in")
os.chdir({str(tmp_path)!r})
for attempt in (lambda: open("escape.txt", "w"), lambda: os.mkdir("escaped"), lambda: os.remove("keep.txt")):
    try:
        attempt()
        print("allowed")
    except PermissionError as e:
        print("refused:", str(e).split(":")[1].strip())
"""
    (tmp_path / "keep.txt").write_text("kept")
    run = run_python(code)
    assert run.exit_status == 0, run.stderr
    assert run.stdout.splitlines() == [
        "refused: writing outside the working directory is not allowed",
        "refused: os.mkdir outside the working directory is not allowed",
        "refused: os.remove outside the working directory is not allowed",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


# ----------------------------------------------------------------------------- rendering


def test_render_through_a_qwen_style_template():
    text = (
        'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1/0"}}\n</tool_call>'
    )
    calls = parse_tool_calls(text, TOOLS, detect_format(QWEN_STYLE))
    results = run_tool_calls(calls, TOOLS)
    messages = [{"role": "user", "content": "2+3?"}, assistant_message(text, calls), *tool_messages(results)]
    assert messages[1]["content"] == "Sure."
    assert messages[2:] == [
        {"role": "tool", "content": "5", "name": "add"},
        {"role": "tool", "content": "error: ValueError: division by zero", "name": "calculator"},
    ]
    out = render_chat_template(QWEN_STYLE, messages, tools=[t.spec() for t in TOOLS], add_generation_prompt=True)
    assert json.dumps(TOOLS[0].spec()) in out
    assert out.endswith(
        "<|im_start|>user\n2+3?<|im_end|>\n"
        "<|im_start|>assistant\nSure.\n"
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1/0"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n5\n</tool_response>\n"
        "<tool_response>\nerror: ValueError: division by zero\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # the template writes calls back in the format they are parsed from
    assistant_turn = out.split("<|im_start|>assistant\n")[1]
    assert [(c.name, c.arguments) for c in parse_tool_calls(assistant_turn, TOOLS)] == [
        ("add", {"a": 2, "b": 3}),
        ("calculator", {"expression": "1/0"}),
    ]


def test_render_through_a_llama_style_template():
    text = '<|python_tag|>{"name": "add", "parameters": {"a": 40, "b": 2}}'
    calls = parse_tool_calls(text, TOOLS, detect_format(LLAMA_STYLE))
    messages = [{"role": "user", "content": "40+2?"}, assistant_message(text, calls)]
    messages += tool_messages(run_tool_calls(calls, TOOLS))
    assert messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 40, "b": 2}}}],
    }
    out = render_chat_template(
        LLAMA_STYLE,
        messages,
        tools=[t.spec() for t in TOOLS],
        add_generation_prompt=True,
        variables={"bos_token": "<|begin_of_text|>"},
    )
    assert out == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n40+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '<|python_tag|>{"name": "add", "parameters": {"a": 40, "b": 2}}<|eom_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n42<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    turn = out.split("<|start_header_id|>assistant<|end_header_id|>\n\n")[1].split("<|eom_id|>")[0] + "<|eom_id|>"
    assert parse_tool_calls(turn, TOOLS, "llama3") == [ToolCall("add", {"a": 40, "b": 2}, calls[0].raw)]
