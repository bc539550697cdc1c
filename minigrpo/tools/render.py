"""Tool calls and results as chat messages, for the template to render.

    messages += [assistant_message(text, calls), *tool_messages(results)]
    tokenizer.apply_chat_template(messages, tools=[t.spec() for t in tools])

A template with tool support (it writes an assistant message's `tool_calls`: Qwen2.5, Llama-3.1,
Hermes): `tool_messages` gives `{"role": "tool", "content": ..., "name": ...}` messages, which a
Qwen2.5-style template renders as `<tool_response>` blocks inside a user turn and a Llama-3.1-style
one as an `ipython` turn; `assistant_message` gives the assistant turn with its `tool_calls` in the
OpenAI layout templates read (`{"type": "function", "function": {"name": ..., "arguments": {...}}}`).

A template without tool support (`renders_tool_calls` is False: SmolLM2's writes each message's
role and content and nothing else) would drop calls moved to `tool_calls` from the conversation,
and a `tool` message would open a role the model never saw (or make the template raise).
With `plain=True` the calls stay in the assistant's content as the model wrote them, and the results
come back as ONE user message holding a `<tool_response>` block per result, the layout Qwen2.5's
template itself gives tool results. Such a template shows no tool definitions either: the system
prompt must say what the tools are and how to call them.

A call with an id (the "mistral" format's) keeps it: as `id` of its `tool_calls` entry and as
`tool_call_id` of its result's message, which Mistral's template requires.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from minigrpo.chat_template import ChatTemplateError, render_chat_template
from minigrpo.tools.calls import ToolCall, ToolCallError
from minigrpo.tools.run import ToolResult

__all__ = ["assistant_message", "renders_tool_calls", "tool_messages"]

_PROBE_NAME = "probe_tool_name_4f1c"  # a name no template writes by itself
_PROBE_TOKENS = {f"{name}_token": "" for name in ("bos", "eos", "unk", "pad")}  # templates concatenate them


def renders_tool_calls(chat_template: str) -> bool:
    """Whether `chat_template` writes an assistant message's `tool_calls` (probed: the name of a call
    shows in the rendering). A template that raises on a call has no tool support either."""
    # with an id of 9 letters and digits: Mistral's template raises on a call without one
    call = {"type": "function", "function": {"name": _PROBE_NAME, "arguments": {}}, "id": "probe0001"}
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    try:
        return _PROBE_NAME in render_chat_template(chat_template, messages, variables=_PROBE_TOKENS)
    except ChatTemplateError:
        return False


def tool_messages(results: Iterable[ToolResult], *, plain: bool = False) -> list[dict[str, Any]]:
    """One "tool" message per result, in the order of the calls; plain: one user message with a
    `<tool_response>` block per result (a template without tool support, see the module docstring)."""
    results = list(results)
    if plain:
        blocks = [f"<tool_response>\n{r.content}\n</tool_response>" for r in results]
        return [{"role": "user", "content": "\n".join(blocks)}] if blocks else []
    return [
        {"role": "tool", "content": r.content, "name": r.name, **_call_id(r.call_id, "tool_call_id")} for r in results
    ]


def _call_id(call_id: str, key: str) -> dict[str, str]:
    """{key: call_id} for a call with an id (the "mistral" format gives them), else {}."""
    return {key: call_id} if call_id else {}


def assistant_message(
    text: str, calls: Iterable[ToolCall | ToolCallError] = (), *, plain: bool = False
) -> dict[str, Any]:
    """The assistant turn `text` with its well-formed calls moved to `tool_calls` (their text and a
    `<|python_tag|>` are cut from the content, the template writes them back); malformed calls stay
    in the content, so the conversation shows what the tool results complain about. plain: the text
    as it is, calls included (a template without tool support would not write them back)."""
    good = [c for c in calls if isinstance(c, ToolCall)]
    if plain or not good:
        return {"role": "assistant", "content": text}
    content = text
    for call in good:
        content = content.replace(call.raw, "", 1)
    content = content.replace("<|python_tag|>", "").strip()
    tool_calls = [
        {"type": "function", "function": {"name": c.name, "arguments": c.arguments}, **_call_id(c.id, "id")}
        for c in good
    ]
    return {"role": "assistant", "content": content, "tool_calls": tool_calls}
