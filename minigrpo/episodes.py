"""Multi-turn episodes: an environment answers each model turn; one training row per episode.

    env = ToolEnvironment(builtin_tools(), chat_template=tokenizer.chat_template)
    episodes = run_episodes(sampler, tokenizer, env, rows, params, max_turns=4, max_episode_tokens=1024,
                            key=(seed, step, round))
    rollout = episodes_to_rollout(episodes, tokenizer, pad_id=sampler.pad_id, group_size=params.n)

The environment (`Environment`): `reset(row)` gives an episode's opening messages; `step(episode,
text)` reads the model's latest turn and returns the next messages (tool results, a user reply, an
observation) and whether the episode is over. `episode.messages` is the conversation before that
turn and `episode.turns[-1]` the turn itself, where an environment may record what it did (the
tool calls and results: `ToolEnvironment` does; the assistant message then carries the calls as
`tool_calls`). An environment may define `tool_specs` (JSON-schema dicts) for the chat template and
`chat_template_kwargs` (more template variables, e.g. {"enable_thinking": False} for Qwen3: every
rendering of the episode gets them).
Anything else than a list of message dicts from `reset` or a tuple (messages, bool) from `step` is an
EnvironmentContractError naming the method (one line); what the environment raises keeps its traceback.
A template without tool support (minigrpo.tools.renders_tool_calls is False, e.g. SmolLM2's) keeps
the calls in the assistant's content instead, and ToolEnvironment answers in a user message
(minigrpo/tools/render.py says why); the tools must then be described in the system prompt. A turn
whose calls the template refuses (Llama-3.1's raises on two calls in one turn) keeps them in the
content likewise, rather than ending the run.
Reward functions see the whole episode through `episode_columns` (messages, tool calls, results).

Turn-taking: all live episodes take their next turn together, in one `generate` call per turn (more
only where a row would decode past the model's positions: episode_calls.py), so any Sampler works (the
own KV-cache sampler, vLLM). Each prompt is the episode so far as token ids: the opening messages
rendered with the chat template and the generation prompt, then every segment since. The calls go
to a session of the sampler where it offers one (sampling/base.py: the own sampler keeps each
episode's KV cache between turns, across a turn's calls too, and prefills only the new tokens; an
episode that ends leaves it),
else to the sampler (vLLM's prefix cache reuses the history itself). Turn k of the episode with
global row id i draws with the noise stream `(*key, k)` and row id i, so a row draws what it draws
whichever rows share its batch (split invariance: ranks, waves, a row alone) and whether its history
was prefilled again or found in a session. The sampler's stop ids and strings end a turn.

The layout (`episodes_to_rollout`): the Rollout's prompt is the opening prompt; its completion is
the episode's segments concatenated, right padded: model tokens, environment tokens, model tokens,
... `completion_mask` is 1 on all of them (the trainer attends to them all), `loss_mask` on the
model's tokens only (the environment's are context), and `sampler_logp` holds the sampler's
log-probs at the model's tokens, 0 elsewhere. The row IS the concatenation of the token segments
the model saw (the sampler's own output tokens for model turns), never a re-tokenized text, which
could merge tokens across a turn boundary and make the trainer score tokens nobody sampled.

An environment segment is the text the chat template adds for the environment's messages, tokenized
on its own (`environment_text`, minigrpo/episode_text.py, which says how and when a template cannot
do it: `LayoutError`).

Ending: an episode ends `done` (the environment said so), at `max_turns` (the environment still
had something to say), at the token budget `max_episode_tokens` (model and environment tokens of
the completion: each turn may sample at most the remaining budget, and an environment segment that
leaves no room for one more model token ends the episode), or `turn_length` (a turn hit
params.max_new_tokens without a stop). Every end but `done` counts as truncated. Environment
messages after the last model turn are kept in `messages` (rewards read them) but not tokenized:
nothing after the last model token is trained.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from minigrpo.chat_template import ChatTemplateError
from minigrpo.episode_calls import call_groups, call_position_limit, hold_rows, row_turn
from minigrpo.episode_text import (
    EnvironmentContractError,
    LayoutError,
    checked_messages,
    checked_step,
    environment_text,
    episode_template,
    opening_messages,
    render,
)
from minigrpo.sampling.base import Sampler, session_of
from minigrpo.sampling.params import SamplingParams
from minigrpo.sampling.rollout import Rollout, left_pad
from minigrpo.tools import (
    Tool,
    ToolCall,
    ToolCallError,
    ToolResult,
    ToolStats,
    as_tools,
    assistant_message,
    detect_format,
    parse_tool_calls,
    renders_tool_calls,
    run_tool_calls,
    tool_messages,
)
from minigrpo.tools.calls import valid_text

__all__ = [
    "ENV",
    "MODEL",
    "Environment",
    "EnvironmentContractError",
    "Episode",
    "LayoutError",
    "Segment",
    "ToolEnvironment",
    "Turn",
    "environment_text",
    "episode_columns",
    "episodes_to_rollout",
    "run_episodes",
]

Message = dict[str, Any]
MODEL, ENV = "model", "env"  # who wrote a segment


@dataclass
class Segment:
    """Consecutive tokens of one author: the model (trained on) or the environment (context)."""

    owner: str  # MODEL or ENV
    token_ids: list[int]
    logprobs: list[float] | None = None  # MODEL: the sampler's log-prob of each token


@dataclass
class Turn:
    """One model turn and the environment's answer to it."""

    text: str  # the model's text (special tokens kept, the final stop token cut)
    stopped: bool  # ended by a stop token or string (else cut by max_new_tokens or the budget)
    env_messages: list[Message] = field(default_factory=list)
    tool_calls: list[ToolCall | ToolCallError] = field(default_factory=list)
    tool_results: list[ToolResult] = field(default_factory=list)


