"""Tool calls and results as chat messages, for the template's own tool support to render.

    messages += [assistant_message(text, calls), *tool_messages(results)]
    tokenizer.apply_chat_template(messages, tools=[t.spec() for t in tools])

`tool_messages` gives `{"role": "tool", "content": ..., "name": ...}` messages: a Qwen2.5-style
template renders them as `<tool_response>` blocks inside a user turn, a Llama-3.1-style one as an
`ipython` turn. `assistant_message` gives the assistant turn with its `tool_calls` in the OpenAI
layout templates read (`{"type": "function", "function": {"name": ..., "arguments": {...}}}`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from minigrpo.tools.calls import ToolCall, ToolCallError
from minigrpo.tools.run import ToolResult

__all__ = ["assistant_message", "tool_messages"]


def tool_messages(results: Iterable[ToolResult]) -> list[dict[str, Any]]:
    """One "tool" message per result, in the order of the calls."""
    return [{"role": "tool", "content": r.content, "name": r.name} for r in results]


def assistant_message(text: str, calls: Iterable[ToolCall | ToolCallError] = ()) -> dict[str, Any]:
    """The assistant turn `text` with its well-formed calls moved to `tool_calls` (their text and a
    `<|python_tag|>` are cut from the content, the template writes them back); malformed calls stay
    in the content, so the conversation shows what the tool results complain about."""
    good = [c for c in calls if isinstance(c, ToolCall)]
    content = text
    for call in good:
        content = content.replace(call.raw, "", 1)
    if good:
        content = content.replace("<|python_tag|>", "").strip()
    tool_calls = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in good]
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message
