"""Multi-turn episodes: turn-taking over any Sampler, the environment's segments, the interleaved row
and its masks, endings (done, max_turns, token budget), split invariance, and the trainer's log-probs
of the built rows against the sampler's (the multi-turn test_sampler_logprobs_equal_trainer_logprobs).

A character-level tokenizer (one token per character, <|im_start|> / <|im_end|> special) with a tiny
Hermes-style chat template; a scripted sampler for the tool logic, the tiny model for the numbers."""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch
from helpers.tiny import tiny_model
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from minigrpo import grpo
from minigrpo.configio import ConfigError, ConfigWarning
from minigrpo.env_config import EnvCfg, build_environment, check_chat_template
from minigrpo.episodes import (
    ENV,
    MODEL,
    Environment,
    LayoutError,
    ToolEnvironment,
    environment_text,
    episode_columns,
    episodes_to_rollout,
    run_episodes,
)
from minigrpo.logprobs import completion_logprobs
from minigrpo.sampling.kv_sampler import KVCacheSampler
from minigrpo.sampling.params import SamplingParams
from minigrpo.sampling.rollout import Rollout, concat_rollouts, left_pad
from minigrpo.tokenizer import Tokenizer
from minigrpo.tools import parse_tool_calls

TEMPLATE = (
    "{%- if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for tc in m.tool_calls or [] %}"
    '<tool_call>{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def char_tokenizer(template: str = TEMPLATE) -> Tokenizer:
    vocab = {t: i for i, t in enumerate([*SPECIALS, *map(chr, range(32, 127)), "\n"])}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one char, one token
    backend.decoder = decoders.Fuse()
    return Tokenizer(
        backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=template,
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        extra_stop_ids=[vocab["<|im_end|>"]],
    )


TOK = char_tokenizer()
IM_END = TOK.token_to_id("<|im_end|>")


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


def call(a, b=None) -> str:
    args = {"a": a} if b is None else {"a": a, "b": b}
    return '<tool_call>{"name": "add", "arguments": ' + str(args).replace("'", '"') + "}</tool_call>"


class ScriptedSampler:
    """A Sampler whose row `r` says SCRIPT[r][k] on turn k (then <|im_end|>, unless the text ends in
    the stop string "</tool_call>" given in params): log-prob -(r + 1) / 100 - t / 1000 at token t.
    Records every generate call."""

    pad_id = 0

    def __init__(self, script: dict[int, list[str]]):
        self.script, self.calls, self.last_sync = script, [], {}

    def generate(self, prompt_ids, params, *, key=None, row_ids=None):
        self.calls.append(dict(prompts=[list(p) for p in prompt_ids], params=params, key=key, row_ids=list(row_ids)))
        turn = key[-1]
        rows = []
        for r in row_ids:
            text = self.script[r][turn]
            toks = TOK.encode(text, add_special_tokens=False)
            stop_string = any(text.endswith(s) for s in params.stop_strings)
            toks = toks if stop_string else [*toks, IM_END]
            rows.append((toks[: params.max_new_tokens], len(toks) > params.max_new_tokens))
        N, Tc = len(rows), max(len(t) for t, _ in rows)
        ids, mask = torch.zeros(N, Tc, dtype=torch.long), torch.zeros(N, Tc, dtype=torch.long)
        logp = torch.zeros(N, Tc)
        for i, ((toks, _), r) in enumerate(zip(rows, row_ids)):
            ids[i, : len(toks)], mask[i, : len(toks)] = torch.tensor(toks), 1
            logp[i, : len(toks)] = -(r + 1) / 100 - torch.arange(len(toks)) / 1000
        p_ids, p_mask = left_pad(prompt_ids, 0)
        return Rollout(p_ids, p_mask, ids, mask, logp, torch.tensor([c for _, c in rows]), [""] * N,
                       torch.arange(N), 1)  # fmt: skip

    def sync(self, policy): ...
    def sleep(self): ...
    def wake(self): ...
    def close(self): ...


def check_row(rollout: Rollout, i: int, episode) -> None:
    """Row i is the episode's segments concatenated; masks and log-probs follow the owners."""
    n = episode.num_tokens
    ids = [t for s in episode.segments for t in s.token_ids]
    owners = [s.owner for s in episode.segments for _ in s.token_ids]
    assert rollout.completion_ids[i, :n].tolist() == ids
    assert (rollout.completion_ids[i, n:] == 0).all()
    assert rollout.completion_mask[i].tolist() == [1] * n + [0] * (rollout.completion_mask.shape[1] - n)
    assert rollout.loss_mask[i, :n].tolist() == [int(o == MODEL) for o in owners]  # env tokens never 1
    assert (rollout.loss_mask[i, n:] == 0).all()
    model_logp = [x for s in episode.segments if s.owner == MODEL for x in s.logprobs]
    assert rollout.sampler_logp[i][rollout.loss_mask[i].bool()].tolist() == pytest.approx(model_logp, abs=1e-7)
    assert (rollout.sampler_logp[i][~rollout.loss_mask[i].bool()] == 0).all()
    assert rollout.prompt_ids[i][rollout.prompt_mask[i].bool()].tolist() == episode.prompt_ids


# ----------------------------------------------------------------------------- tools, scripted


def test_tool_episodes_finish_at_different_turns():
    script = {
        0: [call(2, 3), "It is 5."],  # one call, then the answer: done after 2 turns
        1: ["7."],  # no call: done at once
        2: [call(1), call(1, 4), "5!"],  # malformed call (b missing): an error message, the episode goes on
        3: [call(1, 1), call(2, 2), call(3, 3)],  # calls until max_turns
    }
    sampler = ScriptedSampler(script)
    env = ToolEnvironment([add], chat_template=TOK.chat_template)
    assert isinstance(env, Environment) and env.format == "hermes"
    params = SamplingParams(n=2, max_new_tokens=100, stop_ids=(IM_END,))
    stats: dict = {}
    eps = run_episodes(
        sampler, TOK, env, ["2+3?", "1+4?"], params, max_turns=3, max_episode_tokens=500, key=(9, 1), stats=stats
    )
    assert [e.end for e in eps] == ["done", "done", "done", "max_turns"]
    assert [len(e.turns) for e in eps] == [2, 1, 3, 3] and [e.truncated for e in eps] == [False, False, False, True]
    # one generate call per turn, only the live episodes, the noise stream (*key, turn)
    assert [c["row_ids"] for c in sampler.calls] == [[0, 1, 2, 3], [0, 2, 3], [2, 3]]
    assert [c["key"] for c in sampler.calls] == [(9, 1, 0), (9, 1, 1), (9, 1, 2)]
    assert all(c["params"].n == 1 for c in sampler.calls) and stats["generate_calls"] == 3
    # each turn's prompt is the episode so far: the opening prompt and every segment
    assert (
        sampler.calls[2]["prompts"][0]
        == eps[2].prompt_ids
        + eps[2].segments[0].token_ids
        + eps[2].segments[1].token_ids
        + eps[2].segments[2].token_ids
        + eps[2].segments[3].token_ids
    )
    # the malformed call became an error tool result the model read on its next turn
    bad = eps[2].turns[0].tool_results[0]
    assert not bad.ok and bad.content == "error: missing required argument 'b'"
    assert [r.content for r in eps[2].tool_results] == ["error: missing required argument 'b'", "5"]
    assert eps[2].messages[1] == {"role": "assistant", "content": call(1)}  # malformed call stays in the text
    assert eps[2].messages[2] == {"role": "tool", "content": "error: missing required argument 'b'", "name": "add"}
    assert env.stats.metrics()["tools/calls"] == 1 + 2 + 3 and env.stats.metrics()["tools/failures"] == 1
    # the environment's segment: the rest of the closer ("\n" after the sampled <|im_end|>), the tool
    # turn, the generation prompt; the row decodes to the template's rendering of the conversation
    env_seg = TOK.decode(eps[0].segments[1].token_ids)
    assert env_seg == "\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"
    assert [s.owner for s in eps[0].segments] == [MODEL, ENV, MODEL]
    for e in eps[:3]:
        whole = TOK.apply_chat_template(e.messages, tools=env.tool_specs)
        assert TOK.decode(e.prompt_ids + e.completion_ids) + "\n" == whole
    assert eps[0].messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    ]
    # max_turns: the last call ran (rewards see its result) but nothing after the last model token is a token
    assert eps[3].messages[-1] == {"role": "tool", "content": "6", "name": "add"} and eps[3].segments[-1].owner == MODEL
    rollout = episodes_to_rollout(eps, TOK, pad_id=0, group_size=2, stats=stats)
    assert rollout.completion_ids.shape == (4, max(e.num_tokens for e in eps))
    for i, e in enumerate(eps):
        check_row(rollout, i, e)
    assert rollout.truncated.tolist() == [False, False, False, True] and rollout.prompt_index.tolist() == [0, 0, 1, 1]
    assert rollout.stats["tokens"] == sum(len(s.token_ids) for e in eps for s in e.segments if s.owner == MODEL)
    assert rollout.completion_texts[1] == "7."
    cols = episode_columns(eps)
    assert cols["final_response"] == ["It is 5.", "7.", "5!", call(3, 3)] and cols["num_turns"] == [2, 1, 3, 3]
    assert [len(c) for c in cols["tool_calls"]] == [1, 0, 2, 3]


