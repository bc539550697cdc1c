"""SFT data: rows -> conversations, and a conversation -> token ids with labels on assistant tokens only.

    examples = load_conversations(cfg)                     # Example(prompt=messages, answer=last reply)
    check_conversations(examples, tokenizer, max_seq_len)  # before any weights load: template, cuts
    ids, labels = example_tokens(example, tokenizer, max_seq_len)   # tokenize_conversation of its messages
    input_ids, attention_mask, labels = collate([(ids, labels), ...], pad_id)   # (B, T) each

A conversation is an `Example` whose prompt is the whole message list (assistant turns included), so
the resumable `PromptLoader` of GRPO serves SFT unchanged; its columns: `where` names its file and
line (or its index) in errors, `loss_from` the first message whose assistant turns carry loss,
`begun_reply` the start of the last reply that its prompt holds (a prompt/response row whose prompt
ends with an assistant message: GRPO continues it, so the reply piece starts after it, _continued_start).

Which tokens carry loss. The chat template is rendered once for the whole conversation, and once per
assistant turn i for two prefixes: messages[:i] with the generation header (where the reply starts)
and messages[:i+1] (where it ends). Both must be prefixes of the whole text, so they cut the text
into pieces: prompt, reply, prompt, reply, ... The one rewrite allowed is that of reasoning models'
templates (Qwen3, DeepSeek-R1, QwQ), which drop the reasoning of a reply that is no longer the last:
such a reply learns what the whole conversation shows of it, its answer and end-of-turn token
(_end_without_dropped_reasoning), and when their generation header opens the reasoning ("<think>\n",
Qwen3's empty think block with enable_thinking=false) that the conversation does not show there, the
reply starts before that opening (_reply_start); any other template that rewrites earlier turns is
refused. Each piece is encoded on its own (the first as GRPO encodes its prompt, `encode_prompts`;
the others as text inside a longer text, _encode_inside) and the ids are concatenated; reply pieces
keep their ids as labels, prompt pieces get IGNORE. A reply piece runs from the end of the generation
header to the start of the next turn, so it holds the end-of-turn token (`<|im_end|>`): the model
learns to stop, on the token boundaries it will see. An assistant turn that opens the conversation
(a greeting) has no prefix to render its generation header from, so the template glue before it
cannot be told apart from it: it stays context. A prompt/response row learns its response only:
assistant turns inside its prompt stay context (`loss_from`). A template that closes every
conversation with EOS (Phi-3) gives that EOS to the last reply only (_reply_end).

Without a chat template (a base model) the turns are joined as GRPO's plain prompts are: non-assistant
contents with blank lines between them (BOS first when the tokenizer adds one), each reply appended
directly after, followed by EOS.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from minigrpo.chat_template import ChatTemplateError, check_template_variables
from minigrpo.config import Config
from minigrpo.data import ROLES, Example, Message, render_prompt, synthetic_arithmetic, uses_plain_text
from minigrpo.datafiles import DataError, Row, read_rows, resolve_files, snapshot, split_files
from minigrpo.errors import UserError

IGNORE = -100  # the label of a token that carries no loss (F.cross_entropy's ignore_index)


# ----------------------------------------------------------------------------------------------
# Conversations from rows
# ----------------------------------------------------------------------------------------------


# what a message may hold beside role and content, passed on to the chat template (an assistant's tool
# calls and reasoning, a tool result's name and call id): dropped, the model would learn other replies
MESSAGE_EXTRAS = ("tool_calls", "reasoning_content", "name", "tool_call_id")


def _check_messages(where: str, value: Any, field: str) -> list[Message]:
    """A row's conversation as messages (role, content and the MESSAGE_EXTRAS it has); DataError
    naming the row when it is not one. An assistant turn with tool calls may have no content."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} is {'an empty' if value == [] else 'not a'} list of chat messages")
    out = []
    for i, m in enumerate(value):
        if isinstance(m, dict) and m.get("content") is None and m.get("tool_calls"):
            m = {**m, "content": ""}  # a turn that only calls tools
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            m = {**m, "content": _text_of_parts(where, i, m["content"])}
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} of {field!r} needs a text 'role' and 'content', got {m!r}"[:300])
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; known roles: {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"], **{k: m[k] for k in MESSAGE_EXTRAS if m.get(k)}})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn")
    return out


