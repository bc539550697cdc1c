"""Reward models and the PPO critic built from one, against transformers' *ForSequenceClassification on
inputs the main parity tests do not draw: rows made only of pad-id tokens, chat templates that refuse a
conversation, settings of the wrong type, a 16-bit critic body over an fp32 score head.

transformers (test-only oracle) saves and scores each tiny random model; fp32 scores must equal its
scores within 1e-5.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from helpers.tiny import WORDS  # noqa: E402
from test_reward_model import (  # noqa: E402  (imports transformers' classes safely)
    ATOL,
    COMPLETIONS,
    PROMPTS,
    _templated_tokenizer,
    hf_reward_model,
)

from minigrpo import config, rewards  # noqa: E402
from minigrpo.models.reward_model import load_reward_model  # noqa: E402
from minigrpo.reward_fns import RewardError  # noqa: E402

EOS = 2  # pad_token_id == eos_token_id, as many reward models set it


def test_a_row_of_pad_ids_is_read_at_its_first_real_token(tmp_path):
    """pad == eos and rows whose every real token is eos, left-padded with another id (0): transformers
    reads such a row, alone, at column 0 (its first token). The padded row was read at column 0 of the
    batch, a padding column: 1.29 and 0.94 instead of 1.98. Each row must score as alone (1e-5)."""
    hf = hf_reward_model(tmp_path, "qwen2", seed=2, pad_token_id=EOS, eos_token_id=EOS)
    ours, _ = load_reward_model(tmp_path)
    rows = [torch.tensor([5, 6, 7, EOS]), torch.tensor([EOS, EOS]), torch.tensor([EOS])]
    ids = torch.zeros(3, 4, dtype=torch.long)  # (3, 4) left-padded with id 0
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, 4 - len(row) :], mask[i, 4 - len(row) :] = row, 1
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)  # (3, 1)
        alone = torch.cat([hf(row[None]).logits for row in rows])  # (3, 1)
    assert (alone[0] - alone[1]).abs().item() > 0.1, "scores too flat to test anything"
    assert (got - alone).abs().max().item() < ATOL


SYSTEMLESS = (  # a template that refuses system messages, as some families' templates do
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ? {% endfor %}"
)


def test_a_chat_template_that_refuses_the_conversation_stops_the_run(tmp_path):
    """data.system_prompt with a reward model whose template refuses system messages: every row of every
    step raised, each was retried alone and masked (all NaN, no reward at all, the run going on). It must
    stop the run on one line naming the reward, the template's message and the setting to change."""
    hf_reward_model(tmp_path / "rm", "llama", seed=7, tokenizer=_templated_tokenizer(SYSTEMLESS), vocab_size=len(WORDS))
    spec = config.RewardSpec("reward_model", kwargs={"path": str(tmp_path / "rm"), "device": "cpu"})
    specs = rewards.build_reward_specs([spec])
    messages = [[{"role": "system", "content": "repeat"}, {"role": "user", "content": p}] for p in PROMPTS]
    with pytest.raises(RewardError, match=r"reward_model.*System role not supported.*chat_template: none") as info:
        rewards.score(PROMPTS, COMPLETIONS, ["5"] * 5, specs, columns={"prompt_messages": messages})
    assert "\n" not in str(info.value)
    scored = rewards.score(PROMPTS, COMPLETIONS, ["5"] * 5, specs)  # without the system message it renders
    assert scored.failures["reward_model"] == 0 and torch.isfinite(scored.per_fn).all()


@pytest.mark.parametrize("dtype", [["bfloat16"], {"float32": 1}, 16])
def test_a_dtype_of_another_type_is_a_one_line_error(dtype):
    """dtype: [bfloat16] in YAML (a list) crashed with TypeError: unhashable type, a traceback."""
    with pytest.raises(RewardError, match=r"kwargs dtype=.* must be 'auto' or one of float32"):
        rewards.make_reward("reward_model", {"path": "x", "dtype": dtype})


def test_a_critic_from_a_reward_model_keeps_its_fp32_head_in_a_bf16_body(tmp_path):
    """ppo.value_path naming an fp32 reward model, the critic in bfloat16: the value head is fp32, so it
    must be the stored score head exactly; it was rounded through bfloat16 first (8e-4 off)."""
    from minigrpo.algorithms.value_model import load_value_body

    hf = hf_reward_model(tmp_path, "llama", seed=3)
    body, head = load_value_body(str(tmp_path), dtype=torch.bfloat16, device=torch.device("cpu"))
    assert body.model.embed_tokens.weight.dtype == torch.bfloat16 and head.weight.dtype == torch.float32
    assert torch.equal(head.weight, hf.score.weight.detach())
