"""Reward models (minigrpo/models/reward_model.py) on checkpoints the main parity tests do not draw: a
Phi-3 sequence-classification checkpoint whose config.json leaves pad_token_id to the family default.

transformers (test-only oracle) saves and scores each tiny random model; fp32 scores must equal its
scores within 1e-5.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from helpers.tiny import WORDS, tiny_tokenizer  # noqa: E402
from test_reward_model import ATOL, BASE, hf_reward_model  # noqa: E402  (imports transformers' classes safely)

from minigrpo import rewards  # noqa: E402
from minigrpo.errors import UserError  # noqa: E402
from minigrpo.models.reward_model import RewardModelError, load_reward_model, read_reward_config  # noqa: E402

PHI3_VOCAB, PHI3_EOS = 32064, 32000  # Phi-3's vocabulary; 32000 is <|endoftext|>, its default pad_token_id


def _phi3_reward_model(directory, seed: int = 0):
    """A random Phi3ForSequenceClassification saved with save_pretrained, its config.json then without
    pad_token_id (as configs written by hand or by older tools): transformers reads the default, 32000."""
    cfg = transformers.Phi3Config(
        **{**BASE, "vocab_size": PHI3_VOCAB, "pad_token_id": PHI3_EOS, "num_key_value_heads": 4}, num_labels=1
    )
    torch.manual_seed(seed)
    model = transformers.Phi3ForSequenceClassification(cfg).float().eval()
    with torch.no_grad():  # peakier than the default init, so errors show
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    del config["pad_token_id"]
    (directory / "config.json").write_text(json.dumps(config))
    return transformers.AutoModelForSequenceClassification.from_pretrained(directory).float().eval()


def test_phi3_without_pad_token_id_skips_a_trailing_endoftext_as_transformers_does(tmp_path):
    """Phi-3's chat template ends a conversation with <|endoftext|> (32000), its default pad id: transformers
    scores the token before it. The key's absence was read as no pad id, so the score was that of the
    <|endoftext|> position, another number. Padded batches, left and right, filled
    with 32000, must give transformers' score of each row alone (1e-5)."""
    hf = _phi3_reward_model(tmp_path, seed=3)
    assert hf.config.pad_token_id == PHI3_EOS
    assert read_reward_config(json.loads((tmp_path / "config.json").read_text()), "x") == (1, PHI3_EOS)
    ours, _ = load_reward_model(tmp_path)
    assert ours.pad_token_id == PHI3_EOS
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 1000, (n,), generator=g) for n in (9, 6, 3)]
    rows = [torch.cat([r, torch.tensor([PHI3_EOS])]) for r in rows]  # each conversation ends with <|endoftext|>
    with torch.no_grad():
        alone = torch.cat([hf(r[None]).logits for r in rows])  # (3, 1)
        assert (alone[:, 0] - alone[0, 0]).abs().max() > 1e-3
        width = max(len(r) for r in rows)
        for side in ("right", "left"):
            ids = torch.full((len(rows), width), PHI3_EOS)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
                ids[i, cols], mask[i, cols] = r, 1
            got = ours(ids, attention_mask=mask)  # (3, 1)
            assert (got - alone).abs().max().item() < ATOL, side


def test_a_config_without_labels_over_a_one_score_head_names_num_labels(tmp_path):
    """A config.json that names no labels (no num_labels, no id2label: written by hand or by a converter)
    counts 2, transformers' default, so a one-score head does not fit (transformers refuses it too). The
    error was a bare shape mismatch when loading, and "num_labels=2: a reward needs one score" when the
    reward was built, while the head has one score; both now say which key to set, on one line."""
    hf_reward_model(tmp_path, "llama", seed=4, tokenizer=tiny_tokenizer(), vocab_size=len(WORDS))
    config = json.loads((tmp_path / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("num_labels", "id2label", "label2id")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    want = (
        f"{tmp_path}: its score head (score.weight) has 1 row(s) but config.json gives 2 labels "
        "(num_labels, else the length of id2label, else 2): set num_labels to 1 in config.json"
    )
    with pytest.raises(RewardModelError) as info:
        load_reward_model(tmp_path)
    assert str(info.value) == want
    with pytest.raises(RewardModelError) as info:
        rewards.make_reward("reward_model", {"path": str(tmp_path), "device": "cpu"})
    assert str(info.value) == want
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_labels": 1}))
    fn = rewards.make_reward("reward_model", {"path": str(tmp_path), "device": "cpu"})
    assert fn(["repeat 7"], ["7"], [None])[0] is not None


def test_a_null_max_position_embeddings_is_named_when_the_reward_is_built(tmp_path):
    """transformers types max_position_embeddings as an integer in every family and refuses null. It was
    read here as None: building the reward then crashed with a TypeError (None compared with max_length,
    or a row cut to its last None tokens on the first call); it is one line naming the key and file."""
    hf_reward_model(tmp_path, "llama", seed=2, tokenizer=tiny_tokenizer(), vocab_size=len(WORDS))
    config = {**json.loads((tmp_path / "config.json").read_text()), "max_position_embeddings": None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for kwargs in ({"max_length": 16}, {}):
        with pytest.raises(UserError) as info:
            rewards.make_reward("reward_model", {"path": str(tmp_path), "device": "cpu", **kwargs})
        assert str(info.value) == (
            f"{tmp_path}/config.json: config key 'max_position_embeddings' must be a positive integer, got None"
        )