def test_token_budget_and_turn_length_end_episodes_truncated():
    long_answer = "x" * 30
    script = {
        0: [call(2, 3), long_answer],  # turn 2 is cut at the budget
        1: [call(1000000, 2000000), "ok"],  # the tool turn does not fit in the budget: ends before it
        2: ["y" * 20],  # longer than max_new_tokens: cut, turn_length
    }
    sampler = ScriptedSampler(script)
    env = ToolEnvironment([add], chat_template=TOK.chat_template)
    first = len(call(2, 3)) + 1  # tokens of turn 1 of row 0 (characters + <|im_end|>)
    env0 = len(TOK.encode("\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"))  # its env segment: 14
    budget = first + env0 + 10  # 10 tokens are left for turn 2
    params = SamplingParams(max_new_tokens=100, stop_ids=(IM_END,))
    rows = ["a", "b"]
    eps = run_episodes(sampler, TOK, env, rows, params, max_turns=4, max_episode_tokens=budget, key=(0,))
    env1 = len(TOK.encode("\n<|im_start|>tool\n3000000<|im_end|>\n<|im_start|>assistant\n"))
    assert len(call(1000000, 2000000)) + 1 + env1 >= budget  # row 1's turn 2 could not start
    e0, e1 = eps
    assert e0.end == "budget" and e0.truncated and e0.num_tokens == budget
    assert e0.segments[-1].token_ids == TOK.encode(long_answer[:10], add_special_tokens=False)
    assert not e0.turns[-1].stopped
    assert e1.end == "budget" and [s.owner for s in e1.segments] == [MODEL] and len(e1.turns) == 1
    assert e1.turns[0].tool_results[0].content == "3000000"  # the call ran; its tokens did not fit
    # turn 2 sampled at most the largest remaining budget; row 0 was cut to its own
    assert sampler.calls[1]["params"].max_new_tokens == 10 and sampler.calls[1]["row_ids"] == [0]
    short = ScriptedSampler(script)
    (e2,) = run_episodes(
        short, TOK, env, ["c"], dataclasses.replace(params, max_new_tokens=8), max_turns=3, max_episode_tokens=100,
        key=(0,), row_ids=[2],
    )  # fmt: skip
    assert e2.end == "turn_length" and e2.truncated and e2.completion_ids == TOK.encode("y" * 8)
    rollout = episodes_to_rollout([*eps, e2], TOK, pad_id=0)
    assert rollout.truncated.all() and rollout.completion_ids.shape[1] == budget
    for i, e in enumerate([*eps, e2]):
        check_row(rollout, i, e)


