"""Exports read back: a merged LoRA checkpoint written whole or not at all, where it may go, and its
round trip through transformers for the families the other export tests leave out (Qwen3's q/k norms,
Mistral, a tied Llama head), with the PEFT adapter of the same run on the transformers base.

Parity bound: fp32 logits within 1e-5 (observed differences ~3e-6)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.tiny import tiny_checkpoint, tiny_model, tiny_tokenizer

from minigrpo.config import LoRACfg
from minigrpo.errors import UserError
from minigrpo.lora import LoRAError, LoRALinear, apply_lora, lora_layers, save_merged, save_peft_adapter
from minigrpo.models.loading import load_pretrained

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ATOL = 1e-5
IDS = torch.randint(3, 20, (2, 9), generator=torch.Generator().manual_seed(0))


def adapted_model(seed: int = 0, **overrides):
    """A tiny model with rank-4 adapters on every projection whose B is non-zero (they change the logits)."""
    model = tiny_model(seed, **overrides)
    apply_lora(model, LoRACfg(r=4, alpha=8))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))
    return model.eval()


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def fail_after(monkeypatch, calls: int) -> None:
    """The merge of the adapted weights raises (a full disk, Ctrl-C) after `calls` merged tensors."""
    merged_weight = LoRALinear.merged_weight
    count = [0]

    def failing(self):
        count[0] += 1
        if count[0] > calls:
            raise KeyboardInterrupt
        return merged_weight(self)

    monkeypatch.setattr(LoRALinear, "merged_weight", failing)


@pytest.mark.parametrize("max_shard_bytes", [5 * 1024**3, 20_000], ids=["one-file", "sharded"])
def test_an_interrupted_merged_export_leaves_no_partial_folder(tmp_path, monkeypatch, max_shard_bytes):
    """Half a merged export (config.json beside an empty or missing weights file) must not stand under
    the final name: transformers would load it with randomly initialised weights."""
    model = adapted_model()
    out = tmp_path / "merged"
    fail_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        save_merged(model, tiny_tokenizer(), out, dtype=torch.float32, max_shard_bytes=max_shard_bytes)
    assert list(tmp_path.iterdir()) == []  # nothing under the final name, no temporary folder left


def test_an_earlier_export_is_kept_by_a_failed_one_and_replaced_whole_by_a_complete_one(tmp_path, monkeypatch):
    model = adapted_model()
    with torch.no_grad():
        want = model(IDS)
    out = save_merged(model, tiny_tokenizer(), tmp_path / "merged", dtype=torch.float32, max_shard_bytes=20_000)
    sharded = folder_bytes(out)
    assert "model.safetensors.index.json" in sharded and "tokenizer.json" in sharded

    with monkeypatch.context() as m:
        fail_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            save_merged(model, None, out, dtype=torch.bfloat16)
    assert folder_bytes(out) == sharded and [p.name for p in tmp_path.iterdir()] == ["merged"]

    save_merged(model, None, out, dtype=torch.float32)  # one file now, no tokenizer: no stale shard or tokenizer
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    again, tokenizer = load_pretrained(out, require_tokenizer=False)
    with torch.no_grad():
        assert tokenizer is None and (again(IDS) - want).abs().max().item() < ATOL


def test_a_merged_export_never_deletes_other_files(tmp_path):
    """A folder holding anything an export does not write (a run's files, an adapter), or a file, is one
    UserError naming it, before anything is computed; an empty folder is fine."""
    model = adapted_model()
    adapter = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    notes = tmp_path / "run" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("keep me")
    cases = [
        (adapter, f"save_merged: {adapter} already holds 'adapter_config.json', which is no file of a model export"),
        (notes.parent, f"save_merged: {notes.parent} already holds 'notes.txt', which is no file of a model export"),
        (notes, f"save_merged: {notes} is a file, not a folder; name a folder for the merged checkpoint"),
    ]
    for where, message in cases:
        before = folder_bytes(where) if where.is_dir() else where.read_bytes()
        with pytest.raises(UserError) as info:
            save_merged(model, None, where, dtype=torch.float32)
        assert str(info.value).startswith(message) and "\n" not in str(info.value)
        assert (folder_bytes(where) if where.is_dir() else where.read_bytes()) == before
    with pytest.raises(LoRAError, match=r"dtype=torch\.int8 must be one of torch\.float32"):
        save_merged(model, None, tmp_path / "int8", dtype=torch.int8)
    assert not (tmp_path / "int8").exists()
    (tmp_path / "empty").mkdir()
    save_merged(model, None, tmp_path / "empty", dtype=torch.float32)
    assert (tmp_path / "empty" / "model.safetensors").is_file()


FAMILIES = {
    "qwen3": dict(model_type="qwen3", head_dim=32),  # q/k norms, head_dim != hidden / heads
    "mistral": dict(model_type="mistral"),
    "llama-tied": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_merged_and_peft_exports_load_in_transformers_and_peft(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    base = tiny_checkpoint(tmp_path / "base", seed=3, **FAMILIES[family])
    ours, _ = load_pretrained(base)
    apply_lora(ours, LoRACfg(r=4, alpha=6, rslora=True, targets=["q", "k", "v", "o", "down"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))
        want = ours.eval()(IDS)
    merged = save_merged(ours, None, tmp_path / "merged", dtype=torch.float32)
    adapter = save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 6, True)
    assert config["target_modules"] == ["down_proj", "k_proj", "o_proj", "q_proj", "v_proj"]

    auto = transformers.AutoModelForCausalLM
    hf_merged = auto.from_pretrained(merged, attn_implementation="eager").float().eval()
    hf_base = auto.from_pretrained(base, attn_implementation="eager").float().eval()
    with torch.no_grad():
        assert (hf_base(IDS).logits - want).abs().max().item() > 1e-2  # the adapters matter
        assert (hf_merged(IDS).logits - want).abs().max().item() < ATOL
        wrapped = peft.PeftModel.from_pretrained(hf_base, adapter).eval()
        assert (wrapped(IDS).logits - want).abs().max().item() < ATOL