def _text_of_parts(where: str, index: int, parts: list[Any]) -> str:
    """A content given as parts ([{"type": "text", "text": "..."}], the multimodal layout) as one text:
    the texts joined as the templates that read parts join them (nothing between them). A part that is
    not text (an image) is a DataError: the models trained here read text only."""
    texts = []
    for part in parts:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise DataError(f"{where}: message {index} has a content part that is not text: {part!r}"[:300])
        texts.append(part["text"])
    return "".join(texts)


def _field(where: str, row: dict[str, Any], sft: Any, key: str) -> Any:
    """The value of the row field that sft.<key> names; DataError naming the row when it is absent or null."""
    name = getattr(sft, key)
    if name not in row:
        raise DataError(f"{where}: no field {name!r} (the row has: {', '.join(map(str, row))}; see sft.{key})")
    if row[name] is None:
        raise DataError(f"{where}: field {name!r} is null")
    return row[name]


def row_to_conversation(where: str, row: dict[str, Any], cfg: Config) -> list[Message]:
    """One data row -> its messages, per sft.format; the system prompt applied."""
    return _row_messages(where, row, cfg)[0]


def _row_messages(where: str, row: dict[str, Any], cfg: Config) -> tuple[list[Message], str | None]:
    """One data row -> (its messages, the begun reply or None): a prompt that ends with an assistant message
    holds a reply begun for the model ("<think>\n"), which GRPO continues and the response completes."""
    sft = cfg.sft
    if sft.format == "messages":
        messages = _check_messages(where, _field(where, row, sft, "messages_field"), sft.messages_field)
        return with_system_prompt(messages, sft.system_prompt), None
    prompt = _field(where, row, sft, "prompt_field")
    response = _field(where, row, sft, "response_field")
    if not isinstance(response, str):
        raise DataError(f"{where}: field {sft.response_field!r} is not text")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif not isinstance(prompt, list):
        raise DataError(f"{where}: field {sft.prompt_field!r} is neither text nor a list of messages")
    messages = _check_messages(where, [*prompt, {"role": "assistant", "content": response}], sft.prompt_field)
    if len(messages) < 2 or messages[-2]["role"] != "assistant":  # no begun reply
        return with_system_prompt(messages, sft.system_prompt), None
    begun = messages[-2]
    if begun.get("tool_calls"):
        raise DataError(f"{where}: the prompt's final assistant message (a reply begun for the model) calls tools")
    merged = [*messages[:-2], {**begun, "content": begun["content"] + response}]
    return with_system_prompt(merged, sft.system_prompt), begun["content"]


def row_tools(where: str, row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A row's `tools` column: the function definitions (JSON-schema dicts) the chat template shows the
    model, as a list or a JSON text of one (hub datasets often store it so); None when the row has none."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: field 'tools' is text but not JSON ({e})") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: field 'tools' must be a list of function definitions (dicts), got {tools!r}"[:300])
    return tools


def with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """`system_prompt` first, replacing the conversation's own system message (None: unchanged)."""
    if system_prompt is None:
        return messages
    return [{"role": "system", "content": system_prompt}] + [m for m in messages if m["role"] != "system"]


def _rows(cfg: Config) -> list[Row]:
    sft = cfg.sft
    if sft.path is None:
        raise DataError(f"sft.source={sft.source!r} needs sft.path (a file, folder or hub dataset repo id)")
    if sft.source == "hub":
        files = split_files(snapshot(sft.path, sft.revision), sft.split, sft.subset)  # a local snapshot as is
    else:
        suffixes = (".parquet",) if sft.source == "parquet" else (".jsonl", ".json")
        files = resolve_files(sft.path, sft.split, sft.subset, suffixes, "sft.path")
    rows = [row for f in files for row in read_rows(Path(f))]
    if not rows:  # name the files: an empty one is the usual cause
        verb = "hold" if len(files) > 1 else "holds"
        raise DataError(f"sft: the {sft.split!r} split: {', '.join(map(str, files))} {verb} no conversation")
    return rows