def test_a_stop_string_turn_gets_the_templates_closer():
    """The model stops on "</tool_call>" (a stop string, no <|im_end|>): the environment's segment
    starts with the closer the model did not write."""
    sampler = ScriptedSampler({0: [call(4, 5), "9"]})
    env = ToolEnvironment([add], chat_template=TOK.chat_template)
    params = SamplingParams(max_new_tokens=100, stop_ids=(IM_END,), stop_strings=("</tool_call>",))
    (e,) = run_episodes(sampler, TOK, env, ["4+5?"], params, max_turns=2, max_episode_tokens=300, key=(1,))
    assert e.end == "done" and e.segments[0].token_ids[-1] != IM_END
    assert TOK.decode(e.segments[1].token_ids) == "<|im_end|>\n<|im_start|>tool\n9<|im_end|>\n<|im_start|>assistant\n"
    assert TOK.decode(e.prompt_ids + e.completion_ids) + "\n" == TOK.apply_chat_template(
        e.messages, tools=env.tool_specs
    )


def test_calls_the_template_refuses_stay_in_the_assistants_text():
    """A template that raises on two calls in one turn (as Llama-3.1's does): the turn's calls run and
    stay in the assistant's content, the episode goes on instead of the run failing."""
    one_call = "{%- if (m.tool_calls or []) | length > 1 %}{{ raise_exception('one call per turn') }}{% endif %}"
    tok = char_tokenizer(TEMPLATE.replace("{%- for m in messages %}", "{%- for m in messages %}" + one_call))
    sampler = ScriptedSampler({0: [call(2, 3) + call(4, 5), "5, 9"]})
    env = ToolEnvironment([add], chat_template=tok.chat_template)
    params = SamplingParams(max_new_tokens=200, stop_ids=(IM_END,))
    (e,) = run_episodes(sampler, tok, env, ["2+3, 4+5?"], params, max_turns=2, max_episode_tokens=400, key=(2,))
    assert e.end == "done" and [r.content for r in e.tool_results] == ["5", "9"]
    assert e.messages[1] == {"role": "assistant", "content": call(2, 3) + call(4, 5)}
    whole = tok.apply_chat_template(e.messages, tools=env.tool_specs)
    assert TOK.decode(e.prompt_ids + e.completion_ids) + "\n" == whole  # the row is what the template writes


def test_a_lone_surrogate_in_a_call_is_an_error_result_not_a_crash():
    """The model writes half of a surrogate pair as a JSON escape: the error message quoting it and a
    tool echoing it are text the tokenizer encodes (U+FFFD), so the episode goes on."""

    def echo(text: str) -> str:
        """Echo.

        Args:
            text: what to say
        """
        return text

    first = '<tool_call>{"name": "add", "arguments": {"a": "\\ud83d", "b": 1}}</tool_call>'
    second = '<tool_call>{"name": "echo", "arguments": {"text": "\\ud83d"}}</tool_call>'
    sampler = ScriptedSampler({0: [first, second, "done"]})
    env = ToolEnvironment([add, echo], chat_template=TOK.chat_template)
    params = SamplingParams(max_new_tokens=100, stop_ids=(IM_END,))
    (e,) = run_episodes(sampler, TOK, env, ["?"], params, max_turns=3, max_episode_tokens=500, key=(3,))
    assert e.end == "done" and len(e.turns) == 3
    assert [r.content for r in e.tool_results] == ["error: argument 'a' should be an integer, got \"\ufffd\"", "\ufffd"]
    assert TOK.decode(e.segments[3].token_ids) == "\n<|im_start|>tool\n<unk><|im_end|>\n<|im_start|>assistant\n"


