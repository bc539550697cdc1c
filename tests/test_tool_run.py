"""The tool-use run of configs/smollm2_arith_tools.yaml on SmolLM2-135M-Instruct itself, on the CPU.

SmolLM2's chat template has no tool support: it writes each message as role and content and ignores
`tools` and `tool_calls`. So the system prompt must name the tool, a call stays in the assistant's
text and its result comes back in a user message of <tool_response> blocks (minigrpo/tools/render.py).
Checked on the real template and tokenizer (the packaged GGUF): a scripted turn with a valid call
gets the calculator's result rendered back and only the model's tokens carry loss; the SFT warm-up
conversations (benchmarks/tool_sft_data.py) are exactly the episodes' messages; the real model,
its first turn forced to a call, reads the result on its second turn and the trainer scores exactly
what it sampled; two GRPO steps of the config's shape (2 prompts x 2 episodes, 8 tokens a turn, LoRA)
run on the real model. About 30 s on 2 busy CPU cores.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from helpers.cli import ROOT, cli_env
from helpers.tok_fixtures import smollm2_checkpoint

from minigrpo.config import load_config
from minigrpo.configio import ConfigWarning
from minigrpo.data import build_dataset
from minigrpo.env_config import build_environment, resolve_tools, warn_unseen_tools
from minigrpo.episodes import ENV, MODEL, episode_columns, episodes_to_rollout, run_episodes
from minigrpo.reward_fns import correctness
from minigrpo.sampling.params import SamplingParams
from minigrpo.sampling.rollout import Rollout, left_pad
from minigrpo.tools import ToolResult, assistant_message, parse_tool_calls, renders_tool_calls, tool_messages

CONFIG = ROOT / "configs" / "smollm2_arith_tools.yaml"


@pytest.fixture(scope="module")
def tok():
    return smollm2_checkpoint().tokenizer()


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG)


def call_text(expression: str) -> str:
    """A call of the calculator, as the system prompt shows it."""
    return '<tool_call>\n{"name": "calculator", "arguments": {"expression": "' + expression + '"}}\n</tool_call>'


class ScriptedSampler:
    """Says turns[k] on turn k in every row, then <|im_end|> unless the text ends in a stop string;
    log-prob -0.01 * (t + 1) at token t."""

    pad_id = 0

    def __init__(self, tok, turns: list[str]):
        self.tok, self.turns = tok, turns

    def generate(self, prompt_ids, params, *, key=None, row_ids=None):
        text = self.turns[key[-1]]
        toks = self.tok.encode(text, add_special_tokens=False)
        if not any(text.endswith(s) for s in params.stop_strings):
            toks.append(self.tok.token_to_id("<|im_end|>"))
        N, Tc = len(prompt_ids), len(toks)
        ids = torch.tensor([toks] * N)  # (N, Tc)
        logp = -0.01 * torch.arange(1, Tc + 1, dtype=torch.float32).expand(N, Tc)  # (N, Tc)
        p_ids, p_mask = left_pad(prompt_ids, 0)
        mask, truncated = torch.ones(N, Tc, dtype=torch.long), torch.zeros(N, dtype=torch.bool)
        return Rollout(p_ids, p_mask, ids, mask, logp, truncated, [text] * N, torch.arange(N), 1)

    def sync(self, policy): ...
    def sleep(self): ...
    def wake(self): ...
    def close(self): ...


# ----------------------------------------------------------------------------- the template


def test_smollm2s_template_has_no_tool_support_and_the_system_prompt_names_the_tool(tok, cfg):
    assert not renders_tool_calls(tok.chat_template)
    writes_calls = "{% for m in messages %}{{ m.content }}{% for c in m.tool_calls or [] %}{{ c.function.name }}"
    assert renders_tool_calls(writes_calls + "{% endfor %}{% endfor %}")
    assert renders_tool_calls("{{ bos_token + '' }}" + writes_calls + "{% endfor %}{% endfor %}")  # tokens defined
    assert not renders_tool_calls("{% for m in messages %}{{ raise_exception('no') if m.tool_calls }}{% endfor %}")
    tools = resolve_tools(cfg.env)
    assert list(tools) == ["calculator"]
    assert warn_unseen_tools(tok, tools, cfg.env.system_prompt) == []
    assert '{"name": "calculator", "arguments": {"expression": ' in cfg.env.system_prompt
    with pytest.warns(ConfigWarning, match=r"does not name calculator"):
        assert warn_unseen_tools(tok, tools, "Answer the question.") == ["calculator"]
    # the plain layout: the call stays in the text, the results come back as one user message
    call = call_text("2 * 3")
    parsed = parse_tool_calls(call, tools)
    assert assistant_message(call, parsed, plain=True) == {"role": "assistant", "content": call}
    assert assistant_message(call, parsed)["content"] == ""  # a template with tool support writes it back
    results = [ToolResult("6", name="calculator"), ToolResult("error: boom", False, "exception", "calculator")]
    assert tool_messages(results, plain=True) == [
        {
            "role": "user",
            "content": "<tool_response>\n6\n</tool_response>\n<tool_response>\nerror: boom\n</tool_response>",
        }
    ]


def test_the_config_asks_what_smollm2_cannot_do_alone(cfg):
    syn = cfg.data.synthetic
    assert (syn.operations, syn.min_operand, syn.max_operand) == (["*"], 100, 9999)
    assert (cfg.env.kind, cfg.env.tools, cfg.env.max_turns) == ("tools", ["calculator"], 3)
    assert cfg.sampler.stop == ["</tool_call>"] and [r.name for r in cfg.rewards] == ["correctness"]
    assert (cfg.grpo.prompts_per_step, cfg.grpo.group_size, cfg.train.steps) == (32, 8, 100)
    rows = build_dataset(cfg.data)
    assert len(rows) == 5000 and all(int(r.answer) >= 100 * 100 for r in rows)


# ----------------------------------------------------------------------------- an episode


def test_a_call_gets_the_calculators_result_on_smollm2s_template(tok, cfg):
    """Turn 1 calls the calculator (ended by the stop string), turn 2 answers: the result comes back
    as a user message, and only the model's tokens carry loss."""
    row = build_dataset(cfg.data)[0]  # "What is A * B? Give the final answer ..."
    call = call_text(row.columns["expression"])
    answer = f"<answer>{row.answer}</answer>"
    env = build_environment(cfg, tok)
    assert env.plain and env.system_prompt == cfg.env.system_prompt
    params = SamplingParams(n=2, max_new_tokens=64, stop_ids=tuple(tok.stop_ids), stop_strings=tuple(cfg.sampler.stop))
    episodes = run_episodes(
        ScriptedSampler(tok, [call, answer]), tok, env, [row], params, max_turns=cfg.env.max_turns,
        max_episode_tokens=cfg.env.max_episode_tokens, key=(0,),
    )  # fmt: skip
    for e in episodes:
        prompt = tok.decode(e.prompt_ids, skip_special_tokens=False)
        assert prompt == (
            f"<|im_start|>system\n{cfg.env.system_prompt}<|im_end|>\n<|im_start|>user\n{row.prompt}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        assert e.end == "done" and [s.owner for s in e.segments] == [MODEL, ENV, MODEL]
        assert [r.content for r in e.tool_results] == [row.answer] and e.tool_results[0].ok
        env_text = tok.decode(e.segments[1].token_ids, skip_special_tokens=False)
        assert env_text == (
            f"<|im_end|>\n<|im_start|>user\n<tool_response>\n{row.answer}\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        assert e.messages[2] == {"role": "assistant", "content": call}  # the call stays in the text
        whole = tok.decode(e.prompt_ids + e.completion_ids, skip_special_tokens=False)
        assert whole + "\n" == tok.apply_chat_template(e.messages, tools=env.tool_specs)
    rollout = episodes_to_rollout(episodes, tok, pad_id=0, group_size=2)
    for i, e in enumerate(episodes):
        n = e.num_tokens
        model_ids = [t for s in e.segments if s.owner == MODEL for t in s.token_ids]
        assert rollout.loss_mask[i, :n].tolist() == e.loss_mask and rollout.completion_mask[i, :n].all()
        assert rollout.completion_ids[i][rollout.loss_mask[i].bool()].tolist() == model_ids
        text = tok.decode(model_ids, skip_special_tokens=False)
        assert text == call + answer + "<|im_end|>"
        assert int(rollout.loss_mask[i].sum()) == len(model_ids) < n  # the result's tokens carry no loss
    finals = episode_columns(episodes)["final_response"]
    assert finals == [answer, answer]
    assert correctness([row.prompt] * 2, finals, [row.answer] * 2) == [2.0, 2.0]


def test_the_warm_up_conversations_are_the_episodes_the_run_plays(tok, cfg, tmp_path):
    """benchmarks/tool_sft_data.py writes, for its tool share, exactly the messages an episode of the
    config has when the model says what the conversation's assistant says; the rest answer at once."""
    out = tmp_path / "sft.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tool_sft_data.py"), "--config", str(CONFIG), "--out", str(out)]
    cmd += ["--num", "40", "--tool-frac", "0.5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line)["messages"] for line in out.read_text().splitlines()]
    with_tool = [m for m in rows if len(m) == 5]
    assert len(rows) == 40 and 10 <= len(with_tool) <= 30 and all(len(m) in (3, 5) for m in rows)
    assert f"({len(with_tool)} with a tool call)" in proc.stdout
    direct = next(m for m in rows if len(m) == 3)
    assert direct[0] == {"role": "system", "content": cfg.env.system_prompt}
    assert re.fullmatch(r"<answer>\d+</answer>", direct[2]["content"])
    training = {r.prompt for r in build_dataset(cfg.data)}
    assert not training & {m[1]["content"] for m in rows}  # a question stream of its own
    conversation = with_tool[0]
    script = [conversation[2]["content"], conversation[4]["content"]]
    params = SamplingParams(max_new_tokens=64, stop_ids=tuple(tok.stop_ids), stop_strings=tuple(cfg.sampler.stop))
    (episode,) = run_episodes(
        ScriptedSampler(tok, script), tok, build_environment(cfg, tok), [conversation[1]["content"]], params,
        max_turns=cfg.env.max_turns, max_episode_tokens=cfg.env.max_episode_tokens, key=(0,),
    )  # fmt: skip
    assert episode.messages == conversation and episode.done


# ----------------------------------------------------------------------------- on the model


class ForceFirstTurn:
    """A logits processor: on the first turn (the first generate call) row r writes exactly
    `ids[r // G]`; later turns are the model's own. Turns are told apart by the draw index 0."""

    def __init__(self, ids: list[list[int]], group_size: int):
        width = max(len(x) for x in ids)
        rows = [x + [x[-1]] * (width - len(x)) for x in ids for _ in range(group_size)]
        self.table, self.turn = torch.tensor(rows), -1  # (N, L): the forced tokens of each row

    def __call__(self, logits, rows, step):
        if int(step) == 0:
            self.turn += 1
        if self.turn > 0:
            return logits
        forced = torch.full_like(logits, -1e9)  # (n, V)
        want = self.table[rows, min(int(step), self.table.shape[1] - 1)]  # (n,)
        return forced.scatter(1, want[:, None], 0.0)


@pytest.fixture(scope="module")
def smollm2():
    from minigrpo import load_pretrained

    model, tokenizer = load_pretrained("smollm2", dtype=torch.float32)
    return model.eval(), tokenizer


def test_smollm2_reads_the_calculators_result_and_the_trainer_scores_what_it_sampled(smollm2, cfg):
    """The real model's first turn is forced to the call (2 prompts x 2 episodes); its second turn is
    its own, sampled after the result came back in a user message of <tool_response>. The trainer's
    log-probs of the built rows equal the sampler's on the model's own tokens (fp32, within 1e-4;
    about 2e-5 seen) and are 0 on the environment's."""
    from minigrpo.logprobs import completion_logprobs
    from minigrpo.sampling.kv_sampler import KVCacheSampler

    model, tok = smollm2
    rows = build_dataset(cfg.data)[:2]
    calls = [call_text(r.columns["expression"]) for r in rows]
    forcer = ForceFirstTurn([tok.encode(c, add_special_tokens=False) for c in calls], group_size=2)
    sampler = KVCacheSampler(model, tok, cuda_graphs=False, logits_processor=forcer)
    stops = tuple(cfg.sampler.stop)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=48, stop_ids=tuple(tok.stop_ids), stop_strings=stops)
    env = build_environment(cfg, tok)
    episodes = run_episodes(
        sampler, tok, env, rows, params, max_turns=cfg.env.max_turns, max_episode_tokens=128, key=(3,)
    )  # fmt: skip
    for i, e in enumerate(episodes):
        row = rows[i // 2]
        assert e.turns[0].text == calls[i // 2] and len(e.turns) >= 2 and e.segments[1].owner == ENV
        assert [r.content for r in e.turns[0].tool_results] == [row.answer]
        env_text = tok.decode(e.segments[1].token_ids, skip_special_tokens=False)
        assert env_text == (
            f"<|im_end|>\n<|im_start|>user\n<tool_response>\n{row.answer}\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    rollout = episodes_to_rollout(episodes, tok, pad_id=sampler.pad_id, group_size=2)
    with torch.no_grad():
        logp = completion_logprobs(model, rollout.input_ids(), rollout.attention_mask(), rollout.loss_mask)
    free = rollout.loss_mask.bool() & (rollout.sampler_logp != 0)  # the model's own tokens (forced ones: 0)
    assert free.sum() >= 4 and (rollout.loss_mask.sum(-1) < rollout.completion_mask.sum(-1)).all()
    err = (logp - rollout.sampler_logp)[free].abs().max().item()
    assert err < 1e-4, f"trainer vs sampler log-probs on the second turns: max |diff| {err:.2e}"
    assert (logp[~rollout.loss_mask.bool()] == 0).all()  # the tool result's tokens are never scored


def test_two_grpo_steps_of_the_config_on_smollm2(tmp_path, tok, cfg):
    """The config with the packaged SmolLM2 (not the SFT output) at tiny sizes: two steps run, the
    episodes start from the system prompt naming the tool and the env/* metrics are logged. LoRA
    adapters: a full fine-tuning step of 135M parameters costs tens of seconds on 2 busy CPU cores,
    and the episodes are under test here, not the optimizer."""
    from minigrpo.episode_text import render
    from minigrpo.train import train

    overrides = [
        "model.name_or_path=smollm2",
        "run.device=cpu",
        "run.dtype=float32",
        f"run.output_dir={tmp_path}",
        "lora.enabled=true",
        "data.eval_split=null",
        "grpo.prompts_per_step=2",
        "grpo.group_size=2",
        "sampler.max_new_tokens=8",
        "env.max_episode_tokens=24",
        "train.steps=2",
        "train.micro_batch_size=4",
        "log.plots=false",
        "log.progress=false",
        "log.sample_every=0",
        "checkpoint.every=0",
        "checkpoint.save_final=false",
    ]
    records = train(load_config(CONFIG, overrides))
    system = len(tok.encode(render(tok, [{"role": "system", "content": cfg.env.system_prompt}], None, False)))
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 1.0 <= r["env/turns_mean"] <= 3.0 and 0.0 <= r["env/tool_use_frac"] <= 1.0
        assert r["env/prefill_tokens_mean"] >= system + 20  # the system prompt, then the question
        assert 0 < r["completion_len_mean"] <= 24
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and 0.0 <= r["reward"] <= 2.0
