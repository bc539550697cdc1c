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
One change is no rewrite of the past: a decoration the template writes on the last assistant turn
only (Qwen3's empty `<think>` block: the tail of its generation prompt with enable_thinking=False, or
added after a turn written without reasoning) is gone from the turn once messages follow. The row
keeps what the model saw; the segment is what follows the turn.

Before the difference comes the template's turn closer (what it writes after the assistant's
content, e.g. "<|im_end|>\\n"), found by rendering the assistant's raw text: when the model ended
its turn with a stop token whose text begins the closer, the rest of the closer goes first (the
"\\n"); a turn ended by a stop string gets the whole closer; a stop token that does not begin it
(e.g. Llama's <|eom_id|> where the closer is <|eot_id|>) ended the turn its own way and no closer is
added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from minigrpo.chat_template import ChatTemplateError
from minigrpo.errors import UserError

Message = dict[str, Any]

__all__ = ["EnvironmentContractError", "LayoutError", "checked_messages", "checked_step", "environment_text",
           "episode_template", "opening_messages", "render"]  # fmt: skip


class LayoutError(ValueError):
    """The chat template does not extend the conversation cleanly with the environment's messages."""


class EnvironmentContractError(UserError, TypeError):
    """An environment's reset() or step() returned what the episodes cannot read (minigrpo/episodes.py)."""


def opening_messages(row: Any, system_prompt: str | None = None) -> list[Message]:
    """Messages from a row: a data.Example, a text (the user turn), a message list, or a mapping
    with "messages" or "prompt"; `system_prompt` replaces any system message."""
    if isinstance(row, Mapping):
        row = row.get("messages", row.get("prompt"))
    prompt = getattr(row, "prompt", row)
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, Sequence):
        messages = [dict(m) for m in prompt]
    else:
        raise TypeError(f"cannot make messages from a {type(row).__name__} row")
    if system_prompt is not None:
        messages = [{"role": "system", "content": system_prompt}, *(m for m in messages if m.get("role") != "system")]
    return messages