def test_a_tool_use_template_decides_the_call_layout():
    """A tokenizer with a "tool_use" template beside a default one without tool support (as Hermes-2-Pro's
    and Command-R's): the episodes render with tool_use (the environment has tools), so the format and the
    tool support are read from it: calls as tool_calls, results as tool messages, as it writes them."""
    no_tools = (
        "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = char_tokenizer({"default": no_tools, "tool_use": TEMPLATE})
    cfg = SimpleNamespace(env=EnvCfg(kind="tools", tools=["calculator"]), data=SimpleNamespace(system_prompt=None))
    env = build_environment(cfg, tok)
    assert (env.format, env.plain) == ("hermes", False)
    text = '<tool_call>{"name": "calculator", "arguments": {"expression": "3*4"}}</tool_call>'
    sampler = ScriptedSampler({0: [text, "12"]})
    params = SamplingParams(max_new_tokens=100, stop_ids=(IM_END,))
    (e,) = run_episodes(sampler, tok, env, ["3*4?"], params, max_turns=2, max_episode_tokens=400, key=(5,))
    assert e.end == "done" and e.messages[2] == {"role": "tool", "content": "12", "name": "calculator"}
    assert e.messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "3*4"}}}
    ]
    assert TOK.decode(e.segments[1].token_ids) == "\n<|im_start|>tool\n12<|im_end|>\n<|im_start|>assistant\n"
    whole = tok.apply_chat_template(e.messages, tools=env.tool_specs)
    assert TOK.decode(e.prompt_ids + e.completion_ids) + "\n" == whole


def test_a_template_that_rewrites_the_models_text_still_gets_its_closer():
    """A template that re-spaces the <think> block (as Qwen3's does) does not contain the model's raw
    text: the rest of the closer after <|im_end|> ("\\n") is still the environment's first token."""
    think = (
        "{% if '</think>' in m.content %}<think>\n{{ m.content.split('</think>')[0].split('<think>')[-1].strip() }}"
        "\n</think>\n\n{{ m.content.split('</think>')[-1].strip() }}{% else %}{{ m.content }}{% endif %}"
    )
    tok = char_tokenizer(TEMPLATE.replace("<|im_start|>assistant\n{{ m.content }}", "<|im_start|>assistant\n" + think))
    sampler = ScriptedSampler({0: ["<think>sum</think>" + call(2, 3), "5"]})
    env = ToolEnvironment([add], chat_template=tok.chat_template)
    params = SamplingParams(max_new_tokens=200, stop_ids=(IM_END,))
    (e,) = run_episodes(sampler, tok, env, ["2+3?"], params, max_turns=2, max_episode_tokens=400, key=(6,))
    assert e.end == "done" and TOK.decode(e.segments[1].token_ids).startswith("\n<|im_start|>tool\n5<|im_end|>")


def test_a_template_that_rewrites_earlier_turns_is_refused():
    rewrites = TEMPLATE.replace("{{ m.content }}{%- for tc", "{{ m.content if loop.last else '...' }}{%- for tc")
    tok = char_tokenizer(rewrites)
    history = [{"role": "user", "content": "hi"}]
    answer = {"role": "assistant", "content": "hello"}
    with pytest.raises(LayoutError, match="differently"):
        environment_text(
            tok, history, answer, [{"role": "user", "content": "more"}], model_text="hello", stop_text="<|im_end|>"
        )
    text = environment_text(
        TOK, history, answer, [{"role": "user", "content": "more"}], model_text="hello", stop_text=None
    )
    assert text == "<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"


# a Mistral-v0.3-style template: the tools before the last user message (with the system prompt), calls as
# "[TOOL_CALLS] [...]" each with an id of 9 characters, results naming it; no header opens the model's turn
_NEEDS_ID = "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
MISTRAL_STYLE = (
    "{%- set ns = namespace(last_user=-1, system='') %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- elif m.role == 'system' %}{%- set ns.system = m.content + '\n\n' %}{%- endif %}{%- endfor %}"
    "<s>{%- for m in messages %}"
    "{%- if m.role == 'user' %}"
    "{%- if loop.index0 == ns.last_user %}"
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | map(attribute='function.name') | join(',') }}[/AVAILABLE_TOOLS]"
    "{%- endif %}[INST] {{ ns.system }}{{ m.content }}[/INST]"
    "{%- else %}[INST] {{ m.content }}[/INST]{%- endif %}"
    "{%- elif m.tool_calls is defined and m.tool_calls %}[TOOL_CALLS] ["
    "{%- for tc in m.tool_calls %}{%- if tc.id is not defined or tc.id | length != 9 %}" + _NEEDS_ID + "{%- endif %}"
    '{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}, "id": "{{ tc.id }}"}'
    "{%- if not loop.last %}, {% endif %}{%- endfor %}]<|im_end|>"
    "{%- elif m.role == 'assistant' %} {{ m.content | trim }}<|im_end|>"
    "{%- elif m.role == 'tool' %}{%- if m.tool_call_id is not defined or m.tool_call_id | length != 9 %}"
    + _NEEDS_ID
    + '{%- endif %}[TOOL_RESULTS] {"content": {{ m.content }}, "call_id": "{{ m.tool_call_id }}"}[/TOOL_RESULTS]'
    "{%- endif %}{%- endfor %}"
)