def load_conversations(cfg: Config) -> list[Example]:
    """The SFT conversations of `cfg.sft` as Examples (prompt = the messages, answer = the last reply)."""
    sft = cfg.sft
    variables = check_template_variables(cfg.data.chat_template_kwargs, "data.chat_template_kwargs")
    if sft.source == "synthetic":  # (where, messages, begun reply, template variables) each
        found = [(w, m, None, variables) for w, m in _synthetic_conversations(cfg)]
    else:
        found = [(w, *_row_messages(w, row, cfg), _with_tools(variables, row_tools(w, row))) for w, row in _rows(cfg)]
    if not found:
        raise DataError(f"sft: the {sft.split!r} split of sft.source={sft.source!r} holds no conversation")
    return [
        Example(
            prompt=m,
            answer=next(x for x in reversed(m) if x["role"] == "assistant")["content"],
            columns={"where": w, "loss_from": loss_from(m, sft.format), "template_kwargs": v, "begun_reply": b},
        )
        for w, m, b, v in found
    ]


def _synthetic_conversations(cfg: Config) -> list[tuple[str, list[Message]]]:
    """data.synthetic's arithmetic as (where, messages): its prompts answered with sft.response_template."""
    sft, syn = cfg.sft, cfg.data.synthetic
    part = "all" if cfg.data.eval_split is None else "train"  # never the expressions GRPO's eval holds out
    found = []
    for i, ex in enumerate(synthetic_arithmetic(syn.seed, syn.num_train, syn, split=sft.split, part=part)):
        try:
            reply = sft.response_template.format(answer=ex.answer, **ex.columns)
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(
                f"sft.response_template={sft.response_template!r}: {e!r}; it may use {{answer}} and "
                "{expression} (write other braces as {{ and }})"
            ) from None
        messages = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": reply}]
        found.append((f"synthetic conversation {i}", with_system_prompt(messages, sft.system_prompt)))
    return found