def checked_messages(value: Any, where: str) -> list[Message]:
    """`value` as a list of messages (dicts with a string "role", and "content" a string or a list of
    parts where given), else EnvironmentContractError naming `where` (e.g. "Maze.reset()") and the bad
    item: a string or a single dict would otherwise be spread into characters or keys."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise EnvironmentContractError(f"{where} returned {_show(value)}; expected a list of message dicts")
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not m["role"]:
            bad = f"{_show(m)} (no 'role' string)" if isinstance(m, Mapping) else _show(m)
            raise EnvironmentContractError(f"{where} returned message {i} = {bad}; expected a dict with a 'role'")
        if "content" in m and m["content"] is not None and not isinstance(m["content"], (str, list)):
            content = _show(m["content"])
            raise EnvironmentContractError(f"{where} returned message {i} with content {content}; expected a string")
    return [dict(m) for m in value]


def checked_step(value: Any, where: str) -> tuple[list[Message], bool]:
    """An environment's step() result as (messages, done), else EnvironmentContractError naming `where`:
    a missing `done`, or one that is no bool ("no" would end the episode silently)."""
    if not isinstance(value, tuple) or len(value) != 2:
        raise EnvironmentContractError(f"{where} returned {_show(value)}; expected a tuple (messages, done)")
    messages, done = value
    done = done.item() if hasattr(done, "item") and callable(done.item) else done  # a numpy or torch bool
    if not isinstance(done, bool):
        raise EnvironmentContractError(f"{where} returned done={_show(done)}; expected True or False")
    return checked_messages(messages, where), done


def _show(value: Any) -> str:
    """A short description of a value in an error message."""
    text = repr(value)
    return f"a {type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def render(
    tokenizer: Any,
    messages: Sequence[Message],
    tools: Any,
    generation_prompt: bool,
    variables: Mapping[str, Any] | None = None,
) -> str:
    """The conversation as the chat template writes it (text, not tokens); `variables` are more template
    variables (the environment's `chat_template_kwargs`, e.g. {"enable_thinking": False})."""
    return tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=generation_prompt, tokenize=False, tools=tools, **(variables or {})
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


def _turn_closer(
    tokenizer: Any, history: Sequence[Message], text: str, tools: Any, variables: Mapping[str, Any] | None
) -> str:
    """What the template writes after the assistant's content `text` ("" if it cannot be told). A
    template that rewrites the text (Qwen3's re-spaces a `<think>` block the model wrote its own way)
    hides where it ends: the closer after a plain reply is the same."""
    closer = _closer_after(tokenizer, history, text, tools, variables)
    if closer is None and text != _PROBE_TEXT:
        closer = _closer_after(tokenizer, history, _PROBE_TEXT, tools, variables)
    return closer or ""


def _closer_after(
    tokenizer: Any, history: Sequence[Message], text: str, tools: Any, variables: Mapping[str, Any] | None
) -> str | None:
    """The template's text after the assistant's content `text`; None where `text` is not found in it."""
    before = render(tokenizer, history, tools, True, variables)
    after = render(tokenizer, [*history, {"role": "assistant", "content": text}], tools, False, variables)
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
    variables: Mapping[str, Any] | None = None,
) -> str:
    """The text of the environment's segment after a model turn (see the module docstring).

    Args:
        history: the conversation before the model's turn.
        assistant: the model's turn as a message (its tool calls as `tool_calls`).
        new_messages: the environment's answer.
        model_text: the model's raw text (without its stop token).
        stop_text: the text of the stop token that ended the turn; None: a stop string ended it.
        variables: more template variables (e.g. {"enable_thinking": False}), as every rendering got.
    Raises:
        LayoutError: the rendering with the new messages does not extend the one without them.
    """
    closer = _turn_closer(tokenizer, history, model_text, tools, variables)
    if stop_text is not None:
        closer = closer[len(stop_text) :] if closer.startswith(stop_text) else ""
    without = render(tokenizer, [*history, assistant], tools, False, variables)
    with_new = render(tokenizer, [*history, assistant, *new_messages], tools, True, variables)
    if with_new.startswith(without):
        return closer + with_new[len(without) :]
    after = _after_decorated_turn(tokenizer, history, (without, with_new), new_messages, tools, variables)
    if after is None:
        at = next((i for i, (a, b) in enumerate(zip(without, with_new)) if a != b), len(with_new))
        raise LayoutError(
            "the chat template renders the conversation differently once the environment's messages "
            f"are added (from char {at}: {without[at : at + 40]!r} became {with_new[at : at + 40]!r}); "
            "the episode's tokens cannot extend what the model saw"
        )
    return closer + after


def _after_decorated_turn(
    tokenizer: Any,
    history: Sequence[Message],
    assistant_renderings: tuple[str, str],
    new_messages: Sequence[Message],
    tools: Any,
    variables: Mapping[str, Any] | None,
) -> str | None:
    """The text after the assistant's turn in the rendering with the new messages, where the template
    decorates the LAST assistant turn only: Qwen3's writes an empty `<think>\n\n</think>\n\n` there
    (the tail of its generation prompt with enable_thinking=False, or after a turn without reasoning)
    and drops it once messages follow. The decoration is what a plain probe turn loses; the model's turn
    must lose exactly as much, right where it differs. None where the renderings differ otherwise (the
    past, or the model's own text such as its reasoning, rewritten)."""
    without, with_new = assistant_renderings
    past = render(tokenizer, history, tools, False, variables)
    probe = [*history, {"role": "assistant", "content": _PROBE_TEXT}]
    try:
        probe_last = render(tokenizer, probe, tools, False, variables)
        probe_followed = render(tokenizer, [*probe, *new_messages], tools, True, variables)
    except ChatTemplateError:
        return None
    renderings = (without, with_new, probe_last, probe_followed)
    if not all(r.startswith(past) for r in renderings):
        return None
    turn, rest, probe_last, probe_followed = (r[len(past) :] for r in renderings)
    width = _dropped_width(probe_last, probe_followed)
    at = _shared_prefix(turn, rest)
    if width is None or at + width >= len(turn) or not rest.startswith(turn[at + width :], at):
        return None
    return rest[len(turn) - width :]


def _shared_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of `a` and `b`."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _dropped_width(last: str, followed: str) -> int | None:
    """The fewest characters to cut out of `last` where it stops matching `followed` so that the rest of
    `last` continues in `followed` (`followed` = `last` less a span, then more text); None if none do."""
    at = _shared_prefix(last, followed)
    return next((w for w in range(1, len(last) - at) if followed.startswith(last[at + w :], at)), None)