def _env_cfg(**env):
    return SimpleNamespace(env=EnvCfg(**env), data=SimpleNamespace(system_prompt=None))


def test_mistral_style_calls_get_the_ids_the_template_needs():
    """`[TOOL_CALLS] [...]` calls are found (the format is read from the template) and each gets an id of 9
    letters and digits, which the assistant's tool_calls and the tool messages carry: Mistral's template
    raises without them. Before, the template was taken for "hermes": no call was ever found."""
    tok = char_tokenizer(MISTRAL_STYLE)
    env = build_environment(_env_cfg(kind="tools", tools=["calculator"]), tok)
    assert (env.format, env.plain) == ("mistral", False)
    text = (
        '[TOOL_CALLS] [{"name": "calculator", "arguments": {"expression": "3*4"}}, '
        '{"name": "calculator", "arguments": {"expression": "1/0"}, "id": "Given1234"}]'
    )
    sampler = ScriptedSampler({0: [text, "12"]})
    params = SamplingParams(max_new_tokens=200, stop_ids=(IM_END,))
    (e,) = run_episodes(sampler, tok, env, ["3*4?"], params, max_turns=2, max_episode_tokens=600, key=(7,))
    assert e.end == "done" and len(e.turns) == 2
    ids = [c["id"] for c in e.messages[1]["tool_calls"]]
    assert re.fullmatch("[A-Za-z0-9]{9}", ids[0]) and ids[1] == "Given1234"  # the model's own valid id is kept
    assert e.messages[1]["content"] == ""  # the whole block became tool_calls
    assert [(m["tool_call_id"], m["content"]) for m in e.messages[2:4]] == [
        (ids[0], "12"),
        (ids[1], "error: ValueError: division by zero"),
    ]
    assert TOK.decode(e.segments[1].token_ids) == (
        f'[TOOL_RESULTS] {{"content": 12, "call_id": "{ids[0]}"}}[/TOOL_RESULTS]'
        f'[TOOL_RESULTS] {{"content": error: ValueError: division by zero, "call_id": "{ids[1]}"}}[/TOOL_RESULTS]'
    )
    assert [c.id for c in parse_tool_calls(text, env.tools, "mistral")] == ids  # the same on every run
    bad = parse_tool_calls(text.replace('"Given1234"', '"bad id"'), env.tools, "mistral")  # replaced
    assert re.fullmatch("[A-Za-z0-9]{9}", bad[1].id) and bad[1].id != bad[0].id


# Mistral Small 3.x / Magistral / Devstral: each call written as [TOOL_CALLS]name[ARGS]{json}, results without ids
MISTRAL_NAMED_STYLE = (
    "<s>{%- if tools %}[AVAILABLE_TOOLS]{{ tools | map(attribute='function.name') | join(',') }}[/AVAILABLE_TOOLS]"
    "{%- endif %}{%- for m in messages %}"
    "{%- if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{%- elif m.role == 'assistant' %}{{ m.content or '' }}"
    "{%- for tc in m.tool_calls or [] %}{%- set a = tc.function.arguments %}"
    "{{- '[TOOL_CALLS]' + tc.function.name + '[ARGS]' + (a if a is string else a | tojson) }}"
    "{%- endfor %}<|im_end|>"
    "{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]{%- endif %}{%- endfor %}"
)


