"""RoPE variants of real checkpoints against transformers (test-only oracle) at the positions they run at:
thousands, not the dozen of the tiny parity models, where a last-bit difference in a frequency becomes a
visible difference in the angle. And config.json layouts that must be refused before any weights load."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from minigrpo.models.args import ModelArgs  # noqa: E402
from minigrpo.models.config_checks import ModelConfigError  # noqa: E402
from minigrpo.models.loading import check_model_source  # noqa: E402
from minigrpo.models.rotary import RotaryAngles  # noqa: E402

# one layer, Dh 128 as in Phi-3.5-mini / Llama / Qwen; the MLP is a stub: only the rotary embedding is compared
SIZES = dict(
    vocab_size=97,
    hidden_size=1024,
    intermediate_size=8,
    num_hidden_layers=1,
    num_attention_heads=8,
    num_key_value_heads=2,
    pad_token_id=0,
)


def _factors(n: int, low: float, high: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [round(low + (high - low) * rng.random(), 4) for _ in range(n)]


def _angles(config: dict, tmp_path, lengths: list[int]):
    """[(ours cos, sin), (transformers' cos, sin)] (1, T, R/2) per length, in increasing order (transformers'
    dynamic RoPE keeps the longest length seen, so it recomputes on every one of them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path)).eval()
    ours = RotaryAngles(ModelArgs.from_hf_config(config))
    ours.reset("cpu")
    out = []
    for T in sorted(lengths):
        pos = torch.arange(T)[None]  # (1, T)
        with torch.no_grad():
            hf_cos, hf_sin = hf.model.rotary_emb(torch.zeros(1, T, 8), pos)  # (1, T, Dh): each angle twice
        cos, sin = ours(pos)  # (1, T, R/2)
        half = cos.shape[-1]
        out.append(((cos, sin), (hf_cos[..., :half], hf_sin[..., :half])))
    return out


