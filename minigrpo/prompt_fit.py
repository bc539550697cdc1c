"""The prompts against the model that reads them: every prompt renders with the model's chat template
and encodes to at least one token, `data.max_prompt_tokens` keeps at least one, and the longest
prompt plus the completion budget fits the model's positions (max_position_embeddings, or for
longrope scaling the length where it switches factors: `position_limit`).

With a tool environment (env.kind tools or gsm8k_tools) the prompts measured are the episodes' opening
prompts, as run_episodes renders them: the environment's system prompt and the tools' definitions (a
Qwen2.5-style template writes them into the system turn: hundreds of tokens) included. A user
environment class (env.kind 'package.module:Class') writes its own opening messages, known only once it
plays: its prompts are measured as the data renders them.

`prompts_that_fit` runs before any weights load when the model folder is local (its tokenizer and
config.json are read by then: build.check_before_loading, eval), and again once the model is built
(a hub id or a GGUF file has no tokenizer before that).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any

from minigrpo.chat_template import ChatTemplateError
from minigrpo.data import Example, encode_prompts
from minigrpo.env_config import ENV_KINDS, completion_budget, episode_system_prompt, resolve_tools
from minigrpo.errors import UserError


@dataclass(frozen=True)
class PositionLimit:
    """How many positions a prompt and its completion may take together, and what sets the limit."""

    positions: int
    setting: str  # names the limit in an error, e.g. "the model's max_position_embeddings=4096"


def position_limit(args: Any) -> PositionLimit:
    """The positions a rollout may use on a model (its ModelArgs).

    Longrope scaling (Phi-3.5, Phi-4-mini) rotates with its short factors up to
    original_max_position_embeddings and with its long ones for a sequence that goes past it, all of
    its positions then. A sampler's cache holds the prompt rotated by the short factors before the
    row crosses that length, while the trainer's forward of the finished row rotates everything by
    the long ones: the two log-probs would part (by 0.6 nats in a tiny test), and the
    importance ratios with them. So a rollout stays below the switch."""
    positions = args.max_position_embeddings
    limit = PositionLimit(positions, f"the model's max_position_embeddings={positions}")
    if args.rope_type != "longrope":
        return limit
    switch = int(args.rope_params["original_max_position_embeddings"])
    if switch >= limit.positions:
        return limit
    return PositionLimit(
        switch,
        f"the model's original_max_position_embeddings={switch} (its longrope scaling switches to the long "
        "factors past it, which the sampler's cache cannot follow)",
    )


def local_position_limit(name_or_path: str | None) -> PositionLimit | None:
    """position_limit of a local model folder's config.json (already checked by check_model_source);
    None for anything else (a hub id, a GGUF file: known once loaded)."""
    from minigrpo.models.loading import local_model_args

    args = local_model_args(name_or_path)
    return None if args is None else position_limit(args)


def prompts_that_fit(
    cfg: Any,
    examples: list[Example],
    tokenizer: Any,
    max_positions: PositionLimit | int | None = None,
    *,
    evaluating: bool = False,
) -> tuple[list[Example], int]:
    """The examples whose prompt has at most data.max_prompt_tokens tokens (`evaluating`: all of them),
    and the longest of their prompts in tokens, as the rollout encodes them (a tool episode's opening
    included): what a step's KV cache and memory pre-flight must hold, not the cap, which may be far
    above every prompt (2048 against 300-token prompts would overstate the cache 4 times). Prompts the
    limit drops are counted in a warning. A UserError names a blank prompt, a prompt the chat template
    cannot render or that encodes to no token, a limit no prompt meets, and a longest prompt that
    leaves too few of the model's positions (`max_positions`: position_limit, or a bare
    max_position_embeddings) for the completion budget."""
    if isinstance(max_positions, int):
        max_positions = PositionLimit(max_positions, f"the model's max_position_embeddings={max_positions}")
    blank = next((ex for ex in examples if is_blank(ex.prompt)), None)
    if blank is not None:  # a chat template would render it as a turn with no question, trained on as any other
        where = f"data.path={cfg.data.path!r}"
        raise UserError(f"the prompt {_describe(blank)} is empty ({where}): every row needs a prompt")
    try:
        ids, texts = rollout_prompts(cfg, examples, tokenizer)
    except ChatTemplateError as e:
        bad = _first_failing(cfg, examples, tokenizer)
        raise ChatTemplateError(f"the model's chat template fails on the prompt {bad}: {e}") from e
    empty = next((i for i, row in enumerate(ids) if not row), None)
    if empty is not None and texts[empty]:
        raise UserError(f"the prompt {_describe(examples[empty])} encodes to no token: {texts[empty]!r} has none")
    if empty is not None and getattr(tokenizer, "chat_template", None) is not None and examples[empty].prompt:
        raise ChatTemplateError(f"the model's chat template renders the prompt {_describe(examples[empty])} as no text")
    if empty is not None:
        raise UserError(
            f"the prompt {_describe(examples[empty])} is empty (data.path={cfg.data.path!r}): every row needs a prompt"
        )
    lengths = [len(row) for row in ids]
    limit = None if evaluating else cfg.data.max_prompt_tokens  # evaluation scores every example it is given
    if limit is not None:
        examples, lengths = _drop_long_prompts(examples, lengths, limit)
    longest = max(lengths)
    budget, key = completion_budget(cfg, evaluating=evaluating)
    if max_positions is not None and longest + budget > max_positions.positions:
        raise UserError(_no_room_error(cfg, max_positions, (budget, key), longest, min(lengths), evaluating))
    return examples, longest


def is_blank(prompt: str | list[dict[str, str]]) -> bool:
    """Whether a prompt holds no text: an empty or all-whitespace string, or messages whose turns past
    the system message all are (a system message alone counts as the prompt)."""
    if isinstance(prompt, str):
        return not prompt.strip()
    turns = [m.get("content") for m in prompt if m.get("role") != "system"] or [m.get("content") for m in prompt]
    return not any(text.strip() if isinstance(text, str) else text for text in turns)  # content parts: not blank


def _drop_long_prompts(examples: list[Example], lengths: list[int], limit: int) -> tuple[list[Example], list[int]]:
    """The examples whose prompt has at most `limit` (data.max_prompt_tokens) tokens, and their lengths. The
    dropped ones are counted in a warning (a cap that silently dropped most of a dataset would go
    unnoticed); a cap that drops every prompt is a UserError."""
    kept = [i for i, n in enumerate(lengths) if n <= limit]
    if not kept:
        raise UserError(f"every prompt is longer than data.max_prompt_tokens={limit} (the shortest has {min(lengths)})")
    if len(kept) < len(examples):
        warnings.warn(
            f"data.max_prompt_tokens={limit} drops {len(examples) - len(kept)} of {len(examples)} prompts "
            f"(the longest has {max(lengths)} tokens), keeping {len(kept)}",
            UserWarning,
            stacklevel=3,
        )
    return [examples[i] for i in kept], [lengths[i] for i in kept]


def _no_room_error(
    cfg: Any, limit: PositionLimit, budget: tuple[int, str], longest: int, shortest: int, evaluating: bool
) -> str:
    """The error of a longest prompt that leaves too few positions for the completion budget (`budget`:
    its tokens and key), with the settings that would fit: a smaller budget, a prompt cap that keeps at
    least the shortest prompt, or both; a prompt that takes every position by itself is said to be
    too long alone (no budget can help), and no advice is ever a setting below 1."""
    (tokens, key), positions = budget, limit.positions
    room = positions - tokens  # the longest prompt the budget leaves room for
    if longest < positions:
        fixes = [_budget_fix(cfg, key, positions - longest)]
        fixes += [_prompt_cap(room, evaluating)] if room >= shortest else []
        return (
            f"the longest prompt has {longest} tokens and {key}={tokens}: {longest + tokens} positions, more than "
            f"{limit.setting}; {' or '.join(fixes)}"
        )
    problem = (
        f"the longest prompt alone has {longest} tokens, {'more than' if longest > positions else 'all of'} "
        f"{limit.setting}, leaving no room for its completion ({key}={tokens})"
    )
    if room >= shortest:
        return f"{problem}; {_prompt_cap(room, evaluating)} or shorten the prompts"
    if shortest < positions:  # the shortest prompts fit beside a smaller budget
        both = f"{_prompt_cap(shortest, evaluating)} and {_budget_fix(cfg, key, positions - shortest)}"
        return f"{problem}; {both}, or shorten the prompts"
    return f"{problem}; every prompt has at least {shortest} tokens: shorten them (or use a model with more positions)"


def _budget_fix(cfg: Any, key: str, tokens: int) -> str:
    """The advice of a completion budget of at most `tokens`; an episode's budget must hold one turn
    (env.max_episode_tokens >= sampler.max_new_tokens), so a turn longer than it is lowered with it."""
    if key == "env.max_episode_tokens" and cfg.sampler.max_new_tokens > tokens:
        return f"set {key} and sampler.max_new_tokens={tokens} or less"
    return f"set {key}={tokens} or less"


def _prompt_cap(tokens: int, evaluating: bool) -> str:
    """The advice that keeps the prompts of at most `tokens` tokens (evaluation scores every prompt it is
    given: there the longer ones must be dropped from its data)."""
    return f"drop the prompts longer than {tokens} tokens" if evaluating else f"set data.max_prompt_tokens={tokens}"


def _describe(example: Example) -> str:
    text = example.prompt if isinstance(example.prompt, str) else json.dumps(example.prompt)
    return repr(text if len(text) <= 80 else text[:77] + "...")


def rollout_prompts(cfg: Any, examples: list[Example], tokenizer: Any) -> tuple[list[list[int]], list[str]]:
    """(token ids, texts) of the prompts the rollout samples from: the data's chat prompts, or a tool
    environment's opening prompts (see the module docstring)."""
    if cfg.env.kind not in ENV_KINDS:
        return encode_prompts(examples, tokenizer, cfg.data.system_prompt, cfg.data.chat_template_kwargs)
    from minigrpo.episode_text import render
    from minigrpo.episodes import opening_messages

    specs = [t.spec() for t in resolve_tools(cfg.env).values()]
    system = episode_system_prompt(cfg)
    variables = cfg.env.chat_template_kwargs  # e.g. {"enable_thinking": False}: the episodes render with them
    texts = [render(tokenizer, opening_messages(ex, system), specs, True, variables) for ex in examples]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts], texts


def _first_failing(cfg: Any, examples: list[Example], tokenizer: Any) -> str:
    for ex in examples:
        try:
            rollout_prompts(cfg, [ex], tokenizer)
        except ChatTemplateError:
            return _describe(ex)
    return "(not found again)"