def test_mistral_named_calls_play_an_episode():
    """The newer Mistral form: the format is read from the template, two calls in one turn (one malformed)
    each get a result, the good call leaves the content (the template writes it back), the bad one stays in
    it; the row is the template's rendering. Before, every such call was 'bad JSON after [TOOL_CALLS]'."""
    tok = char_tokenizer(MISTRAL_NAMED_STYLE)
    env = build_environment(_env_cfg(kind="tools", tools=["calculator"]), tok)
    assert (env.format, env.plain) == ("mistral", False)
    text = '[TOOL_CALLS]calculator[ARGS]{"expression": "3*4"}[TOOL_CALLS]calculator[ARGS]{"expression": 3*4}'
    sampler = ScriptedSampler({0: [text, "12"]})
    params = SamplingParams(max_new_tokens=200, stop_ids=(IM_END,))
    (e,) = run_episodes(sampler, tok, env, ["3*4?"], params, max_turns=2, max_episode_tokens=600, key=(7,))
    assert e.end == "done" and [r.ok for r in e.tool_results] == [True, False]
    assert e.tool_results[0].content == "12" and e.tool_results[1].content.startswith(
        "error: bad JSON in the arguments of 'calculator' after [ARGS]"
    )
    assert e.messages[1]["content"] == '[TOOL_CALLS]calculator[ARGS]{"expression": 3*4}'
    assert [c["function"] for c in e.messages[1]["tool_calls"]] == [
        {"name": "calculator", "arguments": {"expression": "3*4"}}
    ]
    assert TOK.decode(e.segments[1].token_ids).startswith("[TOOL_RESULTS]12[/TOOL_RESULTS][TOOL_RESULTS]error: bad")
    whole = tok.apply_chat_template(e.messages, tools=env.tool_specs)
    row = TOK.decode(e.prompt_ids + e.completion_ids)
    assert len(row) == len(whole) and row.startswith(whole[: whole.index("[TOOL_CALLS]")])  # calls in their order
    assert row.endswith(whole[whole.index("[TOOL_RESULTS]") :])


def test_a_template_the_episodes_cannot_extend_is_refused_when_the_environment_is_built():
    """Found before any weights load (check_chat_template runs in the run's checks), on one line: a template
    that rewrites earlier turns once more messages follow (LayoutError), and Mistral's with calls forced into
    a format without ids (the template raises). Before, both ended the run at the first tool call."""
    rewrites = char_tokenizer(
        TEMPLATE.replace("{{ m.content }}{%- for tc", "{{ m.content if loop.last else '...' }}{%- for tc")
    )
    for cfg, tok, what in [
        (_env_cfg(kind="tools", tools=["calculator"]), rewrites, "tool results: the chat template renders the"),
        (_env_cfg(kind="test_episodes:TalkEnv"), rewrites, "a user message: the chat template renders the"),
        (_env_cfg(kind="tools", tools=["calculator"], format="hermes"), char_tokenizer(MISTRAL_STYLE), "tool results"),
    ]:
        for check in (check_chat_template, build_environment):
            with pytest.raises(
                ConfigError, match="cannot play an episode whose environment answers with " + what
            ) as info:
                check(cfg, tok)
            assert "\n" not in str(info.value)
    assert "Tool call IDs" in str(info.value)
    assert (
        type(build_environment(_env_cfg(kind="test_episodes:TalkEnv"), TOK)).__name__ == "TalkEnv"
    )  # a clean template
    check_chat_template(_env_cfg(kind="tools", tools=["calculator"], format="mistral"), char_tokenizer(MISTRAL_STYLE))


def test_a_reasoning_template_that_drops_empty_thoughts_is_probed_with_a_thought():
    """As Qwen3's: an empty <think> block on the last turn only, no reasoning before the last user message.
    A reasoning model's turn holds one, so tool episodes extend cleanly: not refused. A user message drops
    the earlier reasoning: a user class is warned (it may answer with tool messages, which work)."""
    last_user = (
        "{%- set ns = namespace(last_user=-1) %}"
        "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
        "{%- endfor %}"
    )
    think = (
        "{%- set r = m.content.split('</think>')[0].split('<think>')[-1].strip() if '</think>' in m.content else '' %}"
        "{%- if loop.index0 > ns.last_user and (loop.last or r) %}<think>\n{{ r }}\n</think>\n\n{% endif %}"
        "{{ m.content.split('</think>')[-1].lstrip() }}"
    )
    template = last_user + TEMPLATE.replace("<|im_start|>assistant\n{{ m.content }}", "<|im_start|>assistant\n" + think)
    tok = char_tokenizer(template)
    assert build_environment(_env_cfg(kind="tools", tools=["calculator"]), tok).format == "hermes"
    with pytest.warns(ConfigWarning, match="answers with a user message \\(tool messages are fine\\)"):
        check_chat_template(_env_cfg(kind="test_episodes:TalkEnv"), tok)


# ----------------------------------------------------------------------------- Qwen3's template

EMPTY_THINK = "<think>\n\n</think>\n\n"
QWEN3_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """(ours, transformers') tokenizer of one folder: the character vocabulary with Qwen3's chat template."""
    from helpers.tok_fixtures import hf_tokenizer
    from test_chat_template import QWEN3_TEMPLATE

    folder = tmp_path_factory.mktemp("qwen3-chars")
    char_tokenizer(QWEN3_TEMPLATE).save(folder)
    return Tokenizer.from_dir(folder), hf_tokenizer(folder)


