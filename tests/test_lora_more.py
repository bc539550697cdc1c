"""LoRA against PEFT in training mode, and the states in which adapters must not change silently.

PEFT (0.21) and transformers are test-only oracles: the same A and B in both models, dropout drawing
the same masks from the same seed, give the same logits and gradients, and the same trainable count.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers.tiny import tiny_checkpoint, tiny_model
from torch import nn

from minigrpo.config import LoRACfg
from minigrpo.errors import UserError
from minigrpo.lora import (
    LoRALinear,
    adapters_disabled,
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    unmerge_lora,
)
from minigrpo.models.loading import load_pretrained

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = {
    "llama": ({}, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen2-tied": (dict(model_type="qwen2", tie_word_embeddings=True), ["q_proj", "v_proj", "down_proj"]),
    "phi3": (
        dict(model_type="phi3", original_max_position_embeddings=256, pad_token_id=0),
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    ),
}
SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up"}
SHORT |= {"down_proj": "down", "qkv_proj": "q", "gate_up_proj": "gate"}
IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_training_step_equals_peft(ours, theirs, layers) -> None:
    """Both in train mode, the same dropout draws (the same seed before each forward): logits within
    1e-5, and each adapter's A and B gradients within 1e-6 of PEFT's."""
    params = dict(theirs.named_parameters())
    ours.train(), theirs.train()
    torch.manual_seed(5)
    mine = ours(IDS)
    torch.manual_seed(5)
    want = theirs(IDS).logits
    assert _max_diff(mine, want) < 1e-5
    mine.pow(2).mean().backward()
    want.pow(2).mean().backward()
    for name, layer in layers.items():
        for x in "AB":
            grad = params[f"base_model.model.{name}.lora_{x}.default.weight"].grad
            assert _max_diff(getattr(layer, f"lora_{x}").weight.grad, grad) < 1e-6, (name, x)


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_forward_gradients_and_counts_equal_peft(family, rslora, tmp_path):
    """Every adapted module type (q/k/v/o, gate/up/down, Phi-3's fused qkv / gate_up) with dropout 0.3 in
    train mode: logits within 1e-5 and A, B gradients within 1e-6 of PEFT's (observed ~2e-6 and ~1e-7),
    and the trainable / total parameter counts of PEFT's print_trainable_parameters."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    overrides, modules = FAMILIES[family]
    ckpt = tiny_checkpoint(tmp_path / "base", seed=3, **overrides)
    ours, _ = load_pretrained(ckpt)
    apply_lora(ours, LoRACfg(r=4, alpha=6, dropout=0.3, rslora=rslora, targets=sorted({SHORT[m] for m in modules})))
    hf = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").float()
    config = peft.LoraConfig(r=4, lora_alpha=6, lora_dropout=0.3, use_rslora=rslora, target_modules=modules)
    theirs = peft.get_peft_model(hf, config)
    _randomize_adapters(ours)
    params = dict(theirs.named_parameters())
    layers = lora_layers(ours)
    assert {n.rpartition(".")[2] for n in layers} == set(modules)
    with torch.no_grad():
        for name, layer in layers.items():
            for x in "AB":
                params[f"base_model.model.{name}.lora_{x}.default.weight"].copy_(getattr(layer, f"lora_{x}").weight)

    assert_training_step_equals_peft(ours, theirs, layers)
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert (trainable, sum(p.numel() for p in ours.parameters())) == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(alpha=0.0), r"LoRA alpha=0.0 must be a finite number > 0 \(lora.alpha\)"),
        (dict(alpha=-16.0), r"LoRA alpha=-16.0 must be a finite number > 0 \(lora.alpha\)"),
        (dict(alpha=math.nan), r"LoRA alpha=nan must be a finite number > 0 \(lora.alpha\)"),
        (dict(alpha=math.inf), r"LoRA alpha=inf must be a finite number > 0 \(lora.alpha\)"),
        (dict(r=0), r"LoRA rank r=0 must be an integer >= 1 \(lora.r\)"),
        (dict(r=-2), r"LoRA rank r=-2 must be an integer >= 1 \(lora.r\)"),
        (dict(dropout=1.0), r"LoRA dropout=1.0 must be in \[0, 1\) \(lora.dropout\)"),
        (dict(dropout=-0.1), r"LoRA dropout=-0.1 must be in \[0, 1\) \(lora.dropout\)"),
    ],
    ids=["alpha-0", "alpha-negative", "alpha-nan", "alpha-inf", "r-0", "r-negative", "dropout-1", "dropout-negative"],
)
def test_bad_adapter_settings_are_one_line_naming_the_key(settings, message):
    """alpha = 0 gave adapters that never change the model (scaling 0: zero gradients too) and a negative
    alpha a reversed update, both silently; each bad value names its lora.* key, before the model changes."""
    model = tiny_model(4)
    with pytest.raises(UserError, match=message) as info:
        apply_lora(model, LoRACfg(**settings))
    assert "\n" not in str(info.value)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(UserError, match=message):
        LoRALinear(nn.Linear(8, 8), **{"r": 2, "alpha": 4.0, **settings})


def test_loading_adapter_state_into_merged_adapters_is_refused():
    """Loaded while merged, the old delta stayed inside the base weights and unmerging subtracted the new
    one: the base moved by 0.34 for good. Refused now, and unmerging gives the base back within 1e-6."""
    model = tiny_model(5)
    apply_lora(model, LoRACfg(r=4, alpha=8))
    _randomize_adapters(model)
    base = {n: t.clone() for n, t in model.state_dict().items() if ".lora_" not in n}
    other = {k: 2 * v for k, v in lora_state_dict(model).items()}
    merge_lora(model)
    with pytest.raises(RuntimeError, match=r"merged adapters \(model.layers.0.self_attn.q_proj\): unmerge_lora"):
        load_lora_state_dict(model, other)
    unmerge_lora(model)
    assert max(_max_diff(t, base[n]) for n, t in model.state_dict().items() if n in base) <= 1e-6
    load_lora_state_dict(model, other)  # unmerged: loads
    assert all(torch.equal(t, other[n]) for n, t in lora_state_dict(model).items())


@pytest.mark.parametrize("merge", [merge_lora, merge_and_unload], ids=["merge_lora", "merge_and_unload"])
@torch.no_grad()
def test_merging_inside_adapters_disabled_is_refused(merge):
    """Merged inside adapters_disabled(), the "disabled" model (the reference policy of the KL term)
    computed the adapted one: logits 2.9 away from the base's. Refused, and nothing changes."""
    model = tiny_model(6)
    base = model(IDS)
    apply_lora(model, LoRACfg(r=4, alpha=8))
    _randomize_adapters(model)
    adapted = model(IDS)
    with adapters_disabled(model):
        with pytest.raises(RuntimeError, match=r"inside adapters_disabled\(\): model.layers.0.self_attn.q_proj"):
            merge(model)
        assert torch.equal(model(IDS), base)
    assert not any(layer.merged for layer in lora_layers(model).values())
    assert torch.equal(model(IDS), adapted)


@pytest.mark.parametrize("targets", ["gate", "all-linear"])
def test_targets_given_as_one_string_name_the_key(targets):
    """A string where a list belongs was read letter by letter ("unknown LoRA target 'g'")."""
    model = tiny_model(7)
    with pytest.raises(UserError, match=rf"lora.targets='{targets}' must be a list of short names: some of q, k, v"):
        apply_lora(model, LoRACfg(targets=targets))
    assert not lora_layers(model)
