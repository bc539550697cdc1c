"""Family variants against transformers (test-only oracle) on inputs the per-family parity tests do
not draw: real tokens equal to `pad_token_id` (pad == eos in SmolLM2, Phi-3, many Llama-3 fine-tunes,
where eos closes every chat turn of a prompt)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from test_model_vs_hf import BASE, _write_hf_checkpoint  # noqa: E402

from minigrpo.models.args import ModelArgs, ModelConfigError  # noqa: E402
from minigrpo.models.loading import load_pretrained  # noqa: E402
from minigrpo.models.transformer import Transformer  # noqa: E402

PAD_CASES = {
    # SmolLM2: pad == eos == 2, tied head (the row also gets the head's gradient, in both)
    "llama-tied-pad-eos": dict(model_type="llama", rope_theta=1e5, tie_word_embeddings=True, pad_token_id=2),
    "qwen2-pad": dict(model_type="qwen2", rope_theta=1e6, pad_token_id=5),
    "phi3-pad": dict(model_type="phi3", rope_theta=1e4, pad_token_id=96, num_key_value_heads=4),
    "mistral-negative-pad": dict(model_type="mistral", rope_theta=1e4, sliding_window=5, pad_token_id=-1),
}


def _ids_with_pad_as_a_real_token(pad: int):
    """(ids, mask, position_ids) (3, 10): left padded, with the pad id also at real positions."""
    ids = torch.randint(3, BASE["vocab_size"] - 1, (3, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3], mask[2, :6] = 0, 0
    ids = ids.masked_fill(mask == 0, pad % BASE["vocab_size"])
    ids[0, 2], ids[0, 7], ids[1, 5], ids[2, 8] = (pad % BASE["vocab_size"],) * 4  # real tokens
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("case", sorted(PAD_CASES))
def test_pad_token_row_gets_the_gradient_transformers_gives(case, tmp_path):
    """transformers builds the embedding with padding_idx = pad_token_id: lookups of that row pass no
    gradient. Without it here, the embedding gradient of that row differed by 87 (gradients up to 84)
    on the tied SmolLM2-like case; every parameter's gradient matches to 1e-5 relative."""
    hf = _write_hf_checkpoint(tmp_path, PAD_CASES[case], seed=9)
    ours, _ = load_pretrained(tmp_path, dtype=torch.float32)
    ids, mask, pos = _ids_with_pad_as_a_real_token(PAD_CASES[case]["pad_token_id"])
    weights = torch.randn(*ids.shape, BASE["vocab_size"], generator=torch.Generator().manual_seed(0))
    real = mask.bool().unsqueeze(-1).expand_as(weights)
    ((ours(ids, attention_mask=mask) * weights)[real].sum()).backward()
    ((hf(ids, attention_mask=mask, position_ids=pos).logits * weights)[real].sum()).backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = theirs[name].grad
        err = (p.grad - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"{case} {name}: max |diff| {err:.2e}"


def test_pad_token_id_is_read_with_the_family_default():
    """Phi-3 pads with 32000 when config.json names none (transformers' default); an id outside the
    vocabulary leaves every row trainable; a pad id that is no integer is refused naming the key."""
    phi3 = ModelArgs.from_hf_config({**BASE, "model_type": "phi3", "pad_token_id": None} | {"vocab_size": 32064})
    assert phi3.pad_token_id is None
    cfg = {k: v for k, v in BASE.items() if k != "pad_token_id"}
    big = ModelArgs.from_hf_config({**cfg, "model_type": "phi3", "vocab_size": 32064})
    assert (big.pad_token_id, big.embedding_padding_idx) == (32000, 32000)
    small = ModelArgs.from_hf_config({**cfg, "model_type": "phi3"})  # 97 tokens: 32000 lies outside
    assert (small.pad_token_id, small.embedding_padding_idx) == (32000, None)
    assert Transformer(small).model.embed_tokens.padding_idx is None
    assert ModelArgs.from_hf_config({**cfg, "model_type": "llama"}).embedding_padding_idx is None
    with pytest.raises(ModelConfigError, match=r"^config key 'pad_token_id' must be an integer or null, got '0'$"):
        ModelArgs.from_hf_config({**BASE, "model_type": "llama", "pad_token_id": "0"})