@pytest.mark.parametrize("thinking", [False, True])
def test_qwen3_tool_episodes_with_and_without_thinking(qwen3, thinking):
    """Qwen3's template writes an empty <think> block on the last assistant turn only: with
    enable_thinking=False it ends the generation prompt (the model sees it), and with thinking on it is
    added to a turn written without reasoning; once the tool results follow, the turn renders without it.
    The episodes play (before: LayoutError at the first tool result; no way to pass enable_thinking),
    the calls (two in a turn) run, and each environment segment is exactly what transformers' rendering
    of the conversation adds after the turn, masked out of the loss. The row is transformers' rendering
    with the empty block where the model saw it."""
    tok, hf = qwen3
    kwargs = {} if thinking else {"enable_thinking": False}
    two_calls = QWEN3_CALL + "\n" + QWEN3_CALL.replace('"a": 2, "b": 3', '"a": 5, "b": 1')
    sampler = ScriptedSampler({0: [QWEN3_CALL, two_calls, "It is 5."]})
    env = ToolEnvironment([add], chat_template=tok.chat_template, chat_template_kwargs=kwargs)
    params = SamplingParams(max_new_tokens=300, stop_ids=(IM_END,))
    (e,) = run_episodes(sampler, tok, env, ["2+3?"], params, max_turns=3, max_episode_tokens=900, key=(8,))
    assert e.end == "done" and [r.content for r in e.tool_results] == ["5", "5", "6"]
    assert [s.owner for s in e.segments] == [MODEL, ENV, MODEL, ENV, MODEL]
    opening = hf.apply_chat_template(
        e.messages[:1], tools=env.tool_specs, add_generation_prompt=True, tokenize=False, **kwargs
    )
    assert TOK.decode(e.prompt_ids) == opening and opening.endswith("assistant\n" + ("" if thinking else EMPTY_THINK))
    header = "<|im_start|>assistant\n" + ("" if thinking else EMPTY_THINK)
    results = "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in ["5", "6"])
    assert TOK.decode(e.segments[3].token_ids) == f"\n<|im_start|>user\n{results}<|im_end|>\n{header}"
    for seg_at, upto in ((1, 3), (3, 6)):  # each segment ends transformers' rendering up to its tool results
        after = hf.apply_chat_template(
            e.messages[:upto], tools=env.tool_specs, add_generation_prompt=True, tokenize=False, **kwargs
        )
        seg = TOK.decode(e.segments[seg_at].token_ids)  # "\n" (the rest of the closer) then the new messages
        assert seg.startswith("\n<|im_start|>user\n<tool_response>") and after.endswith(seg[1:])
    whole = hf.apply_chat_template(e.messages, tools=env.tool_specs, tokenize=False, **kwargs)
    plain = whole.replace("<|im_start|>assistant\n" + EMPTY_THINK, "<|im_start|>assistant\n")  # as earlier turns
    row = TOK.decode(e.prompt_ids + e.completion_ids) + "\n"
    assert row == plain.replace("<|im_start|>assistant\n", header)
    rollout = episodes_to_rollout([e], tok, pad_id=0)
    check_row(rollout, 0, e)
    trained = TOK.decode(rollout.completion_ids[0][rollout.loss_mask[0].bool()].tolist())
    assert trained == QWEN3_CALL + "<|im_end|>" + two_calls + "<|im_end|>It is 5.<|im_end|>"  # the model's only
    cfg = _env_cfg(kind="tools", tools=["calculator"], chat_template_kwargs=kwargs)
    check_chat_template(cfg, tok)
    assert build_environment(cfg, tok).chat_template_kwargs == kwargs


def test_qwen3_reasoning_dropped_by_a_user_message_is_still_refused(qwen3):
    """The empty block is a decoration; the model's own reasoning is not: Qwen3's template drops it once a
    user message follows, which rewrites what the model saw (LayoutError), as before."""
    tok, _ = qwen3
    history = [{"role": "user", "content": "hi"}]
    text = "<think>\nsome thought\n</think>\n\nhello"
    answer = {"role": "assistant", "content": text}
    with pytest.raises(LayoutError, match="differently"):
        environment_text(
            tok, history, answer, [{"role": "user", "content": "more"}], model_text=text, stop_text="<|im_end|>"
        )
    plain = environment_text(
        tok, history, {"role": "assistant", "content": "hello"}, [{"role": "user", "content": "more"}],
        model_text="hello", stop_text="<|im_end|>",
    )  # fmt: skip
    assert plain == "\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------- the tiny model


class TalkEnv:
    """Answers "go on" until the row's number of turns is reached."""

    def reset(self, row):
        return [{"role": "user", "content": row["q"]}]

    def step(self, episode, text):
        done = len(episode.turns) >= episode.row["turns"]
        return ([] if done else [{"role": "user", "content": "go on"}]), done


ROWS = [{"q": "hi", "turns": 3}, {"q": "abc?", "turns": 1}, {"q": "x", "turns": 2}]
STOPS = tuple(range(40, 75))  # a third of the characters end a turn: turns of a few tokens


