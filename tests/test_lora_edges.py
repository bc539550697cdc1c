"""LoRA and NF4 at their edges: targets that match nothing, dropout while a merged copy exists, 4-bit
codes of another layer, and PEFT parity on Qwen3 (q/k norms) with a rank wider than the layers.

PEFT (0.21) and transformers are test-only oracles, as in test_lora_more.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers.tiny import tiny_checkpoint, tiny_model
from test_lora_more import assert_training_step_equals_peft
from torch import nn

from minigrpo import quant
from minigrpo.config import LoRACfg
from minigrpo.errors import UserError
from minigrpo.lora import LoRALinear, adapters_frozen, apply_lora, lora_layers
from minigrpo.models.loading import load_pretrained

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _cpu_nf4() -> bool:
    try:
        quant.require_nf4("cpu")
    except quant.QuantizationUnavailableError:
        return False
    return True


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["q", "lm_head"], r"unknown LoRA target 'lm_head': .*\(lora.targets: adapters go on the blocks' linear"),
        (["embed_tokens"], r"unknown LoRA target 'embed_tokens': .*\(lora.targets: adapters go on the blocks'"),
        (["all-linear"], r"unknown LoRA target 'all-linear': .*\(lora.targets: every linear layer .* the default\)"),
        (["q_proj", "v"], r"unknown LoRA target 'q_proj': .*\(lora.targets: 'q_proj' is written 'q'\)"),
        (["gate_up_proj"], r"unknown LoRA target 'gate_up_proj': .*\(lora.targets: 'gate_up_proj' is written 'gate'\)"),
        (["nothing"], r"unknown LoRA target 'nothing': valid targets are q, k, v, o, gate, up, down \(lora.targets\)$"),
        ([], r"no LoRA targets: name at least one of q, k, v, o, gate, up, down \(lora.targets\)$"),
    ],
    ids=["lm_head", "embed_tokens", "all-linear", "hf-name", "phi3-fused-name", "no-match", "empty"],
)
def test_targets_that_match_nothing_name_lora_targets(targets, message):
    """A target that matches no layer of the blocks is one line naming lora.targets (and, for PEFT's
    module names or the layers that take no adapter, what to write instead); the model is unchanged."""
    model = tiny_model(3)
    with pytest.raises(UserError, match=message) as info:
        apply_lora(model, LoRACfg(targets=targets))
    assert "\n" not in str(info.value)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


@torch.no_grad()
def test_merged_sampling_copy_does_not_skip_dropout_in_training_mode():
    """adapters_frozen(merge=True) ran the merged copy W + s B A for every forward without autograd, also
    in training mode with dropout, so its output (max |diff| 4.0 here) was no longer the layer's own
    (dropout on the adapter's input) and depended on merge=True/False. In training mode the adapter runs
    unmerged, mask for mask as outside; in eval mode the merged copy serves, within bf16 rounding."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 16).bfloat16(), r=4, alpha=8, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    model = nn.Sequential(layer).train()
    x = torch.randn(3, 32).bfloat16()
    torch.manual_seed(1)
    own = model(x)
    for merge in (False, True):
        with adapters_frozen(model, merge=merge):
            torch.manual_seed(1)
            assert torch.equal(model(x), own), merge
    model.eval()
    plain = model(x)
    with adapters_frozen(model, merge=True):
        assert layer.inference_weights() is not None  # the merged copy is used in eval mode
        assert _max_diff(model(x), plain) <= 0.07  # one bf16 rounding of W + s B A (|y| ~ 10)


@pytest.mark.skipif(not _cpu_nf4(), reason="this bitsandbytes has no CPU 4-bit path")
def test_nf4_codes_of_another_shape_are_refused():
    """The 4-bit codes (+ quant state) of a (16, 64) weight loaded silently into a (8, 64) layer, which then
    returned 16 outputs while saying out_features=8. A size mismatch now, as for a dense weight, and the
    layer keeps its own codes."""
    wide = quant.NF4Linear(torch.randn(16, 64))
    layer = quant.NF4Linear(torch.randn(8, 64))
    before = layer.dequantized_weight().clone()
    mismatch = r"size mismatch for weight: 4-bit codes of a \[16, 64\] weight vs \[8, 64\]"
    with pytest.raises(RuntimeError, match=mismatch):
        layer.load_state_dict(wide.state_dict())
    assert torch.equal(layer.dequantized_weight(), before)
    assert layer(torch.randn(2, 64)).shape == (2, 8)
    same = quant.NF4Linear(torch.randn(8, 64))
    same.load_state_dict(layer.state_dict())  # a state of the right shape still loads, bit for bit
    assert torch.equal(same.dequantized_weight(), before)


@pytest.mark.parametrize(("r", "rslora"), [(4, False), (96, True)], ids=["r4", "r96-wider-than-64-rslora"])
def test_qwen3_training_forward_and_gradients_equal_peft(r, rslora, tmp_path):
    """Qwen3 (q/k RMSNorm after the projections, explicit head_dim) with every target, dropout 0.3 in
    training mode, and a rank wider than the 64-wide layers: logits within 1e-5 and A, B gradients within
    1e-6 of PEFT's (observed ~2e-6 and ~3e-8); the init draws the same A as PEFT from the same seed."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ckpt = tiny_checkpoint(tmp_path / "base", seed=3, model_type="qwen3", head_dim=16)
    ours, _ = load_pretrained(ckpt)
    torch.manual_seed(11)
    apply_lora(ours, LoRACfg(r=r, alpha=6, dropout=0.3, rslora=rslora))
    hf = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").float()
    torch.manual_seed(11)
    config = peft.LoraConfig(r=r, lora_alpha=6, lora_dropout=0.3, use_rslora=rslora, target_modules=modules)
    theirs = peft.get_peft_model(hf, config)
    params = dict(theirs.named_parameters())
    layers = lora_layers(ours)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in layers.items():
            assert torch.equal(params[f"base_model.model.{name}.lora_A.default.weight"], layer.lora_A.weight)
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B.weight)
    assert_training_step_equals_peft(ours, theirs, layers)


def test_lora_with_fsdp_is_refused_in_one_wording_as_it_loads_and_at_launch():
    """The refusal had two wordings (one as the config loads, one at launch), and the memory knobs'
    list of what a config breaks held both. One line now, the same wherever it is checked."""
    from minigrpo.build import validate_distributed
    from minigrpo.config import Config, ConfigError, load_config
    from minigrpo.memory_knobs import config_errors

    overrides = ["lora.enabled=true", "distributed.strategy=fsdp"]
    with pytest.raises(ConfigError) as loaded:
        load_config(None, overrides)
    lines = [line for line in str(loaded.value).splitlines() if "lora.enabled" in line]
    assert len(lines) == 1 and "distributed.strategy=fsdp with lora.enabled: LoRA trains with ddp" in lines[0]
    assert lines[0].endswith("use distributed.strategy=auto or ddp")
    cfg = Config.from_dict({"lora": {"enabled": True}, "distributed": {"strategy": "fsdp"}})  # never validated
    with pytest.raises(ConfigError) as launched:
        validate_distributed(cfg, 2)
    assert lines[0].removeprefix("  - ") in str(launched.value).splitlines()[1]
    assert len([e for e in config_errors(cfg, world_size=2) if "lora.enabled" in e]) == 1