@dataclass
class Episode:
    """One conversation between the model and an environment, and its token segments."""

    row: Any  # the dataset row it started from
    row_id: int  # global row id: names the noise of its turns
    prompt_ids: list[int]  # the opening messages rendered with the generation prompt
    messages: list[Message]  # opening messages, then assistant turns and environment messages
    segments: list[Segment] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    end: str | None = None  # None while live, else "done" | "max_turns" | "budget" | "turn_length"

    @property
    def done(self) -> bool:
        return self.end == "done"

    @property
    def truncated(self) -> bool:
        """Ended without the environment saying done (turns or tokens ran out)."""
        return self.end is not None and self.end != "done"

    @property
    def completion_ids(self) -> list[int]:
        """Every segment's tokens, in order: the row after the prompt."""
        return [t for s in self.segments for t in s.token_ids]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.segments)

    @property
    def loss_mask(self) -> list[int]:
        """1 on the model's tokens, 0 on the environment's, aligned with completion_ids."""
        return [int(s.owner == MODEL) for s in self.segments for _ in s.token_ids]

    @property
    def tool_calls(self) -> list[ToolCall | ToolCallError]:
        return [c for t in self.turns for c in t.tool_calls]

    @property
    def tool_results(self) -> list[ToolResult]:
        return [r for t in self.turns for r in t.tool_results]

    @property
    def final_text(self) -> str:
        """The model's last turn (where a final answer is)."""
        return self.turns[-1].text if self.turns else ""


@runtime_checkable
class Environment(Protocol):
    """What run_episodes needs of an environment (see the module docstring)."""

    def reset(self, row: Any) -> list[Message]:
        """The opening messages of an episode on this dataset row."""
        ...

    def step(self, episode: Episode, text: str) -> tuple[list[Message], bool]:
        """The messages answering the model's turn `text` (episode.turns[-1]), and whether it is over."""
        ...


