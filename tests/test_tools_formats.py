"""Tool-call formats beyond the basics: Mistral's newer `[TOOL_CALLS]name[ARGS]{...}` form beside the
`[TOOL_CALLS] [...]` one, several calls in a turn, malformed arguments, unknown tools and unicode; each
checked through the chat template that writes the form (rendered by transformers' jinja renderer as the
reference). CPU only, no model."""

from __future__ import annotations

import re
from typing import Literal

import pytest
from test_chat_template import QWEN25_TEMPLATE

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


# ---- Llama-3.1, Mistral v0.3 / Nemo and Qwen2.5 templates as the models ship them ---------------------------
# ruff: noqa: E501  (the templates are kept as the models ship them)

# Llama-3.1-8B-Instruct: "Environment: ipython", built-in tools (`builtin_tools`), custom tools in the first user
# message (or the system message with tools_in_user_message=False), a fixed date unless `date_string` is given
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


def mistral_v3_template(spaced: bool) -> str:
    """Mistral-7B-Instruct-v0.3's template (spaced: "[INST] ", "[TOOL_CALLS] [", " " + trimmed answers) or
    Mistral-Nemo-Instruct-2407's (no spaces): [AVAILABLE_TOOLS], [TOOL_CALLS] with 9-character ids,
    [TOOL_RESULTS] naming the call_id."""
    s = " " if spaced else ""
    return (
        (
            r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS]<SP>[" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST]<SP>" + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST]<SP>" + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS]<SP>[" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- <ANSWER> + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS]<SP>{"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""
        )
        .replace("<SP>", s)
        .replace("<ANSWER>", '" " + message["content"]|trim' if spaced else 'message["content"]')
    )


MISTRAL_V03_TEMPLATE, MISTRAL_NEMO_TEMPLATE = mistral_v3_template(True), mistral_v3_template(False)
TEMPLATES = {
    "llama3.1": LLAMA31_TEMPLATE,
    "mistral-v0.3": MISTRAL_V03_TEMPLATE,
    "mistral-nemo": MISTRAL_NEMO_TEMPLATE,
    "qwen2.5": QWEN25_TEMPLATE,
}
ANSWER_HEADS = {  # where the assistant's turn starts, for each template
    "llama3.1": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral-v0.3": "[/INST]",
    "mistral-nemo": "[/INST]",
    "qwen2.5": "<|im_start|>assistant\n",
}
ANSWER_ENDS = ("<|eot_id|>", "<|eom_id|>", "</s>", "<|im_end|>\n")  # the stop token ends the model's text


def lookup(city: str, units: Literal["metric", "imperial"] = "metric", days: list[int] = (0,)):
    """Look up the weather of a city.

    Args:
        city: the city's name.
        units: the units of the numbers.
        days: which days ahead (0 is today).
    """
    return {"city": city, "t": 20}


def web_search(query: str) -> str:
    """Search the web.

    Args:
        query: what to look for.
    """
    return f"results for {query}"


def model_text(template: str, name: str, messages: list[dict], **variables) -> str:
    """The final assistant turn of `messages` as the template renders it, without its stop token: the
    text a model trained on the template writes for those calls."""
    text = render_chat_template(template, messages, variables={"bos_token": "<s>", "eos_token": "</s>", **variables})
    text = text[text.rindex(ANSWER_HEADS[name]) + len(ANSWER_HEADS[name]) :]
    return next((text.removesuffix(end) for end in ANSWER_ENDS if text.endswith(end)), text)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_tools_given_as_functions_render_as_transformers(name):
    """tools= takes Python functions and Tools beside JSON schemas, as transformers' apply_chat_template does
    (before: TypeError 'tools must be a list of dicts'); with a call, a result and the generation prompt."""
    template = TEMPLATES[name]
    call = {"type": "function", "id": "Ab3456789", "function": {"name": "lookup", "arguments": {"city": "Zürich"}}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"t": 20}', "name": "lookup", "tool_call_id": "Ab3456789"},
    ]
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    reference = render_with_transformers(template, messages, tools=[lookup], add_generation_prompt=True)
    assert '"description": "Look up the weather of a city."' in reference
    for tools in ([lookup], [Tool.from_function(lookup)], [Tool.from_function(lookup).spec()]):
        text = render_chat_template(template, messages, tools=tools, add_generation_prompt=True, variables=tokens)
        assert text == reference

    def note(text):
        """Take a note."""

    with pytest.raises(ValueError, match="cannot declare 'note' as a tool: parameter 'text' has no type annotation"):
        render_chat_template(template, messages, tools=[note], variables=tokens)
    with pytest.raises(TypeError, match="a tool must be a JSON-schema dict, a function or a Tool, got int"):
        render_chat_template(template, messages, tools=[3], variables=tokens)


