"""Parity with transformers (test-only oracle): tiny random checkpoints of every supported family.

Each case writes a config.json by hand (old `rope_theta`/`rope_scaling` keys for some cases, the
recent `rope_parameters` for others), lets transformers build and randomise the model from it,
saves the weights, loads them with minigrpo and compares fp32 logits on a plain and a left-padded
batch. Then minigrpo's save_pretrained output must load back into transformers with equal logits.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from minigrpo.models.loading import load_pretrained, save_pretrained  # noqa: E402

ATOL = 1e-4  # acceptance bound; observed differences are ~1e-6
BASE = dict(
    hidden_act="silu",
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
LONGROPE = dict(
    type="longrope",  # old key name on purpose
    short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],  # R/2 = 8 entries (Dh 16)
    long_factor=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
)
CASES = {
    "llama": dict(model_type="llama", rope_theta=10000.0, tie_word_embeddings=False),
    "llama-bias": dict(model_type="llama", rope_theta=10000.0, attention_bias=True, mlp_bias=True),
    "llama3-rope": dict(
        model_type="llama",
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    # transformers' "swish" is the same SiLU (once refused as an unsupported activation)
    "llama-swish": dict(model_type="llama", rope_theta=10000.0, hidden_act="swish"),
    "llama-linear": dict(model_type="llama", rope_theta=10000.0, rope_scaling=dict(type="linear", factor=2.0)),
    # a head_dim other than hidden_size / num_attention_heads (q/o projections of H * Dh = 128 channels)
    "mistral-head-dim": dict(model_type="mistral", rope_theta=10000.0, head_dim=32, sliding_window=None),
    "qwen2-llama3-rope": dict(
        model_type="qwen2",
        rope_theta=5e5,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
    ),
    "smollm-tied": dict(model_type="llama", rope_theta=100000.0, tie_word_embeddings=True),
    "mistral-window": dict(model_type="mistral", rope_theta=10000.0, sliding_window=5),
    "qwen2": dict(model_type="qwen2", rope_theta=1e6, tie_word_embeddings=True),
    "qwen2-window": dict(
        model_type="qwen2", rope_theta=1e6, use_sliding_window=True, sliding_window=4, max_window_layers=1
    ),
    "qwen2-yarn": dict(
        model_type="qwen2",
        rope_theta=1e6,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16),
    ),
    # a null factor is max_position_embeddings / original (transformers warns and computes it)
    "qwen2-yarn-null-factor": dict(
        model_type="qwen2",
        rope_theta=1e6,
        max_position_embeddings=64,
        rope_scaling=dict(type="yarn", factor=None, original_max_position_embeddings=16),
    ),
    "qwen3": dict(model_type="qwen3", rope_theta=1e6, head_dim=24, tie_word_embeddings=True),
    # Qwen2.5 / R1-Distill: a window and max_window_layers written, but off (use_sliding_window false)
    "qwen2-window-off": dict(
        model_type="qwen2", rope_theta=1e4, use_sliding_window=False, sliding_window=4, max_window_layers=1
    ),
    # Phi-3-mini-4k: every layer windowed (2047 there), no rope scaling
    "phi3-window": dict(
        model_type="phi3", rope_theta=1e4, rope_scaling=None, sliding_window=4, original_max_position_embeddings=64
    ),
    # dynamic NTK: the 12-token forwards pass max_position_embeddings (8), the 6-token one does not
    "llama-dynamic": dict(model_type="llama", max_position_embeddings=8, rope_scaling=dict(type="dynamic", factor=1.7)),
    "qwen2-dynamic": dict(
        model_type="qwen2",
        max_position_embeddings=8,
        rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=3.0),
    ),
    # only Phi-3 rotates part of a head: transformers' Qwen2 (Llama, Mistral, Qwen3) rotates all of it
    "qwen2-partial-ignored": dict(model_type="qwen2", rope_theta=1e4, partial_rotary_factor=0.5),
    "phi3": dict(
        model_type="phi3",
        rope_theta=10000.0,
        max_position_embeddings=64,
        original_max_position_embeddings=8,
        rope_scaling=LONGROPE,
        num_key_value_heads=4,
    ),
    "phi4-mini": dict(
        model_type="phi3",
        rope_theta=10000.0,
        partial_rotary_factor=0.75,
        max_position_embeddings=64,
        original_max_position_embeddings=8,
        rope_scaling={
            **LONGROPE,
            "short_factor": LONGROPE["short_factor"][:6],
            "long_factor": [1, 2, 3, 4, 5, 6],
        },
        tie_word_embeddings=True,
    ),
}


def _write_hf_checkpoint(directory, overrides: dict, seed: int):
    """config.json as written above + random weights saved by transformers' own classes."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**BASE, **overrides}
    (directory / "config.json").write_text(json.dumps(cfg))
    hf_cfg = AutoConfig.from_pretrained(directory)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():  # peakier than the default init, so errors show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    state = {k: v for k, v in model.state_dict().items() if not (hf_cfg.tie_word_embeddings and k == "lm_head.weight")}
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return model


