"""PEFT adapter folders whose weights do not fit the base they name: adapters initialized by PiSSA,
OLoRA, CorDA, LoRA-GA or LoftQ were trained on a base PEFT rewrote (W - s * B0 @ A0, or quantized), so
on the original base they give wrong logits; they are refused unless PEFT converted them on save.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.tiny import tiny_checkpoint, tiny_model

from minigrpo.config import LoRACfg
from minigrpo.errors import UserError
from minigrpo.lora import apply_lora, load_peft_adapter, lora_layers, save_peft_adapter
from minigrpo.lora_export import check_peft_adapter

IDS = torch.tensor([[3, 9, 4, 17, 5, 30, 2]])


def _adapter_with_init(tmp_path, init):
    """A plain adapter folder of tiny_model(3) whose adapter_config.json says init_lora_weights=init."""
    model = tiny_model(3)
    apply_lora(model, LoRACfg(r=4, alpha=8))
    adapter = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    return adapter


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "PiSSA", "olora", "corda", "lora_ga", "loftq"])
def test_an_adapter_trained_on_a_modified_base_is_refused(tmp_path, init):
    """These loaded onto the original base without a word before."""
    adapter = _adapter_with_init(tmp_path, init)
    model = tiny_model(3)
    with pytest.raises(UserError, match=rf"adapter_config\.json: init_lora_weights='{init}'") as caught:
        load_peft_adapter(model, adapter)
    assert "\n" not in str(caught.value)
    assert ("path_initial_model_for_weight_conversion" in str(caught.value)) == (init != "loftq")
    assert not lora_layers(model)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", None])
def test_inits_that_leave_the_base_alone_load(tmp_path, init):
    adapter = _adapter_with_init(tmp_path, init)
    assert len(load_peft_adapter(tiny_model(3), adapter)) == 14  # 7 kinds x 2 layers


def test_a_pissa_adapter_saved_by_peft_is_refused_and_its_converted_form_matches_peft(tmp_path):
    """PEFT writes init_lora_weights='pissa' for a PiSSA adapter saved as it is, and True with r and alpha
    doubled when it converts one for the original base. The plain save is refused; the converted one on the
    original base gives the logits of PEFT's model (residual base + trained adapter) within 1e-4."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_checkpoint(tmp_path / "base", seed=3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), config).eval()
    peft_model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial adapter
    peft_model.save_pretrained(str(tmp_path / "init"))
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stands for training
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        want = peft_model(IDS).logits
    peft_model.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(UserError, match=r"plain.adapter_config\.json: init_lora_weights='pissa'"):
        check_peft_adapter(tmp_path / "plain")

    peft_model.save_pretrained(
        str(tmp_path / "converted"), path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    converted = check_peft_adapter(tmp_path / "converted")
    assert (converted["init_lora_weights"], converted["r"]) == (True, 8)
    model = tiny_model(3)
    load_peft_adapter(model, tmp_path / "converted")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS), want, atol=1e-4, rtol=1e-4)