def _with_tools(variables: dict[str, Any], tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The chat template variables of one conversation: data.chat_template_kwargs and the row's tools."""
    return variables if tools is None else {**variables, "tools": tools}


def loss_from(messages: Sequence[Message], fmt: str) -> int:
    """Index of the first message whose assistant turns carry loss: prompt/response rows learn the
    response only (assistant turns inside the prompt, e.g. few-shot answers, are context, as in the
    prompt GRPO samples from); a `messages` conversation learns every assistant turn."""
    return len(messages) - 1 if fmt == "prompt_response" else 0


def example_tokens(example: Example, tokenizer: Any, max_seq_len: int | None = None) -> tuple[list[int], list[int]]:
    """(ids, labels) of one loaded conversation (tokenize_conversation with its `loss_from`, its
    template variables: data.chat_template_kwargs and the row's tools, and its begun reply)."""
    first, variables, begun = (example.columns.get(k) for k in ("loss_from", "template_kwargs", "begun_reply"))
    return tokenize_conversation(
        example.prompt, tokenizer, max_seq_len, loss_from=first or 0, chat_template_kwargs=variables, begun_reply=begun
    )


def check_conversations(
    examples: Sequence[Example], tokenizer: Any, max_seq_len: int, max_positions: int | None = None
) -> int:
    """The conversations against the model's tokenizer, before any weights load (and before training
    when the tokenizer comes with the weights). Each must render with the chat template and cut into
    prompt and reply pieces (an error names its file and line); sft.max_seq_len must keep at least
    one assistant token of some conversation (else a UserError naming the key and the length needed),
    and a warning counts the conversations it leaves without one, another those with none at any length
    (their only reply opens them). No conversation, cut to sft.max_seq_len, may be longer than the
    model's `max_positions` (max_position_embeddings). Returns the longest row in tokens, once cut."""
    kept, cut, silent, earliest, longest = 0, [], [], None, (0, "")
    for i, ex in enumerate(examples):
        where = ex.columns.get("where", f"conversation {i}")
        try:
            _, labels = example_tokens(ex, tokenizer)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{where}: the model's chat template fails on this conversation: {e}") from e
        except DataError as e:
            raise DataError(f"{where}: {e}") from e
        longest = max(longest, (min(len(labels), max_seq_len), where), key=lambda x: x[0])
        start = next((t for t in range(1, len(labels)) if labels[t] != IGNORE), None)  # first loss position
        if start is None:  # a reply that opens its conversation (context), or an empty one with no end-of-turn
            silent.append(where)
            continue
        earliest = start if earliest is None else min(earliest, start)
        if start < max_seq_len:
            kept += 1
        else:
            cut.append(where)
    if earliest is None:
        raise UserError(
            "sft: no conversation has an assistant token to learn from (every reply is empty or opens its conversation)"
        )
    if not kept:
        raise UserError(
            f"sft.max_seq_len={max_seq_len} cuts every conversation before its first assistant token, so nothing "
            f"would be learned: the earliest reply starts at token {earliest} (set sft.max_seq_len >= {earliest + 1})"
        )
    if max_positions is not None and longest[0] > max_positions:
        raise UserError(
            f"{longest[1]} takes {longest[0]} positions with sft.max_seq_len={max_seq_len}, more than the model's "
            f"max_position_embeddings={max_positions}; set sft.max_seq_len={max_positions} (longer conversations "
            "are cut there)"
        )
    if silent:
        warnings.warn(  # a UserWarning, shown at the caller
            f"{len(silent)} of {len(examples)} conversations have no assistant token to learn from (e.g. "
            f"{silent[0]}): a reply that opens its conversation is context and an empty one may hold none, so they "
            "carry no loss",
            stacklevel=2,
        )
    if cut:
        warnings.warn(  # a UserWarning, shown at the caller
            f"sft.max_seq_len={max_seq_len} cuts every assistant token of {len(cut)} of {len(examples)} "
            f"conversations (e.g. {cut[0]}): they carry no loss",
            stacklevel=2,
        )
    return longest[0]


# ----------------------------------------------------------------------------------------------
# Tokens and labels
# ----------------------------------------------------------------------------------------------


def conversation_pieces(
    messages: Sequence[Message],
    tokenizer: Any,
    loss_from: int = 0,
    chat_template_kwargs: dict[str, Any] | None = None,
    begun_reply: str | None = None,
) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_reply) pieces, in order; their concatenation is
    the whole rendered conversation (see the module docstring). Assistant turns before message
    `loss_from` stay inside the prompt pieces (context, no loss). `chat_template_kwargs` (the row's
    tools, `enable_thinking`, ...) reach every rendering. `begun_reply`: the last message's content
    starts with this reply begun in the prompt, which GRPO continues (render_prompt's prefill): the
    reply piece starts where that prompt ends."""
    assert begun_reply is None or messages[-1]["content"].startswith(begun_reply), "the begun reply starts the last"
    if uses_plain_text(tokenizer):
        return _plain_pieces(messages, loss_from, begun_reply)
    variables = chat_template_kwargs or {}
    full = tokenizer.apply_chat_template(list(messages), add_generation_prompt=False, tokenize=False, **variables)
    pieces, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0 or i < loss_from:  # an opening reply: nothing tells it from the
            continue  # glue before it
        if begun_reply is not None and i == len(messages) - 1:
            start = _continued_start(full, messages, tokenizer, begun_reply, variables)
        else:
            start = _reply_start(full, render_prompt(list(messages[:i]), tokenizer, chat_template_kwargs=variables))
        end = None if start is None else _reply_end(full, messages[: i + 1], tokenizer, start, variables)
        if not (start is not None and end is not None and done <= len(start) <= end):
            raise DataError(
                f"the chat template renders assistant turn {i} differently inside the whole conversation than "
                "after its prefix (it rewrites earlier turns), so its tokens cannot be told apart; use "
                "one assistant turn per example"
            )
        pieces += [(full[done : len(start)], False), (full[len(start) : end], True)]
        done = end
    pieces.append((full[done:], False))
    return [(text, reply) for text, reply in pieces if text]


def _continued_start(
    full: str, messages: Sequence[Message], tokenizer: Any, begun_reply: str, variables: dict[str, Any]
) -> str:
    """The text before the continuation of a begun reply: GRPO's prompt (render_prompt's prefill of the
    conversation whose last message is only the begun reply). DataError when `full` does not go on from
    it: the template renders the begun reply otherwise once the response follows (Qwen3 moves "<think>")."""
    begun = [*messages[:-1], {**messages[-1], "content": begun_reply}]
    prompt = render_prompt(begun, tokenizer, prefill=True, chat_template_kwargs=variables)
    if not full.startswith(prompt):
        raise DataError(
            "the chat template renders the prompt's begun reply differently once the response follows it, so "
            "the response cannot be trained as GRPO continues that reply; end the prompt with a user message"
        )
    return prompt


# the end of a generation header that opens the reasoning ("<think>\n", or an empty "<think>\n\n</think>\n\n")
_OPENED_REASONING = re.compile(r"<think>\s*(?:</think>\s*)?$")


def _reply_start(full: str, header: str) -> str | None:
    """The text before a reply inside `full`: `header` (its prefix rendered with the generation prompt)
    when `full` goes on from it. Reasoning templates end their generation prompt by opening the
    reasoning (QwQ, DeepSeek-R1: "<think>\n"; Qwen3 with enable_thinking=false: an empty think
    block), which the whole conversation does not show for a reply whose reasoning it drops: the reply
    then starts before that opening. None when `full` does not hold the header at all."""
    if full.startswith(header):
        return header
    opened = _OPENED_REASONING.search(header)
    if opened is not None and full.startswith(header[: opened.start()]):
        return header[: opened.start()]
    return None


def _reply_end(
    full: str, prefix: Sequence[Message], tokenizer: Any, start: str = "", variables: dict[str, Any] | None = None
) -> int | None:
    """Where the last message of `prefix` ends inside `full` (the whole conversation rendered): the
    length of `prefix` rendered, when `full` goes on from it. Some templates close every conversation
    with an EOS that no turn inside it has (Phi-3: `{% else %}{{ eos_token }}` when no generation
    prompt follows): then the end is that text without its closing EOS, and only the last reply
    (the end of `full` too) learns it. A reply whose reasoning `full` drops ends where its answer does
    (_end_without_dropped_reasoning; `start` is the text before the reply). None when `full` does not
    hold the prefix at all."""
    text = tokenizer.apply_chat_template(list(prefix), add_generation_prompt=False, tokenize=False, **(variables or {}))
    if full.startswith(text):
        return len(text)
    eos = getattr(tokenizer, "eos_token", None)
    body = text.rstrip()
    if eos and body.endswith(eos) and full.startswith(body[: -len(eos)]):
        return len(body) - len(eos)
    return _end_without_dropped_reasoning(full, text, start, prefix[-1])


def _end_without_dropped_reasoning(full: str, text: str, start: str, reply: Message) -> int | None:
    """Where `reply` ends inside `full` when the template dropped the beginning of its turn there.

    Reasoning models' templates (Qwen3, DeepSeek-R1, QwQ) render the reasoning ("<think>...</think>",
    or an empty think block) of the last reply only: `text` (the conversation up to `reply`, which is
    last there) holds it, `full` does not. The turn inside `full` is then the longest tail of the turn
    in `text` that `full` goes on with after `start`; it must still hold the reply's answer (its content
    after any "</think>"), so a template that rewrites the answer itself stays refused (None)."""
    if not (start and text.startswith(start) and full.startswith(start)):
        return None
    turn = text[len(start) :]  # the turn as rendered last: reasoning, answer, end-of-turn
    answer = reply["content"].rsplit("</think>", 1)[-1].strip()
    for k in range(len(turn) - 1, 0, -1):  # the longest tail first; len(turn) itself did not match
        if full.startswith(turn[-k:], len(start)):
            return len(start) + k if answer in turn[-k:] else None
    return None


def _plain_pieces(
    messages: Sequence[Message], loss_from: int = 0, begun_reply: str | None = None
) -> list[tuple[str, bool]]:
    """Without a chat template: each run of prompt messages is one piece, their contents joined by
    blank lines as GRPO's plain prompts are (assistant turns before `loss_from` among them); each
    reply follows directly (tokenize_conversation adds its EOS), and so does the next message. A
    begun reply ends the prompt (as GRPO's plain prompt holds it), its continuation is the reply."""
    if begun_reply is not None:  # the prompt ends with the begun reply, as a message of its own
        last = messages[-1]
        pieces = _plain_pieces([*messages[:-1], {**last, "content": begun_reply}], len(messages))
        return [*pieces, (last["content"][len(begun_reply) :], True)]
    pieces: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i >= loss_from:
            pieces.append((m["content"], True))
        elif pieces and not pieces[-1][1]:  # the prompt goes on: one text, as GRPO encodes it
            pieces[-1] = (pieces[-1][0] + "\n\n" + m["content"], False)
        else:
            pieces.append((m["content"], False))
    return pieces


def tokenize_conversation(
    messages: Sequence[Message],
    tokenizer: Any,
    max_seq_len: int | None = None,
    *,
    loss_from: int = 0,
    chat_template_kwargs: dict[str, Any] | None = None,
    begun_reply: str | None = None,
) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation: labels equal ids on the tokens of the assistant turns from
    message `loss_from` on and IGNORE elsewhere; both cut to max_seq_len. `chat_template_kwargs`: more
    template variables (a row's `tools`, data.chat_template_kwargs). `begun_reply`: the text the last
    message starts with that the prompt already holds (a reply begun for the model): context, no loss."""
    plain = uses_plain_text(tokenizer)
    ids: list[int] = []
    labels: list[int] = []
    pieces = conversation_pieces(messages, tokenizer, loss_from, chat_template_kwargs, begun_reply)
    for k, (text, reply) in enumerate(pieces):
        if k:
            piece = _encode_inside(text, tokenizer)  # as inside the whole conversation
        else:
            piece = tokenizer.encode(text, add_special_tokens=plain and k == 0)  # plain text: BOS (if any) first
        if plain and reply and tokenizer.eos_token_id is not None:
            piece = [*piece, tokenizer.eos_token_id]  # a base model learns to stop after its reply
        ids += piece
        labels += piece if reply else [IGNORE] * len(piece)
    if max_seq_len is not None:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return ids, labels


def _encode_inside(text: str, tokenizer: Any) -> list[int]:
    """`text` encoded as it is when it follows a special token inside a longer text: behind the EOS
    token, whose ids are then dropped. Encoded on its own, a piece would be the start of a text, which
    a SentencePiece-style tokenizer (Metaspace, prepend_scheme="first": Llama-2 / Mistral) marks with a
    "▁" that the rendered conversation does not have. Byte-level BPE gives the same ids either way."""
    lead = getattr(tokenizer, "eos_token", None)
    if lead is None:
        return tokenizer.encode(text, add_special_tokens=False)
    head = tokenizer.encode(lead, add_special_tokens=False)
    ids = tokenizer.encode(lead + text, add_special_tokens=False)
    if ids[: len(head)] != head:  # EOS is not matched whole (not a special token): no clean cut
        return tokenizer.encode(text, add_special_tokens=False)
    return ids[len(head) :]


def collate(
    rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) input_ids, attention_mask (1 on real tokens) and labels (IGNORE on padding)."""
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return input_ids.to(device), mask.to(device), labels.to(device)


def loss_tokens(labels: Sequence[int]) -> int:
    """Tokens of one sequence that carry loss: reply tokens after the first position (the first
    token of a sequence has nothing before it to predict it from)."""
    return sum(1 for x in labels[1:] if x != IGNORE)
