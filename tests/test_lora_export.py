"""LoRA adapter files and exports on inputs beyond the round trips of test_lora.py: adapter folders
other tools write (null patterns), folders that cannot work (no weights, merged adapters), the
mode new adapters run in, and the precision the GGUF export loads a checkpoint in.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.tiny import tiny_checkpoint, tiny_model
from safetensors.torch import save_file

from minigrpo import export
from minigrpo.config import LoRACfg
from minigrpo.errors import UserError
from minigrpo.lora import apply_lora, load_peft_adapter, lora_layers, merge_lora, save_peft_adapter

IDS = torch.tensor([[3, 9, 4, 17, 5, 30, 2]])


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))


def _adapter(tmp_path, **lora):
    model = tiny_model(3)
    apply_lora(model, LoRACfg(**{"r": 4, "alpha": 8, **lora}))
    _randomize(model)
    return model, save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")


def test_adapters_added_to_an_eval_model_run_without_dropout(tmp_path):
    """An adapter with dropout loaded into a model in eval mode (an evaluation script) must not drop
    adapter inputs: with p=0.5 the logits moved by up to 3.4 between two identical calls."""
    src, adapter = _adapter(tmp_path, dropout=0.5)
    with torch.no_grad():
        want = src.eval()(IDS)
    model = tiny_model(3).eval()
    load_peft_adapter(model, adapter)
    assert all(not m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(IDS), want) and torch.equal(model(IDS), want)
    model.train()  # and training turns the dropout on as usual
    assert all(m.training for m in model.modules())


def test_null_patterns_written_by_other_tools_load(tmp_path):
    """rank_pattern / alpha_pattern null (as some tools write them) mean no per-layer patterns."""
    src, adapter = _adapter(tmp_path, targets=["q", "down"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(rank_pattern=None, alpha_pattern=None, modules_to_save=[], layer_replication=None)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_model(3)
    assert len(load_peft_adapter(model, adapter)) == 4
    with torch.no_grad():
        assert torch.equal(model.eval()(IDS), src.eval()(IDS))
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"q_proj": 8}}))
    with pytest.raises(UserError, match=r"rank_pattern=\{'q_proj': 8\} is not supported"):
        load_peft_adapter(tiny_model(3), adapter)


def test_an_adapter_without_weights_is_refused_before_the_model_changes(tmp_path):
    """Loading it used to freeze every parameter and add nothing: a run with nothing to train."""
    _, adapter = _adapter(tmp_path)
    save_file({}, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = tiny_model(3)
    with pytest.raises(UserError, match=r"adapter_model\.safetensors holds no LoRA weights"):
        load_peft_adapter(model, adapter)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_loading_into_merged_adapters_is_refused(tmp_path):
    """The merged base would keep the old delta under the new adapters: W + d_old + d_new."""
    src, adapter = _adapter(tmp_path)
    merge_lora(src)
    with pytest.raises(UserError, match="merged adapters: unmerge_lora"):
        load_peft_adapter(src, adapter)


class _Loaded(Exception):
    """Stops the export once the loader has been called."""


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_gguf_export_loads_a_checkpoint_in_its_stored_precision(key, tmp_path, monkeypatch):
    """transformers >= 4.56 writes the precision as `dtype` (before: `torch_dtype`); a bf16 model
    read in fp32 needs twice its size in memory for the same exported numbers."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
    (ckpt / "config.json").write_text(json.dumps({**config, key: "bfloat16"}))
    seen = {}

    def spy(source, *, dtype, **kwargs):
        seen["dtype"] = dtype
        raise _Loaded

    monkeypatch.setattr(export, "_check_source", lambda *args: None)
    monkeypatch.setattr("minigrpo.models.loading.load_pretrained", spy)
    with pytest.raises(_Loaded):
        export._main(["--checkpoint", str(ckpt), "--gguf", "bf16", "--out", str(tmp_path / "m.gguf")])
    assert seen["dtype"] == torch.bfloat16


def test_an_adapter_for_another_base_is_refused_before_the_base_loads(tmp_path, monkeypatch):
    """An adapter of the 64-wide tiny model against a 32-wide base folder: the GGUF export names the
    tensor whose shape differs from what the base's config.json implies, and never calls the loader;
    the same adapter against its own base passes the check."""
    from minigrpo.lora_export import check_adapter_fits

    _, adapter = _adapter(tmp_path)
    other = tiny_checkpoint(tmp_path / "other", hidden_size=32, intermediate_size=48)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))

    def never(*args, **kwargs):
        raise AssertionError("the base model loaded before the adapter was checked")

    monkeypatch.setattr(export, "_check_source", lambda *args: None)
    monkeypatch.setattr("minigrpo.models.loading.load_pretrained", never)
    with pytest.raises(UserError, match=r"lora_A\.weight has shape \[4, 64\], this model needs \[4, 32\]"):
        export._main(["--checkpoint", str(adapter), "--gguf", "f16", "--out", str(tmp_path / "m.gguf")])
    check_adapter_fits(adapter, tiny_checkpoint(tmp_path / "own"))  # its own base: no error
    check_adapter_fits(adapter, "HuggingFaceTB/SmolLM2-135M")  # a hub id: checked as it loads


def test_an_adapter_of_the_packaged_model_names_a_base_peft_can_load(tmp_path):
    """A LoRA run on `smollm2` (the packaged GGUF) wrote base_model_name_or_path 'smollm2', which PEFT
    cannot resolve; it names the hub model the package is a copy of now, while eval and export still
    read back the packaged model the adapter was trained on."""
    from peft import PeftConfig

    from minigrpo.config import Config
    from minigrpo.eval import take_adapter_base
    from minigrpo.lora_export import adapter_base, check_peft_adapter

    model = tiny_model(3)
    apply_lora(model, LoRACfg(r=4, alpha=8))
    adapter = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="smollm2")
    assert PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    config = check_peft_adapter(adapter)
    assert adapter_base(adapter, config) == ("smollm2", None)
    assert export._adapter_base(adapter) == ("smollm2", None)
    cfg = Config()
    cfg.model.name_or_path = "other"
    take_adapter_base(cfg, adapter, config, [])
    assert (cfg.model.name_or_path, cfg.model.revision) == ("smollm2", None)


def test_an_adapter_of_a_relative_base_folder_loads_in_peft_from_elsewhere(tmp_path, monkeypatch):
    """A run with model.name_or_path: models/base (relative) wrote that relative path: PEFT, run from any
    other folder, looked for it there and then on the hub. The absolute path is written now: the
    adapter loads on it with transformers + PEFT from another working directory, logits equal (1e-4)."""
    from peft import AutoPeftModelForCausalLM

    (tmp_path / "models").mkdir()
    tiny_checkpoint(tmp_path / "models" / "base", seed=3)
    model = tiny_model(3)
    apply_lora(model, LoRACfg(r=4, alpha=8))
    _randomize(model)
    monkeypatch.chdir(tmp_path)
    adapter = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="models/base")
    monkeypatch.chdir(tmp_path / "models")
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, model.eval()(IDS), atol=1e-4, rtol=1e-4)