ROUND_TRIPS = [  # (template, format, the calls of one turn, template variables)
    ("llama3.1", "llama3", [("lookup", {"city": 'Zürich "Altstadt" \\ 日本', "days": [0, 1]})], {}),
    ("llama3.1", "llama3", [("lookup", {"city": "Bern"})], {"builtin_tools": ["web_search"]}),
    ("llama3.1", "llama3", [("web_search", {"query": 'rain, "Bern" (today)'})], {"builtin_tools": ["web_search"]}),
    ("mistral-v0.3", "mistral", [("lookup", {"city": "Bern"}), ("web_search", {"query": "x"})], {}),
    (
        "mistral-nemo",
        "mistral",
        [("lookup", {"city": "Bern", "units": "imperial"}), ("web_search", {"query": "y"})],
        {},
    ),
    ("qwen2.5", "hermes", [("lookup", {"city": "Bern"}), ("web_search", {"query": "z"})], {}),
]


@pytest.mark.parametrize("name, fmt, calls, variables", ROUND_TRIPS)
def test_the_calls_a_template_renders_parse_back_to_the_same_calls(name, fmt, calls, variables):
    """The text a template writes for an assistant's calls is read back by the format's parser as the same
    calls (names, arguments, ids), and the parsed turn renders back to that text, ours as transformers'.
    Llama-3.1 writes a built-in tool's call as `<|python_tag|>web_search.call(query="...")<|eom_id|>`:
    before, that was 'after <|python_tag|> a JSON tool call ... was expected'."""
    template, tools = TEMPLATES[name], [Tool.from_function(lookup), Tool.from_function(web_search)]
    ids = ["Ab3456789", "Zz9876543"]
    tool_calls = [
        {"type": "function", "id": ids[i], "function": {"name": n, "arguments": a}} for i, (n, a) in enumerate(calls)
    ]
    opening = [{"role": "user", "content": "Weather?"}]
    messages = [*opening, {"role": "assistant", "content": "", "tool_calls": tool_calls}]
    specs = [t.spec() for t in tools]
    text = model_text(template, name, messages, tools=specs, **variables)
    assert detect_format(template) == fmt
    parsed = parse_tool_calls(text, tools, fmt)
    assert [(c.name, c.arguments) for c in parsed] == calls, parsed
    if fmt == "mistral":
        assert [c.id for c in parsed] == ids[: len(calls)]
    turn = [*opening, assistant_message(text, parsed)]
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    again = render_chat_template(template, turn, tools=specs, variables={**tokens, **variables})
    assert again == render_chat_template(template, messages, tools=specs, variables={**tokens, **variables})
    assert again == render_with_transformers(template, turn, tools=specs, **variables)
    results = tool_messages(run_tool_calls(parsed, tools))
    assert [m.get("tool_call_id") for m in results] == [c.id or None for c in parsed]  # each result names its call
    full = [*turn, *results]
    ours = render_chat_template(
        template, full, tools=specs, add_generation_prompt=True, variables={**tokens, **variables}
    )
    assert ours == render_with_transformers(template, full, tools=specs, add_generation_prompt=True, **variables)


@pytest.mark.parametrize(
    "text, message",
    [
        ('<|python_tag|>web_search.call(query="a", query="b")', "duplicate key 'query' in the tool call"),
        ("<|python_tag|>web_search.call(query=3)", "bad arguments at char 0 of web_search.call(...)"),
        ("<|python_tag|>print(1 + 2)", 'after <|python_tag|> a JSON tool call {"name": ..., "parameters": {...}}'),
        ('<|python_tag|>web_search.call(q="a")', "unexpected argument 'q'; missing required argument 'query'"),
    ],
)
def test_malformed_llama_builtin_calls_are_error_values(text, message):
    (err,) = parse_tool_calls(text, [web_search], "llama3")
    assert isinstance(err, ToolCallError) and message in err.message, err


def test_mistral_calls_with_one_id_twice_get_distinct_ids():
    """Two calls of one turn with the same id would get results the model cannot tell apart (each names
    its call by id): the later one gets an id of its own. Before, both results named 'Ab3456789'."""
    text = (
        '[TOOL_CALLS] [{"name": "web_search", "arguments": {"query": "a"}, "id": "Ab3456789"}, '
        '{"name": "web_search", "arguments": {"query": "b"}, "id": "Ab3456789"}]'
    )
    first, second = parse_tool_calls(text, [web_search], "mistral")
    assert first.id == "Ab3456789" and re.fullmatch("[A-Za-z0-9]{9}", second.id) and second.id != first.id
    results = tool_messages(run_tool_calls([first, second], [web_search]))
    assert [(m["content"], m["tool_call_id"]) for m in results] == [
        ("results for a", first.id),
        ("results for b", second.id),
    ]
    messages = [{"role": "user", "content": "q"}, assistant_message(text, [first, second]), *results]
    template = MISTRAL_NEMO_TEMPLATE
    rendered = render_chat_template(template, messages, variables={"bos_token": "<s>", "eos_token": "</s>"})
    assert rendered == render_with_transformers(template, messages)
    assert f'"call_id": "{second.id}"' in rendered