def _batches(vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    lengths = torch.tensor([12, 9, 5])
    mask = (torch.arange(12)[None, :] >= (12 - lengths)[:, None]).long()  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


def _compare(ours, hf, vocab: int, seed: int):
    ids, mask, pos = _batches(vocab, seed)
    with torch.no_grad():
        plain_ours = ours(ids[:1])
        plain_hf = hf(ids[:1]).logits
        short_ours, short_hf = ours(ids[:1, :6]), hf(ids[:1, :6]).logits  # below longrope's switch
        pad_ours = ours(ids, attention_mask=mask)
        pad_hf = hf(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    return {
        "plain": (plain_ours - plain_hf).abs().max().item(),
        "short": (short_ours - short_hf).abs().max().item(),
        "padded": (pad_ours[real] - pad_hf[real]).abs().max().item(),
        "scale": plain_hf.abs().max().item(),
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf = _write_hf_checkpoint(tmp_path, CASES[case], seed=hash(case) % 1000)
    ours, tok = load_pretrained(tmp_path, dtype=torch.float32)
    assert tok is None  # no tokenizer files in this checkpoint
    diffs = _compare(ours.eval(), hf, BASE["vocab_size"], seed=len(case))
    assert diffs["scale"] > 1.0, "logits too flat to test anything"
    for kind in ("plain", "short", "padded"):
        assert diffs[kind] < ATOL, f"{case} {kind}: max |diff| {diffs[kind]:.2e} (logits up to {diffs['scale']:.1f})"


@pytest.mark.parametrize("case", ["llama-bias", "qwen3", "phi4-mini", "mistral-window", "smollm-tied", "qwen2-yarn"])
def test_gradients_match_transformers(case, tmp_path):
    """d(loss)/d(every parameter) on a left-padded batch, loss a fixed random projection of the real
    positions' logits: the backward of every family difference (fused projections, q/k norms, tied
    head, window, scaled RoPE, the rotation of padded rows) against transformers'."""
    hf = _write_hf_checkpoint(tmp_path, CASES[case], seed=5)
    ours, _ = load_pretrained(tmp_path, dtype=torch.float32)
    ids, mask, pos = _batches(BASE["vocab_size"], seed=11)
    weights = torch.randn(*ids.shape, BASE["vocab_size"], generator=torch.Generator().manual_seed(0))
    real = mask.bool().unsqueeze(-1)
    ((ours(ids, attention_mask=mask) * weights)[real.expand_as(weights)].sum()).backward()
    ((hf(ids, attention_mask=mask, position_ids=pos).logits * weights)[real.expand_as(weights)].sum()).backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        g, ref = p.grad, theirs[name].grad
        err = (g - ref).abs().max().item()
        assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"{case} {name}: max |diff| {err:.2e}"


def test_longrope_rows_padded_past_their_length_keep_the_short_factors(tmp_path):
    """Rows padded on both sides to more columns than the pretraining length (8) while every row
    is shorter: each row is rotated with the short factors, as alone (and as transformers with
    positions counting real tokens), not switched to the long ones by the padded width."""
    hf = _write_hf_checkpoint(tmp_path, CASES["phi3"], seed=2)
    ours, _ = load_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(3, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(2, 12, dtype=torch.long)
    mask[0, 2:9], mask[1, 5:11] = 1, 1  # 7 and 6 real tokens
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = ours(ids, attention_mask=mask)
        reference = hf(ids, attention_mask=mask, position_ids=pos).logits
        alone = ours(ids[:1, 2:9])
    real = mask.bool()
    assert (batch[real] - reference[real]).abs().max().item() < ATOL
    assert (batch[0, 2:9] - alone[0]).abs().max().item() < ATOL


@pytest.mark.parametrize("case", ["llama", "qwen3", "phi4-mini", "smollm-tied"])
def test_saved_checkpoint_loads_in_transformers(case, tmp_path):
    from transformers import AutoModelForCausalLM

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _write_hf_checkpoint(src, CASES[case], seed=7)
    ours, _ = load_pretrained(src)
    save_pretrained(ours, None, dst)
    hf = AutoModelForCausalLM.from_pretrained(dst, attn_implementation="eager").float().eval()
    diffs = _compare(ours.eval(), hf, BASE["vocab_size"], seed=3)
    for kind in ("plain", "padded"):
        assert diffs[kind] < ATOL, f"{case} {kind}: {diffs[kind]:.2e}"
    # and the round trip through our own loader is exact
    again, _ = load_pretrained(dst)
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_sharded_checkpoint_round_trip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write_hf_checkpoint(src, CASES["qwen2"], seed=1)
    ours, _ = load_pretrained(src)
    save_pretrained(ours, None, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again, _ = load_pretrained(tmp_path / "sharded")
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert torch.equal(ours(ids), again(ids))


# Keys left out of config.json (or that a family ignores): each must read as transformers reads it
# for that family, not as one default for all. 30 layers, so Qwen's default max_window_layers (28) shows.
OMITTED = {
    "mistral": dict(model_type="mistral"),  # 8 kv heads, a 4096-token window, 131072 positions
    "qwen2-window": dict(model_type="qwen2", use_sliding_window=True),  # window 4096 from layer 28 on
    "qwen2-mlp-bias": dict(model_type="qwen2", mlp_bias=True),  # a Llama key: Qwen2's MLP has no bias
    "llama-yarn": dict(model_type="llama", rope_scaling=dict(type="yarn", factor=4.0)),  # 2048 positions
    "phi3-longrope": dict(  # rms_norm_eps 1e-5; the top-level original length (default 4096) wins
        model_type="phi3", rope_scaling={**LONGROPE, "original_max_position_embeddings": 16}
    ),
}


@pytest.mark.parametrize("case", sorted(OMITTED))
def test_omitted_config_keys_take_the_family_defaults(case, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from minigrpo.models.args import ModelArgs
    from minigrpo.models.rotary import RotaryAngles

    # 32 heads: Qwen's default num_key_value_heads, a multiple of Mistral's (8); Dh 16 as LONGROPE needs
    sizes = dict(vocab_size=97, hidden_size=512, intermediate_size=8, num_hidden_layers=30, num_attention_heads=32)
    cfg = {**sizes, "pad_token_id": 0, **OMITTED[case]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf_cfg = AutoConfig.from_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_config(hf_cfg)
    args = ModelArgs.from_hf_config(cfg)
    rotary = RotaryAngles(args)
    rotary.reset("cpu")

    types = getattr(hf_cfg, "layer_types", None) or ["sliding_attention"] * hf_cfg.num_hidden_layers
    window = getattr(hf_cfg, "sliding_window", None)  # Llama has none
    windows = tuple(window if t == "sliding_attention" else None for t in types)
    block = hf.model.layers[0]
    assert args.n_kv_heads == hf_cfg.num_key_value_heads
    assert args.norm_eps == hf_cfg.rms_norm_eps
    assert args.max_position_embeddings == hf_cfg.max_position_embeddings
    assert args.layer_windows == windows
    assert args.mlp_bias == (block.mlp.down_proj.bias is not None)
    assert rotary.scale == pytest.approx(hf.model.rotary_emb.attention_scaling)
    torch.testing.assert_close(rotary.inv_freq, hf.model.rotary_emb.inv_freq)
    if args.rope_type == "longrope":  # where the long factors take over
        assert rotary.long_threshold == hf_cfg.rope_parameters["original_max_position_embeddings"]
