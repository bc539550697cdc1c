"""Multi-turn episodes in the GRPO loop (env: section): config mistakes are one CLI line before any
weights load; a short run with env.kind=tools logs the env/* metrics; and a tiny model learns to
earn a reward that only a tool can give (the answer is a secret that only `lookup` returns).

The tiny model speaks a word-level vocabulary with a small chat template; this module also holds the
user environment (`test_env_loop:SecretEnv`) and reward the runs import by name (tests/ is on the
path in-process and in the CLI's subprocess)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from helpers.cli import one_error_line, train_cli
from helpers.runs import launch
from helpers.tiny import tiny_model

from minigrpo.config import ConfigError, load_config
from minigrpo.models.loading import save_pretrained
from minigrpo.tools import ToolCall, ToolResult

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "tool", "system"]
WORDS += ["what", "is", "the", "secret", "?", "lookup", *"0123456789"]
TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}"
    "{%- for tc in m.tool_calls or [] %} {{ tc.function.name }}{% endfor %}<|im_end|> {% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def chat_tokenizer():
    """Word-level, digits one by one, <|im_end|> a stop token, and the template above."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from minigrpo.tokenizer import Tokenizer

    backend = Backend(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return Tokenizer(
        backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=TEMPLATE,
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        extra_stop_ids=[WORDS.index("<|im_end|>")],
    )


# ----------------------------------------------------------------------------- the secret task


class SecretEnv:
    """The model may answer `lookup` (its whole turn): the result is the row's secret, which appears
    nowhere else; any other turn is the final answer. Records the call like ToolEnvironment."""

    def __init__(self, system_prompt: str | None = None, greeting: str = "") -> None:
        self.greeting = greeting

    def reset(self, row) -> list[dict]:
        return [{"role": "user", "content": f"{self.greeting}{row.prompt}"}]

    def step(self, episode, text: str) -> tuple[list[dict], bool]:
        if text.strip() != "lookup":
            return [], True
        turn = episode.turns[-1]
        turn.tool_calls = [ToolCall("lookup", {}, text)]
        turn.tool_results = [ToolResult(str(episode.row.answer), True, None, "lookup")]
        return [{"role": "tool", "content": str(episode.row.answer), "name": "lookup"}], False


class NoStepEnv:
    """Resets but cannot step: no environment (checked on the class, before any weights load)."""

    def reset(self, row) -> list[dict]:
        return [{"role": "user", "content": str(row.prompt)}]


def secret_reward(prompts, completions, answers, tool_results, **_):
    """1 when the final answer is the secret and a lookup returned it, else 0 (a lucky guess earns nothing)."""
    return [
        float(c.strip() == a and any(r.content == a for r in rs))
        for c, a, rs in zip(completions, answers, tool_results)
    ]


def shout(text: str) -> str:
    """Say it louder.

    Args:
        text: what to say
    """
    return text.upper()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The tiny chat model folder and the secret task ('what is the secret ?' -> a digit)."""
    root = tmp_path_factory.mktemp("env")
    model = tiny_model(seed=0, vocab_size=len(WORDS))
    save_pretrained(model, chat_tokenizer(), root / "model")
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(200):
            f.write(json.dumps({"question": "what is the secret ?", "answer": str(rng.randrange(10))}) + "\n")
    return root


def env_config(root: Path, name: str, **sections) -> dict:
    cfg = {
        "run": {"name": name, "output_dir": str(root / "runs"), "seed": 0, "device": "cpu"},
        "model": {"name_or_path": str(root / "model")},
        "data": {"source": "jsonl", "path": str(root / "train.jsonl"), "eval_split": None},
        "sampler": {"temperature": 1.0, "max_new_tokens": 3},
        "grpo": {"prompts_per_step": 4, "group_size": 4},
        "rewards": [{"name": "exact_answer"}],
        "train": {"steps": 2, "lr": 0.001, "micro_batch_size": 16},
        "log": {"plots": False, "progress": False, "sample_every": 1},
        "checkpoint": {"every": 0, "save_final": False},
        "env": {"kind": "tools", "tools": ["calculator", "test_env_loop:shout"], "max_turns": 3},
    }
    for key, values in sections.items():
        cfg[key] = {**cfg.get(key, {}), **values} if isinstance(values, dict) else values
    return cfg


# ----------------------------------------------------------------------------- config


def test_env_section_defaults_and_derived_budget():
    cfg = load_config(None, ["env.kind=gsm8k_tools", "env.max_turns=3", "sampler.max_new_tokens=100"])
    assert cfg.env.max_episode_tokens == 300
    assert load_config(None, ["env.max_episode_tokens=123"]).env.max_episode_tokens == 123
    assert load_config(None).env.kind is None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"kind": "tool"}, "env.kind='tool' is neither tools, gsm8k_tools nor 'package.module:Class' (did you mean"),
        ({"max_turn": 2}, "unknown config key 'env.max_turn' (did you mean 'env.max_turns'?)"),
        ({"max_turns": 0}, "env.max_turns must be >= 1, got 0"),
        ({"tools": ["calculater"]}, "env.tools.0='calculater' is neither a built-in tool"),
        ({"kind": None, "tools": ["python"]}, "env.tools=['python'] is read only with env.kind set"),
        ({"tools": []}, "env.kind=tools needs env.tools"),
        ({"sandbox": {"timeout_s": 0}}, "env.sandbox.timeout_s must be > 0"),
        ({"max_episode_tokens": 2}, "env.max_episode_tokens (2) must be >= sampler.max_new_tokens (3)"),
        ({"tools": ["test_env_loop:nothing"]}, "env.tools.0='test_env_loop:nothing': 'test_env_loop' has no 'nothing'"),
        ({"tools": ["no_such_mod:f"]}, "env.tools.0='no_such_mod:f': cannot import 'no_such_mod'"),
        ({"kind": "test_env_loop:SecretEnv", "kwargs": {"colour": 1}}, "cannot be built with env.kwargs={'colour': 1}"),
        (
            {"format": "hermez"},
            "env.format='hermez' is no tool-call format; known: hermes, llama3, mistral (did you mean",
        ),
        ({"kind": "test_env_loop:NoStepEnv", "tools": []}, "the class NoStepEnv has no step()"),
    ],
)
def test_env_mistakes_are_one_line_before_loading(workspace, tmp_path, env, expected):
    """Through the CLI: exit status 2, one error line; the model folder is never read (it is broken)."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (workspace / "model").iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    cfg = env_config(workspace, "bad", env=env, model={"name_or_path": str(broken)})
    cfg["run"]["output_dir"] = str(tmp_path / "runs")
    message = one_error_line(train_cli(tmp_path, cfg))
    assert expected in message, message


def test_a_model_without_chat_template_is_named_before_loading(tmp_path, monkeypatch):
    """The episodes are conversations: a model folder whose tokenizer has no chat template is refused
    from its tokenizer files, before any weights load (not by build_environment after)."""
    from helpers.tiny import tiny_run_checkpoint

    from minigrpo.build import check_before_loading

    folder = tiny_run_checkpoint(tmp_path / "plain")  # a word-level tokenizer without a chat template
    settings = [f"run.output_dir={tmp_path / 'runs'}", f"model.name_or_path={folder}", "run.device=cpu"]
    cfg = load_config(None, [*settings, "env.kind=tools", "env.tools=[calculator]"])
    monkeypatch.setattr("minigrpo.models.loading._fill", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ConfigError, match=r"env.kind='tools' needs a chat template .* the model has none"):
        check_before_loading(cfg)


# ----------------------------------------------------------------------------- the loop


def test_two_steps_with_tools_log_env_metrics(workspace):
    records = launch(workspace, env_config(workspace, "two_steps"))
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 1.0 <= r["env/turns_mean"] <= 3.0
        assert 0.0 <= r["env/tool_use_frac"] <= 1.0 and 0.0 <= r["env/done_frac"] <= 1.0
        assert r["env/tool_calls_mean"] >= r["env/tool_use_frac"]  # a user of tools made >= 1 call
        assert r["env/tool_failures_mean"] <= r["env/tool_calls_mean"]
        assert r["env/prefill_tokens_mean"] >= 10 and r["env/reused_tokens_mean"] >= 0  # a prompt at least
        assert any(k.startswith("env/reward_turns_") for k in r)
        assert all(int(k.rsplit("_", 1)[1]) in (1, 2, 3) for k in r if k.startswith("env/reward_turns_"))
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
    assert any(r["grad_norm"] > 0 for r in records), "no step trained"


def test_a_tiny_model_learns_to_earn_a_tool_only_reward(workspace):
    """Turn 1: `lookup` (a stop string) or a guess; turn 2 reads the secret. Untrained, about 1 in 22 (the vocabulary)
    episodes looks it up; after training nearly all do, and nearly all answer the secret."""
    cfg = env_config(
        workspace,
        "secret",
        sampler={"max_new_tokens": 1, "stop": ["lookup"]},
        grpo={"prompts_per_step": 16, "group_size": 16},
        rewards=[{"name": "test_env_loop:secret_reward"}],
        train={"steps": 50, "lr": 0.003, "micro_batch_size": 256},
        log={"sample_every": 0},
        env={"kind": "test_env_loop:SecretEnv", "tools": [], "max_turns": 2, "max_episode_tokens": 16},
    )
    records = launch(workspace, cfg)
    use = [r["env/tool_use_frac"] for r in records]
    reward = [r["reward"] for r in records]
    first, last = sum(use[:3]) / 3, sum(use[-5:]) / 5
    assert first <= 0.2 and sum(reward[:3]) / 3 <= 0.15, (use[:5], reward[:5])
    assert last >= 0.95, [round(u, 2) for u in use]
    assert sum(reward[-5:]) / 5 >= 0.85, [round(x, 2) for x in reward]
    assert records[-1].get("env/reward_turns_2", 0) >= 0.85


@pytest.mark.parametrize(
    ("algorithm", "sections"),
    [
        ("online_dpo", {"dpo": {"pairs": "all"}}),
        (
            "ppo",
            {"grpo": {"prompts_per_step": 8, "group_size": 1}, "ppo": {"epochs": 2}, "train": {"micro_batch_size": 8}},
        ),
    ],
)
def test_other_algorithms_train_on_episode_rows(workspace, algorithm, sections):
    """Online DPO and PPO take the same multi-turn rows as GRPO (loss on the model's tokens only)."""
    cfg = env_config(
        workspace, f"episodes_{algorithm}", algorithm=algorithm, rewards=[{"name": "proximity"}], **sections
    )
    records = launch(workspace, cfg)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 1.0 <= r["env/turns_mean"] <= 3.0 and math.isfinite(r["loss"])
    key = "dpo/pairs" if algorithm == "online_dpo" else "ppo/explained_variance"
    assert all(key in r for r in records), sorted(records[0])
    assert any(r["grad_norm"] > 0 for r in records), "no step trained"


def test_reward_per_turn_count_covers_the_counts_episodes_had():
    """env/reward_turns_k for each turn count some episode had (NaN rewards left out), whatever
    env.max_turns allows: the metrics once looped over every count up to it, every step."""
    from types import SimpleNamespace

    import torch

    from minigrpo.distributed import World
    from minigrpo.step import episode_metrics

    def episode(turns):
        return SimpleNamespace(turns=[0] * turns, tool_calls=[], tool_results=[], done=True, segments=[])

    episodes = [episode(1), episode(3), episode(3), episode(7)]
    out = episode_metrics(World(), episodes, torch.tensor([0.5, 1.0, 0.0, float("nan")]))
    per_turns = {k: v for k, v in out.items() if k.startswith("env/reward_turns_")}
    assert per_turns == {"env/reward_turns_1": 0.5, "env/reward_turns_3": 0.5}
    assert out["env/turns_mean"] == (1 + 3 + 3 + 7) / 4
