"""The prompts against the model, before any weights load: a chat template that fails on a prompt,
a prompt that encodes to no token, a data.max_prompt_tokens no prompt meets, and a longest prompt
plus the completion budget past the model's max_position_embeddings are each one `error:` line
naming the prompt, key or limit, from `python -m minigrpo.train` and `python -m minigrpo.eval`."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from helpers.runs import run_config

from minigrpo import build
from minigrpo import eval as evaluation
from minigrpo.config import Config, load_config
from minigrpo.data import Example
from minigrpo.errors import UserError
from minigrpo.prompt_fit import prompts_that_fit


def no_weights(monkeypatch) -> None:
    """Loading a model fails the test: every mistake below must be reported before."""

    def load(*args, **kwargs):
        raise AssertionError("weights were loaded before the mistake was reported")

    monkeypatch.setattr(build, "load_policy", load)
    monkeypatch.setattr(evaluation, "load_pretrained", load)
    monkeypatch.setattr(evaluation, "load_policy", load)


def error_line(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0].removeprefix("error: ")


def train_error(tmp_path, capsys, monkeypatch, **sections) -> str:
    from minigrpo.train import main

    cfg = run_config(tmp_path, **sections)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    no_weights(monkeypatch)
    return error_line(capsys, main, ["--config", str(path)])


def set_template(tmp_path, template: str) -> None:
    run_config(tmp_path)  # writes the tiny model folder
    file = tmp_path / "model" / "tokenizer_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "chat_template": template}))


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{{ raise_exception('roles must alternate') }}", "chat template raised: roles must alternate"),
        ("{{ messages[0].content + 1 }}", "TypeError: can only concatenate str"),
        ("{{ messages[0].nope.deeper }}", "UndefinedError"),
    ],
)
def test_a_chat_template_that_fails_on_a_prompt_names_it(tmp_path, capsys, monkeypatch, template, problem):
    set_template(tmp_path, template)
    message = train_error(tmp_path, capsys, monkeypatch)
    assert re.match(r"the model's chat template fails on the prompt 'repeat \d': ", message), message
    assert problem in message


def test_a_chat_template_that_renders_nothing(tmp_path, capsys, monkeypatch):
    set_template(tmp_path, "{% if false %}x{% endif %}")
    message = train_error(tmp_path, capsys, monkeypatch)
    assert re.fullmatch(r"the model's chat template renders the prompt 'repeat \d' as no text", message), message


def test_an_empty_prompt_names_the_data_file(tmp_path, capsys, monkeypatch):
    data = tmp_path / "empty.jsonl"
    data.write_text(
        json.dumps({"question": "repeat 1", "answer": "1"}) + "\n" + json.dumps({"question": "", "answer": "2"})
    )
    message = train_error(tmp_path, capsys, monkeypatch, data={"path": str(data)})
    assert message == f"the prompt '' is empty (data.path={str(data)!r}): every row needs a prompt"


def test_a_prompt_past_the_models_positions(tmp_path, capsys, monkeypatch):
    data = tmp_path / "long.jsonl"
    rows = [{"question": "repeat 1", "answer": "1"}, {"question": "repeat " + "7 " * 300, "answer": "7"}]  # 301 tokens
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = train_error(tmp_path, capsys, monkeypatch, data={"path": str(data)}, sampler={"max_new_tokens": 6})
    assert message == (
        "the longest prompt alone has 301 tokens, more than the model's max_position_embeddings=256, leaving no "
        "room for its completion (sampler.max_new_tokens=6); set data.max_prompt_tokens=250 or shorten the prompts"
    )  # no completion budget can make room for a prompt longer than the positions: not offered


def test_a_completion_budget_past_the_models_positions(tmp_path, capsys, monkeypatch):
    message = train_error(tmp_path, capsys, monkeypatch, sampler={"max_new_tokens": 256})
    assert message.endswith("max_position_embeddings=256; set sampler.max_new_tokens=254 or less"), message
    assert message.startswith("the longest prompt has 2 tokens and sampler.max_new_tokens=256: 258 positions")


def test_the_fix_offers_what_fits_the_longest_prompt_and_keeps_the_shortest(tmp_path, capsys, monkeypatch):
    """Prompts of 2 and 20 tokens, 250 new tokens, 256 positions: the budget that fits the longest
    prompt is 236, and a cap of 6 tokens keeps the short prompt; with 255 new tokens a cap of 1 would
    keep no prompt, so only the budget is offered."""
    data = tmp_path / "mixed.jsonl"
    rows = [{"question": "repeat 1", "answer": "1"}, {"question": "repeat " + "7 " * 19, "answer": "7"}]  # 2, 20
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = train_error(tmp_path, capsys, monkeypatch, data={"path": str(data)}, sampler={"max_new_tokens": 250})
    assert message.endswith("; set sampler.max_new_tokens=236 or less or set data.max_prompt_tokens=6"), message
    message = train_error(tmp_path, capsys, monkeypatch, data={"path": str(data)}, sampler={"max_new_tokens": 255})
    assert message.endswith("; set sampler.max_new_tokens=236 or less"), message


def test_a_prompt_limit_no_prompt_meets(tmp_path, capsys, monkeypatch):
    message = train_error(tmp_path, capsys, monkeypatch, data={"max_prompt_tokens": 1})
    assert message == "every prompt is longer than data.max_prompt_tokens=1 (the shortest has 2)"


def test_eval_checks_its_completion_budget_before_loading(tmp_path, capsys, monkeypatch):
    cfg = run_config(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    no_weights(monkeypatch)
    argv = ["--checkpoint", str(tmp_path / "model"), "--config", str(path), "--split", "train", "--num", "2"]
    message = error_line(capsys, evaluation.main, [*argv, "--set", "eval.max_new_tokens=1000"])
    assert message.startswith("the longest prompt has 2 tokens and eval.max_new_tokens=1000: 1002 positions")


class Chars:
    """A tokenizer of one token per character, without a chat template."""

    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return list(text)


def test_the_limit_keeps_the_short_prompts():
    examples = [Example(prompt="x" * n, answer="") for n in (3, 9, 5)]
    cfg = Config()
    cfg.data.max_prompt_tokens, cfg.sampler.max_new_tokens = 5, 10
    kept, longest = prompts_that_fit(cfg, examples, Chars(), max_positions=15)
    assert [len(ex.prompt) for ex in kept] == [3, 5] and longest == 5
    with pytest.raises(UserError, match=r"^the longest prompt has 5 tokens and sampler.max_new_tokens=10: 15"):
        prompts_that_fit(cfg, examples, Chars(), max_positions=14)
    assert prompts_that_fit(load_config(None), examples, Chars())[1] == 9  # no limit, positions unknown


def test_a_generous_limit_returns_the_longest_kept_prompt_not_the_limit():
    """The length returned sizes the memory pre-flight (build.py): a cap far above every prompt must
    not stand in for them. Prompts of 3, 9 and 5 tokens under data.max_prompt_tokens=2048 need 9."""

    examples = [Example(prompt="x" * n, answer="") for n in (3, 9, 5)]
    cfg = Config()
    cfg.data.max_prompt_tokens = 2048
    kept, longest = prompts_that_fit(cfg, examples, Chars(), max_positions=4096)
    assert len(kept) == 3 and longest == 9
    cfg.data.max_prompt_tokens = 6  # the 9-token prompt goes: the longest kept has 5
    assert prompts_that_fit(cfg, examples, Chars(), max_positions=4096)[1] == 5


def test_longrope_rollouts_stay_below_the_switch_to_the_long_factors():
    """Past original_max_position_embeddings longrope rotates a whole sequence by its long factors,
    which a sampler's cache (the prompt rotated by the short ones) cannot follow: that length is
    the limit, named in the error. Other scalings, and a switch at the end of the positions, keep
    max_position_embeddings."""
    from minigrpo.models.args import ModelArgs
    from minigrpo.prompt_fit import position_limit

    def args(**extra):
        base = dict(model_type="phi3", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
        return ModelArgs.from_hf_config({**base, **extra})

    longrope = dict(type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8)
    limit = position_limit(args(rope_scaling=longrope, original_max_position_embeddings=16))
    assert limit.positions == 16 and "original_max_position_embeddings=16" in limit.setting
    assert position_limit(args(rope_scaling=longrope, original_max_position_embeddings=64)).positions == 64
    assert position_limit(args()).positions == 64

    class Chars:
        chat_template = None

        def encode(self, text, add_special_tokens=True):
            return list(text)

    cfg = Config()
    cfg.sampler.max_new_tokens = 10
    examples = [Example(prompt="x" * 6, answer="")]
    assert prompts_that_fit(cfg, examples, Chars(), limit)[1] == 6  # 16 positions: at the switch, not past it
    cfg.sampler.max_new_tokens = 11
    with pytest.raises(UserError, match=r"17 positions, more than the model's original_max_position_embeddings=16 "):
        prompts_that_fit(cfg, examples, Chars(), limit)


class ToolChars:  # one token per character; the template writes the tools' names first
    chat_template = "(a template)"

    def apply_chat_template(self, messages, *, add_generation_prompt=False, tokenize=False, tools=None):
        names = "".join(t["function"]["name"] for t in tools or [])
        turns = "".join(f"[{m['role']}]{m['content']}" for m in messages)
        return names + turns + ("[assistant]" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=True):
        return list(text)


def test_a_tool_environment_measures_the_episodes_opening_prompts():
    """With env.kind=tools the rollout's prompts are the episodes' openings: env.system_prompt and the
    tools' definitions (which a Qwen2.5-style template writes into the system turn) count against
    data.max_prompt_tokens and the model's positions, not the data's bare chat prompt."""

    examples = [Example(prompt="x" * n, answer="") for n in (3, 9, 20)]
    cfg = Config()
    cfg.env.kind, cfg.env.tools, cfg.env.system_prompt, cfg.env.max_episode_tokens = "tools", ["calculator"], "S", 50
    cfg.data.max_prompt_tokens = 40  # an opening is len("calculator[system]S[user]") + n + len("[assistant]")
    kept, longest = prompts_that_fit(cfg, examples, ToolChars(), max_positions=90)
    # an opening has 36 + n tokens: the 3-character prompt's 39 is the longest kept (not the cap, 40)
    assert [len(ex.prompt) for ex in kept] == [3] and longest == 39
    cfg.data.max_prompt_tokens = None
    with pytest.raises(UserError, match=r"^the longest prompt has 56 tokens and env.max_episode_tokens=50: 106"):
        prompts_that_fit(cfg, examples, ToolChars(), max_positions=90)


def test_a_tool_environment_measures_its_openings_with_the_template_variables():
    """env.chat_template_kwargs reach the template when the openings are measured, as they do when the
    episodes render them: Qwen3 with enable_thinking false ends its opening in an empty think block."""

    class ThinkChars:  # one token per character; enable_thinking=False adds the empty block
        chat_template = "(a template)"

        def apply_chat_template(self, messages, *, add_generation_prompt=False, tokenize=False, tools=None, **kw):
            turns = "".join(f"[{m['role']}]{m['content']}" for m in messages)
            closing = "<think></think>" if kw.get("enable_thinking", True) is False else ""
            return turns + ("[assistant]" + closing if add_generation_prompt else "")

        def encode(self, text, add_special_tokens=True):
            return list(text)

    from minigrpo.prompt_fit import rollout_prompts

    cfg = Config()
    cfg.env.kind, cfg.env.tools, cfg.env.system_prompt = "tools", ["calculator"], "S"
    cfg.env.chat_template_kwargs = {"enable_thinking": False}
    ids, texts = rollout_prompts(cfg, [Example(prompt="q", answer="")], ThinkChars())
    assert texts == ["[system]S[user]q[assistant]<think></think>"] and len(ids[0]) == len(texts[0])


@pytest.mark.parametrize(
    ("lengths", "evaluating", "message"),
    [
        # every prompt alone past 64 positions: never a negative setting (was "eval.max_new_tokens below -56")
        (
            (120,),
            True,
            "the longest prompt alone has 120 tokens, more than the model's max_position_embeddings=64, leaving no "
            "room for its completion (eval.max_new_tokens=16); every prompt has at least 120 tokens: shorten them "
            "(or use a model with more positions)",
        ),
        (
            (64, 70),
            False,
            "the longest prompt alone has 70 tokens, more than the model's max_position_embeddings=64, leaving no "
            "room for its completion (sampler.max_new_tokens=16); every prompt has at least 64 tokens: shorten them "
            "(or use a model with more positions)",
        ),
        # the 50-token prompt fits beside 14 new tokens, not beside 16: both settings named, each >= 1
        (
            (50, 120),
            False,
            "the longest prompt alone has 120 tokens, more than the model's max_position_embeddings=64, leaving no "
            "room for its completion (sampler.max_new_tokens=16); set data.max_prompt_tokens=50 and set "
            "sampler.max_new_tokens=14 or less, or shorten the prompts",
        ),
        (
            (50, 120),
            True,
            "the longest prompt alone has 120 tokens, more than the model's max_position_embeddings=64, leaving no "
            "room for its completion (eval.max_new_tokens=16); drop the prompts longer than 50 tokens and set "
            "eval.max_new_tokens=14 or less, or shorten the prompts",
        ),
        (
            (10, 64),
            False,
            "the longest prompt alone has 64 tokens, all of the model's max_position_embeddings=64, leaving no room "
            "for its completion (sampler.max_new_tokens=16); set data.max_prompt_tokens=48 or shorten the prompts",
        ),
    ],
)
def test_a_prompt_longer_than_the_positions_alone_is_named_as_such(lengths, evaluating, message):
    examples = [Example(prompt="x" * n, answer="") for n in lengths]
    cfg = load_config(None, ["sampler.max_new_tokens=16"])
    with pytest.raises(UserError) as info:
        prompts_that_fit(cfg, examples, Chars(), max_positions=64, evaluating=evaluating)
    assert str(info.value) == message
    assert not re.search(r"=-\d|below -", message)


def test_an_episode_budget_fix_keeps_a_turn_within_the_episode():
    """env.max_episode_tokens must hold one turn (>= sampler.max_new_tokens): a smaller episode budget
    is offered with the turn lowered too, so the advice passes the config's own rule."""

    examples = [Example(prompt="x" * n, answer="") for n in (3, 20)]  # openings of 39 and 56 tokens
    overrides = ["env.kind=tools", "env.tools=[calculator]", "env.system_prompt=S", "env.max_episode_tokens=50"]
    cfg = load_config(None, [*overrides, "sampler.max_new_tokens=48"])
    with pytest.raises(UserError) as info:
        prompts_that_fit(cfg, examples, ToolChars(), max_positions=90)
    assert str(info.value).endswith(
        "; set env.max_episode_tokens and sampler.max_new_tokens=34 or less or set data.max_prompt_tokens=40"
    ), str(info.value)
    load_config(None, [*overrides, "env.max_episode_tokens=34", "sampler.max_new_tokens=34"])  # the advice is valid
