"""The text of an environment's segment in a multi-turn episode (minigrpo/episodes.py).

    text = environment_text(tokenizer, history, assistant, new_messages, model_text=t, stop_text="<|im_end|>")

The chat template renders the conversation with the assistant turn, with and without the
environment's new messages (the second with the generation prompt); the segment's text is the
difference, which must be a clean extension (the rendering without the new messages is a prefix of
the one with them). It is tokenized on its own. A template that renders earlier turns differently
once more messages follow (e.g. one that drops the reasoning of turns before the last user message,
when the environment adds a user message) breaks the extension: `LayoutError` says where. We do not
re-render the past, because the past tokens are what the model was conditioned on; such a template
needs an environment whose messages do not trigger the change (tool messages do not, for Qwen3).

Before the difference comes the template's turn closer (what it writes after the assistant's
content, e.g. "<|im_end|>\\n"), found by rendering the assistant's raw text: when the model ended
its turn with a stop token whose text begins the closer, the rest of the closer goes first (the
"\\n"); a turn ended by a stop string gets the whole closer; a stop token that does not begin it
(e.g. Llama's <|eom_id|> where the closer is <|eot_id|>) ended the turn its own way and no closer is
added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, Any]

__all__ = ["LayoutError", "environment_text", "episode_template", "render"]


class LayoutError(ValueError):
    """The chat template does not extend the conversation cleanly with the environment's messages."""


def render(tokenizer: Any, messages: Sequence[Message], tools: Any, generation_prompt: bool) -> str:
    """The conversation as the chat template writes it (text, not tokens)."""
    return tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=generation_prompt, tokenize=False, tools=tools
    )


def episode_template(tokenizer: Any, tools: Any) -> str | None:
    """The chat template `render` uses: with `tools` (even an empty list) the tokenizer's "tool_use"
    template where it has one (Hermes-2-Pro's, Command-R's: apply_chat_template picks it, as
    transformers does), else its default. The tool-call format and tool support are read from it."""
    templates = getattr(tokenizer, "chat_templates", None) or {}
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    return getattr(tokenizer, "chat_template", None)


_PROBE_TEXT = "ok"  # a reply no template rewrites


def _turn_closer(tokenizer: Any, history: Sequence[Message], text: str, tools: Any) -> str:
    """What the template writes after the assistant's content `text` ("" if it cannot be told). A
    template that rewrites the text (Qwen3's re-spaces a `<think>` block the model wrote its own way)
    hides where it ends: the closer after a plain reply is the same."""
    closer = _closer_after(tokenizer, history, text, tools)
    if closer is None and text != _PROBE_TEXT:
        closer = _closer_after(tokenizer, history, _PROBE_TEXT, tools)
    return closer or ""


def _closer_after(tokenizer: Any, history: Sequence[Message], text: str, tools: Any) -> str | None:
    """The template's text after the assistant's content `text`; None where `text` is not found in it."""
    before = render(tokenizer, history, tools, True)
    after = render(tokenizer, [*history, {"role": "assistant", "content": text}], tools, False)
    if not after.startswith(before):
        return None
    turn = after[len(before) :]  # e.g. "content<|im_end|>\n"
    if turn.startswith(text):
        return turn[len(text) :]
    core = text.strip()
    at = turn.find(core) if core else -1
    return turn[at + len(core) :] if at >= 0 else None


def environment_text(
    tokenizer: Any,
    history: Sequence[Message],
    assistant: Message,
    new_messages: Sequence[Message],
    *,
    model_text: str,
    stop_text: str | None,
    tools: Any = None,
) -> str:
    """The text of the environment's segment after a model turn (see the module docstring).

    Args:
        history: the conversation before the model's turn.
        assistant: the model's turn as a message (its tool calls as `tool_calls`).
        new_messages: the environment's answer.
        model_text: the model's raw text (without its stop token).
        stop_text: the text of the stop token that ended the turn; None: a stop string ended it.
    Raises:
        LayoutError: the rendering with the new messages does not extend the one without them.
    """
    closer = _turn_closer(tokenizer, history, model_text, tools)
    if stop_text is not None:
        closer = closer[len(stop_text) :] if closer.startswith(stop_text) else ""
    without = render(tokenizer, [*history, assistant], tools, False)
    with_new = render(tokenizer, [*history, assistant, *new_messages], tools, True)
    if not with_new.startswith(without):
        at = next((i for i, (a, b) in enumerate(zip(without, with_new)) if a != b), len(with_new))
        raise LayoutError(
            "the chat template renders the conversation differently once the environment's messages "
            f"are added (from char {at}: {without[at : at + 40]!r} became {with_new[at : at + 40]!r}); "
            "the episode's tokens cannot extend what the model saw"
        )
    return closer + with_new[len(without) :]