LONGROPE = {
    # Phi-3.5-mini: 4096 pretraining positions, short factors up to there, long ones past it
    "phi3.5": dict(model_type="phi3", head_pairs=64, partial_rotary_factor=1.0),
    # Phi-4-mini: 3/4 of each head rotates (48 of 64 pairs)
    "phi4-mini": dict(model_type="phi3", head_pairs=48, partial_rotary_factor=0.75, tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", sorted(LONGROPE))
def test_longrope_angles_equal_transformers_at_thousands_of_positions(case, tmp_path):
    """The LongRoPE frequencies are 1 / (factor_i * theta^(2i/R)), rounded as that product: dividing the
    default frequencies by the factors instead rounded differently, and at 4000 positions (short factors,
    inside a rollout's range) cos differed from transformers' by 1.5e-4 (5.8e-4 at 131072)."""
    spec = dict(LONGROPE[case])
    pairs = spec.pop("head_pairs")
    config = {
        **SIZES,
        **spec,
        "rope_theta": 10000.0,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": _factors(pairs, 1.0, 3.0, seed=1),
            "long_factor": _factors(pairs, 1.0, 40.0, seed=2),
        },
    }
    for (cos, sin), (hf_cos, hf_sin) in _angles(config, tmp_path, [4000, 4096, 4097, 6000]):
        assert cos.shape == hf_cos.shape
        T = cos.shape[1]
        for ours, ref in ((cos, hf_cos), (sin, hf_sin)):
            err = (ours - ref).abs().max().item()
            assert err <= 1e-6, f"{case} T={T}: max |cos/sin diff| {err:.2e}"


@pytest.mark.parametrize("max_pos, factor", [(3000, 1.7), (1000, 3.0)])
def test_dynamic_angles_equal_transformers_past_max_position_embeddings(max_pos, factor, tmp_path):
    """Dynamic NTK's base for L positions past max_position_embeddings is theta * (factor * L / max_pos -
    (factor - 1))^(R / (R - 2)), with factor * L divided by max_pos in that order, in fp32, as transformers
    computes it: factor * (L / max_pos) rounded differently once max_pos is no power of two, and cos differed
    by up to 4.9e-4 (max_pos 3000, factor 1.7)."""
    config = {
        **SIZES,
        "model_type": "llama",
        "rope_theta": 10000.0,
        "max_position_embeddings": max_pos,
        "rope_scaling": {"type": "dynamic", "factor": factor},
    }
    lengths = [max_pos - 7, max_pos, max_pos + 1, 3163, 4021, 5557, 7001, 9377]
    for (cos, sin), (hf_cos, hf_sin) in _angles(config, tmp_path, lengths):
        T = cos.shape[1]
        for ours, ref in ((cos, hf_cos), (sin, hf_sin)):
            err = (ours - ref).abs().max().item()
            assert err <= 1e-6, f"max_pos {max_pos} factor {factor} T={T}: max |cos/sin diff| {err:.2e}"


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_rope_parameters_nested_per_layer_type_are_refused(key, tmp_path):
    """A mapping per layer type (transformers 5's layout for models whose layer types rotate differently) is
    not what these families read: read flat, its yarn type and theta were silently dropped (default RoPE,
    theta 10000). Refused in one line naming config.json and the key, before any weights are looked for."""
    nested = {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}
    config = {**SIZES, "model_type": "qwen2", "use_sliding_window": False, key: nested}
    (tmp_path / "config.json").write_text(json.dumps(config))  # no weights: the config must fail first
    message = rf"^{tmp_path / 'config.json'}: config key '{key}' nests parameters per layer type \('full_attention'\)"
    with pytest.raises(ModelConfigError, match=message):
        check_model_source(str(tmp_path), require_tokenizer=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_handing_on_unsummed_outputs_compute_what_summed_blocks_compute(dtype):
    """hidden() lets each block's MLP output be added by the next block's norm (Block's `carry`):
    the hidden states must equal, bit for bit, those of blocks whose outputs are summed first."""
    from helpers.tiny import tiny_model

    model = tiny_model(seed=3, dtype=dtype, num_hidden_layers=3)
    ids = torch.randint(0, model.args.vocab_size, (2, 9))
    with torch.no_grad():
        got = model.hidden(ids)  # (B, T, D)
        cos, sin = model.rotary(torch.arange(9).expand(2, -1))
        x = model.model.embed_tokens(ids)
        for block in model.model.layers:
            x = block(x, cos, sin, None)
        summed = model.model.norm(x)
        h, m = model.model.layers[0](model.model.embed_tokens(ids), cos, sin, None, carry=True)
    assert got.dtype == dtype and torch.equal(got, summed)
    assert torch.equal(h + m, model.model.layers[0](model.model.embed_tokens(ids), cos, sin, None))


def test_forward_hooks_on_blocks_and_norms_see_what_they_always_saw():
    """Blocks hand their outputs on unsummed only while no hook watches: a forward hook gets a block's
    output as one tensor, a pre-hook on a block or the final norm its input as the whole residual
    stream, and the model computes the same numbers with and without them."""
    from helpers.tiny import tiny_model

    model = tiny_model(seed=4, num_hidden_layers=3)
    ids = torch.randint(0, model.args.vocab_size, (2, 7))
    with torch.no_grad():
        plain = model(ids)
        cos, sin = model.rotary(torch.arange(7).expand(2, -1))
        x, outs = model.model.embed_tokens(ids), []
        for block in model.model.layers:
            x = block(x, cos, sin, None)
            outs.append(x)
        seen = {}
        hooks = [model.model.layers[1].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))]
        hooks.append(model.model.layers[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0])))
        hooks.append(model.model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("norm", a[0])))
        hooked = model(ids)
        for hook in hooks:
            hook.remove()
    assert torch.equal(hooked, plain)
    assert torch.equal(seen["out"], outs[1]) and torch.equal(seen["in"], outs[1]) and torch.equal(seen["norm"], outs[2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attention_mask=torch.ones(2, 5, dtype=torch.long)), r"attention_mask must be \(2, 6\), as input_ids"),
        (dict(attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1]])), r"attention_mask must be \(2, 6\), as input_ids"),
        (dict(attention_mask=torch.ones(6, dtype=torch.long)), r"attention_mask must be \(2, 6\), as input_ids"),
        (dict(position_ids=torch.arange(7)[None]), r"position_ids must be \(2 or 1, 6\), as input_ids"),
        (dict(position_ids=torch.arange(6)), r"position_ids must be \(2 or 1, 6\), as input_ids"),
    ],
)
def test_inputs_of_the_wrong_shape_are_named(kwargs, message):
    """A mask or position ids that do not match input_ids (B, T) is a ValueError naming the argument: a mask
    one column short failed deep inside with "apply_rotary: cos (2, 5, 8) ...", and a one-row mask was
    silently applied to every row (row 0's padding imposed on row 1)."""
    from helpers.tiny import tiny_model

    model = tiny_model(seed=5)
    ids = torch.randint(3, model.args.vocab_size, (2, 6))
    with pytest.raises(ValueError, match=message):
        model(ids, **kwargs)
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\), got shape \(6,\)"):
        model(ids[0])