class ToolEnvironment:
    """The model calls tools: each turn is parsed for calls (the template's format), the calls run,
    their results come back as tool messages (as one user message of `<tool_response>` blocks when
    `chat_template` has no tool support); a turn with no call ends the episode (its answer).

    Args:
        tools: Tools or plain functions (declared on the fly), or a name -> Tool mapping.
        format: the call format ("hermes", "llama3", "mistral"); None detects it from `chat_template`
            (minigrpo.tools.detect_format), "hermes" if the template shows neither.
        chat_template: the model's template; one without tool support (`plain`: it does not write
            `tool_calls`, as SmolLM2's) gets the results in a user message (minigrpo/tools/render.py).
        system_prompt: replaces the rows' system message.
        timeout_s, max_chars: per call (minigrpo.tools.run_tool_calls).
        chat_template_kwargs: more template variables for every rendering (e.g. {"enable_thinking": False}).
    A malformed call is not an end: its error message is the tool result the model reads next.
    `stats` counts calls and failures over every episode (ToolStats.metrics()).
    """

    def __init__(
        self,
        tools: Sequence[Tool | Callable[..., Any]] | Mapping[str, Tool],
        *,
        format: str | None = None,
        chat_template: str | None = None,
        system_prompt: str | None = None,
        timeout_s: float | None = 10.0,
        max_chars: int = 4000,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.tools = as_tools(tools)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.format = format or detect_format(chat_template) or "hermes"
        self.plain = chat_template is not None and not renders_tool_calls(chat_template)
        self.system_prompt = system_prompt
        self.timeout_s, self.max_chars = timeout_s, max_chars
        self.stats = ToolStats()

    @property
    def tool_specs(self) -> list[dict[str, Any]]:
        return [t.spec() for t in self.tools.values()]

    def reset(self, row: Any) -> list[Message]:
        return opening_messages(row, self.system_prompt)

    def step(self, episode: Episode, text: str) -> tuple[list[Message], bool]:
        calls = parse_tool_calls(text, self.tools, self.format)
        if not calls:
            return [], True
        results = run_tool_calls(calls, self.tools, self.timeout_s, max_chars=self.max_chars)
        self.stats.add(results)
        turn = episode.turns[-1]
        turn.tool_calls, turn.tool_results = calls, results
        return tool_messages(results, plain=self.plain), False


# ----------------------------------------------------------------------------- running episodes


def run_episodes(
    sampler: Sampler,
    tokenizer: Any,
    env: Environment,
    rows: Sequence[Any],
    params: SamplingParams,
    *,
    max_turns: int,
    max_episode_tokens: int,
    key: tuple[int, ...] | None = None,
    row_ids: Sequence[int] | None = None,
    stats: dict[str, float] | None = None,
    reuse_cache: bool = True,
) -> list[Episode]:
    """Run params.n episodes per row, all live episodes turn by turn together -> N = B * n episodes
    (the episodes of row b are b*n .. b*n+n-1).

    Args:
        params: sampling settings of every turn; max_new_tokens bounds one turn, n is the group size.
        max_turns: model turns per episode at most.
        max_episode_tokens: completion tokens (model + environment) per episode at most.
        key: the noise stream; turn k samples with (*key, k). None: the sampler's own stream.
        row_ids: the N global row ids (default 0..N-1), as in Sampler.generate.
        stats: if given, filled with timings and counts (sample_s, env_s, total_s, generate_calls, and
            prefill_tokens / reused_tokens: the tokens fed to the model / found in its cache).
        reuse_cache: sample through a session where the sampler offers one (see the module docstring).
    """
    if max_turns < 1 or max_episode_tokens < 1:
        raise ValueError(f"max_turns and max_episode_tokens must be >= 1, got {max_turns}, {max_episode_tokens}")
    t0 = time.perf_counter()
    G = params.n
    ids = list(range(len(rows) * G)) if row_ids is None else [int(i) for i in row_ids]
    if len(ids) != len(rows) * G:
        raise ValueError(f"row_ids has {len(ids)} ids for {len(rows) * G} episodes ({len(rows)} rows x n={G})")
    tools = getattr(env, "tool_specs", None)
    variables = dict(getattr(env, "chat_template_kwargs", None) or {})
    stop_ids = set(params.stop_ids)
    template = episode_template(tokenizer, tools)  # the one `render` uses
    plain = template is not None and not renders_tool_calls(template)  # calls stay in the assistant's text
    episodes = []
    for b, row in enumerate(rows):
        opening = checked_messages(env.reset(row), f"{type(env).__name__}.reset()")
        prompt = tokenizer.encode(render(tokenizer, opening, tools, True, variables), add_special_tokens=False)
        episodes += [Episode(row, ids[b * G + j], list(prompt), [dict(m) for m in opening]) for j in range(G)]
    sample_s = env_s = prefill = reused = 0.0
    calls = 0
    # what a turn can span: the longest history (< prompt + budget) and any row's turn after it
    reserve = max(len(e.prompt_ids) for e in episodes) + max_episode_tokens + params.max_new_tokens
    limit = call_position_limit(sampler)
    with session_of(sampler, reserve=reserve, reuse=reuse_cache) as generator:
        for turn in range(max_turns):
            live = [e for e in episodes if e.end is None]
            if not live:
                break
            caps = [min(params.max_new_tokens, max_episode_tokens - e.num_tokens) for e in live]  # each >= 1
            lengths = [len(e.prompt_ids) + e.num_tokens for e in live]
            for group in call_groups(lengths, caps, limit):
                rows = [live[i] for i in group]
                prompts = [e.prompt_ids + e.completion_ids for e in rows]
                named = {e.row_id for e in rows}
                others = [e.row_id for e in live if e.end is None and e.row_id not in named]  # the turn's other calls
                t1 = time.perf_counter()
                out = generator.generate(
                    prompts,
                    dataclasses.replace(params, n=1, max_new_tokens=max(caps[i] for i in group)),
                    key=None if key is None else (*key, turn),
                    row_ids=[e.row_id for e in rows],
                    **hold_rows(generator is not sampler, others),
                )
                sample_s += time.perf_counter() - t1
                calls += 1
                prefill += out.stats.get("prefill_tokens", float(sum(len(p) for p in prompts)))
                reused += out.stats.get("reused_tokens", 0.0)
                t1 = time.perf_counter()
                for j, i in enumerate(group):
                    toks, logp, stopped = row_turn(out, j, caps[i])
                    last = turn + 1 == max_turns
                    _take_turn(
                        live[i], env, tokenizer, tools, variables, toks, logp, stopped, stop_ids, last,
                        max_episode_tokens, plain,
                    )  # fmt: skip
                env_s += time.perf_counter() - t1
    if stats is not None:
        stats.update(
            sample_s=sample_s,
            env_s=env_s,
            total_s=time.perf_counter() - t0,
            generate_calls=float(calls),
            prefill_tokens=prefill,
            reused_tokens=reused,
        )
    return episodes


def _take_turn(
    e: Episode,
    env: Environment,
    tokenizer: Any,
    tools: Any,
    variables: dict[str, Any],
    toks: list[int],
    logp: list[float],
    stopped: bool,
    stop_ids: set[int],
    last_turn: bool,
    max_episode_tokens: int,
    plain: bool,
) -> None:
    """Record one model turn of `e`, let the environment answer, append its segment or end `e`."""
    e.segments.append(Segment(MODEL, toks, logp))
    stop_token = toks[-1] if stopped and toks and toks[-1] in stop_ids else None
    text = tokenizer.decode(toks[:-1] if stop_token is not None else toks, skip_special_tokens=False)
    e.turns.append(Turn(text=text, stopped=stopped))
    history = list(e.messages)
    if not stopped:  # an unfinished turn is not answered
        e.messages.append({"role": "assistant", "content": text})
        e.end = "budget" if e.num_tokens >= max_episode_tokens else "turn_length"
        return
    new, done = checked_step(env.step(e, text), f"{type(env).__name__}.step()")
    calls = e.turns[-1].tool_calls
    assistant = assistant_message(text, calls, plain=plain)
    e.turns[-1].env_messages = list(new)
    if done or last_turn:
        e.messages += [assistant, *new]
        e.end = "done" if done else "max_turns"
        return
    stop_text = None if stop_token is None else tokenizer.decode([stop_token], skip_special_tokens=False)
    kwargs = dict(model_text=text, stop_text=stop_text, tools=tools, variables=variables)
    try:
        env_text = environment_text(tokenizer, history, assistant, new, **kwargs)
    except ChatTemplateError:
        if "tool_calls" not in assistant:
            raise
        # the template refuses these calls (Llama-3.1's raises on more than one per turn): they stay in the
        # assistant's text, as for a template without tool support; the segment is still the new messages'
        assistant = assistant_message(text, calls, plain=True)
        env_text = environment_text(tokenizer, history, assistant, new, **kwargs)
    e.messages += [assistant, *new]
    env_ids = tokenizer.encode(valid_text(env_text), add_special_tokens=False)  # no lone surrogate from a user env
    if e.num_tokens + len(env_ids) >= max_episode_tokens:  # no room left for a model token
        e.end = "budget"
    elif env_ids:
        e.segments.append(Segment(ENV, env_ids))


# ----------------------------------------------------------------------------- the layout


def episodes_to_rollout(
    episodes: Sequence[Episode],
    tokenizer: Any,
    *,
    pad_id: int,
    group_size: int = 1,
    stats: Mapping[str, float] | None = None,
) -> Rollout:
    """The training rows of N episodes (groups of `group_size` contiguous): see the module docstring.

    completion_texts are the decoded completions (special tokens removed), the environment's text
    included; `Episode.final_text` / `episode_columns` give the model's last turn and the messages.
    """
    N = len(episodes)
    if N == 0 or N % group_size:
        raise ValueError(f"{N} episodes do not make groups of {group_size}")
    prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in episodes], pad_id)  # (N, Tp) each
    Tc = max(1, max(e.num_tokens for e in episodes))
    completion_ids = torch.full((N, Tc), pad_id, dtype=torch.long)  # (N, Tc)
    completion_mask = torch.zeros(N, Tc, dtype=torch.long)  # (N, Tc): model and environment tokens
    loss_mask = torch.zeros(N, Tc, dtype=torch.long)  # (N, Tc): the model's tokens
    sampler_logp = torch.zeros(N, Tc, dtype=torch.float32)  # (N, Tc): at the model's tokens
    for i, e in enumerate(episodes):
        at = 0
        for s in e.segments:
            end = at + len(s.token_ids)
            completion_ids[i, at:end] = torch.tensor(s.token_ids, dtype=torch.long)
            completion_mask[i, at:end] = 1
            if s.owner == MODEL:
                loss_mask[i, at:end] = 1
                sampler_logp[i, at:end] = torch.tensor(s.logprobs, dtype=torch.float32)
            at = end
    model_tokens = float(loss_mask.sum())
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        sampler_logp=sampler_logp,
        truncated=torch.tensor([e.truncated for e in episodes], dtype=torch.bool),
        completion_texts=[tokenizer.decode(e.completion_ids, skip_special_tokens=True) for e in episodes],
        prompt_index=torch.arange(N) // group_size,
        group_size=group_size,
        stats={
            **dict(stats or {}),
            "tokens": model_tokens,
            "env_tokens": float(completion_mask.sum()) - model_tokens,
            "turns": float(sum(len(e.turns) for e in episodes)),
        },
        loss_mask=loss_mask,
    )


def episode_columns(episodes: Sequence[Episode]) -> dict[str, list[Any]]:
    """Reward-function columns of the whole episodes: messages, tool calls and results, the model's
    last turn, the number of turns and how each episode ended."""
    return {
        "messages": [e.messages for e in episodes],
        "tool_calls": [e.tool_calls for e in episodes],
        "tool_results": [e.tool_results for e in episodes],
        "final_response": [e.final_text for e in episodes],
        "num_turns": [len(e.turns) for e in episodes],
        "episode_end": [e.end for e in episodes],
    }