def model_and_sampler(seed: int):
    model = tiny_model(seed=seed, vocab_size=TOK.vocab_size, max_position_embeddings=512)
    return model, KVCacheSampler(model, TOK)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_trainer_logprobs_on_episodes(temperature):
    """The trainer's log-probs of the built rows (model tokens scored, every token attended) equal
    the sampler's at the model's tokens (fp32, 1e-5), turns after the first included."""
    model, sampler = model_and_sampler(seed=11)
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=10, stop_ids=STOPS)
    eps = run_episodes(sampler, TOK, TalkEnv(), ROWS, params, max_turns=3, max_episode_tokens=60, key=(4, 0, 0))
    assert sum(len(e.turns) >= 2 for e in eps) >= 2 and len({e.end for e in eps}) >= 2, [e.end for e in eps]
    rollout = episodes_to_rollout(eps, TOK, pad_id=sampler.pad_id, group_size=2)
    for i, e in enumerate(eps):
        check_row(rollout, i, e)
    assert (rollout.completion_mask.sum(-1) > rollout.loss_mask.sum(-1)).sum() >= 2  # env tokens in the rows
    with torch.no_grad():
        logp = completion_logprobs(
            model, rollout.input_ids(), rollout.attention_mask(), rollout.loss_mask, temperature=temperature
        )
    err = (logp - rollout.sampler_logp).abs().max().item()
    assert err < 1e-5, f"trainer vs sampler log-probs: max |diff| {err:.2e}"
    assert (logp[~rollout.loss_mask.bool()] == 0).all()
    # the layout survives select / concat (dynamic sampling) and to()
    both = concat_rollouts([rollout.select([0, 1]), rollout.select([4, 5]).to("cpu")], sampler.pad_id)
    assert torch.equal(both.loss_mask[2:, : rollout.loss_mask.shape[1]], rollout.loss_mask[4:])


def test_a_row_plays_the_same_episode_alone_as_in_the_batch():
    _, sampler = model_and_sampler(seed=12)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, stop_ids=STOPS)
    run = dict(max_turns=3, max_episode_tokens=50, key=(7, 3, 0))
    together = run_episodes(sampler, TOK, TalkEnv(), ROWS, params, **run)
    for b, row in enumerate(ROWS):
        alone = run_episodes(sampler, TOK, TalkEnv(), [row], params, row_ids=range(2 * b, 2 * b + 2), **run)
        for j in range(2):
            e, a = together[2 * b + j], alone[j]
            assert [(s.owner, s.token_ids) for s in a.segments] == [(s.owner, s.token_ids) for s in e.segments]
            assert a.end == e.end
    assert together[0].completion_ids != together[1].completion_ids  # a group's episodes differ
    other = run_episodes(sampler, TOK, TalkEnv(), ROWS, params, **{**run, "key": (7, 4, 0)})
    assert [e.completion_ids for e in other] != [e.completion_ids for e in together]


# ----------------------------------------------------------------------------- the loss on the mask


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
@pytest.mark.parametrize("variant", ["plain", "kl+is", "sequence"])
def test_losses_ignore_the_environments_tokens(loss_type, variant):
    """Every loss variant on the loss mask: garbage log-probs (policy, old, reference, sampler) at
    the environment's tokens change neither the loss nor the gradient of the model's tokens."""
    gen = torch.Generator().manual_seed(0)
    N, Tc = 4, 9
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0, 0]] * 2 + [[1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 1, 0, 0, 0, 0, 0]])
    opts = grpo.LossOptions(
        loss_type=loss_type,
        beta=0.1 if variant == "kl+is" else 0.0,
        is_correction="token_truncate" if variant == "kl+is" else None,
        importance_sampling_level="sequence" if variant == "sequence" else "token",
    )
    base = [-torch.rand(N, Tc, generator=gen) * 3 for _ in range(4)]  # logp, old, ref, sampler
    adv = torch.randn(N, generator=gen)
    normalizer = grpo.make_normalizer(mask.float(), loss_type)

    def loss_and_grad(garbage: float):
        parts = [torch.where(mask.bool(), t, garbage) for t in base]
        logp = parts[0].clone().requires_grad_(True)
        loss, _ = grpo.policy_loss(
            logp, parts[1], adv, mask.float(), opts, normalizer=normalizer, ref_logp=parts[2], sampler_logp=parts[3]
        )
        loss.backward()
        return loss.detach(), logp.grad

    loss_a, grad_a = loss_and_grad(0.0)
    loss_b, grad_b = loss_and_grad(-50.0)
    assert torch.isfinite(loss_b) and abs(float(loss_a - loss_b)) < 1e-6
    assert torch.allclose(grad_a, grad_b, atol=1e-7) and (grad_b[~mask.bool()] == 0).all()
    assert grad_a[mask.bool()].abs().sum() > 0


def test_chat_template_kwargs_are_read_only_with_an_environment():
    """env.chat_template_kwargs reaches the environment (every rendering of its episodes), and is refused,
    naming the key, where no environment would read it."""
    from minigrpo.config import load_config

    cfg = load_config(
        None, ["env.kind=tools", "env.tools=[calculator]", "env.chat_template_kwargs={enable_thinking: false}"]
    )
    assert build_environment(cfg, TOK).chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(
        ConfigError,
        match=re.escape("env.chat_template_kwargs={'enable_thinking': False} are read only with env.kind set"),
    ):
        load_config(None, ["env.chat_template_kwargs={enable_thinking: false}"])
