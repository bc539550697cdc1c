"""Loading checkpoints as users have them: tied weights stored under the head's name, hub repos refused
before their weights download, a hub snapshot cached for offline use, load arguments checked up front."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers.hub import fake_hub
from helpers.tiny import tiny_checkpoint, tiny_model

from minigrpo.errors import UserError
from minigrpo.models import loading
from minigrpo.models.args import UnsupportedModelError
from minigrpo.models.loading import ModelNotFoundError, check_model_source, load_pretrained, load_weights
from minigrpo.models.safetensors_io import iter_tensors, save_file

_TINY_QWEN2 = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


def test_a_tied_checkpoint_that_stores_only_lm_head_loads_as_transformers_does(tmp_path):
    """safetensors' save_model keeps one name of two tied tensors, lm_head.weight (the first in order), so
    a tied Qwen2 saved that way has no model.embed_tokens.weight. transformers loads it (the head is the
    embedding); it was refused here as a missing embedding. Logits equal transformers' within 1e-5."""
    import transformers
    from safetensors.torch import save_model

    reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_TINY_QWEN2)).eval()
    reference.config.save_pretrained(tmp_path)
    save_model(reference, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    stored = {name for name, _ in iter_tensors(tmp_path / "model.safetensors")}
    assert "lm_head.weight" in stored and "model.embed_tokens.weight" not in stored
    check_model_source(tmp_path, require_tokenizer=False)
    model, _ = load_pretrained(tmp_path, load_tokenizer=False)
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        diff = (model(ids) - reference(ids).logits).abs().max().item()
    assert diff <= 1e-5, diff
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    into = loading.build_random(json.loads((tmp_path / "config.json").read_text()), seed=5)
    load_weights(into, tmp_path)  # a resumed run reads the same file the same way
    assert torch.equal(into.model.embed_tokens.weight, reference.model.embed_tokens.weight)


def test_an_untied_checkpoint_without_its_embedding_is_still_refused(tmp_path):
    """Only a tied model reads lm_head.weight as its embedding: an untied one lacking it names the tensor."""
    tiny_checkpoint(tmp_path)
    weights = dict(iter_tensors(tmp_path / "model.safetensors"))
    del weights["model.embed_tokens.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(loading.CheckpointError, match=r"^tensor 'model.embed_tokens.weight' is missing"):
        load_pretrained(tmp_path, load_tokenizer=False)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "pre-quantized checkpoint (quant_method 'awq')"),
        ({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, "unsupported model_type 'gemma2'"),
    ],
)
def test_a_hub_repo_whose_config_is_refused_downloads_no_weights(monkeypatch, tmp_path, changes, problem):
    """An AWQ repo (e.g. "...-Instruct-AWQ") or an unsupported family was refused only after every weights
    file had been downloaded (gigabytes): config.json is now checked between the two fetches."""
    remote, snapshot = tmp_path / "remote", tmp_path / "snapshot"
    tiny_checkpoint(remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, **changes}))
    calls = fake_hub(monkeypatch, remote, snapshot)
    with pytest.raises(UnsupportedModelError, match=f"^{re.escape(str(snapshot))}/config.json: .*{re.escape(problem)}"):
        load_pretrained("someone/tiny-awq")
    assert len(calls) == 1 and not list(snapshot.glob("*.safetensors"))


def test_a_hub_repo_with_only_pickled_weights_is_one_line_naming_the_repo(monkeypatch, tmp_path):
    """A repo that ships pytorch_model.bin only: the pickle is never fetched, and the error names the repo
    (it said the cache snapshot folder was "not a model folder")."""
    remote, snapshot = tmp_path / "remote", tmp_path / "snapshot"
    tiny_checkpoint(remote)
    (remote / "model.safetensors").unlink()
    (remote / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    calls = fake_hub(monkeypatch, remote, snapshot)
    with pytest.raises(ModelNotFoundError) as info:
        load_pretrained("someone/bin-only")
    assert str(info.value) == (
        "'someone/bin-only' on the Hugging Face Hub has no safetensors weights (pickled weights such as "
        "pytorch_model.bin are never loaded): pick a repo or revision that ships *.safetensors"
    )
    assert not (snapshot / "pytorch_model.bin").exists() and not any("bin" in p for c in calls for p in c)


def test_a_hub_lora_adapter_repo_is_named_as_one(monkeypatch, tmp_path):
    """A hub id of a LoRA adapter: named as one (as a local adapter folder is), before its weights download."""
    remote, snapshot = tmp_path / "remote", tmp_path / "snapshot"
    remote.mkdir()
    (remote / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64)}, remote / "adapter_model.safetensors")
    calls = fake_hub(monkeypatch, remote, snapshot)
    expected = f"{snapshot} is a LoRA adapter (adapter_config.json), not a model folder"
    with pytest.raises(ModelNotFoundError, match=f"^{re.escape(expected)}"):
        load_pretrained("someone/tiny-lora")
    assert len(calls) == 1 and not (snapshot / "adapter_model.safetensors").exists()


def test_an_offline_hub_id_loads_from_its_cached_snapshot(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 (the conftest sets it) with the repo in the hub cache: the real huggingface_hub
    returns the cached snapshot, sharded weights and all, and a repo not cached is one line naming it."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    loading.save_pretrained(tiny_model(seed=2), None, repo / "snapshots" / commit, max_shard_bytes=60_000)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, _ = load_pretrained("org/tiny")
    expected = tiny_model(seed=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), expected.parameters(), strict=True))
    with pytest.raises(ModelNotFoundError) as info:
        load_pretrained("org/absent")
    assert str(info.value) == (  # huggingface_hub's paragraph about the network, said in one clause
        "'org/absent' is not a local path and could not be fetched from the Hugging Face Hub: it is not in the "
        "local cache, and the Hub cannot be reached (no network, or HF_HUB_OFFLINE=1)"
    )


@pytest.mark.parametrize("dtype", [torch.int8, "bfloat16", torch.float8_e4m3fn])
def test_a_dtype_a_model_cannot_load_as_is_refused_before_anything_is_read(tmp_path, monkeypatch, dtype):
    """dtype=torch.int8 cast every weight to an integer (a model of zeros and ones, no error); the string
    "bfloat16" failed with a bare TypeError after the tokenizer loaded. One line naming the value now."""
    tiny_checkpoint(tmp_path)
    monkeypatch.setattr(loading, "_resolve", lambda *a: pytest.fail("the checkpoint was read"))
    expected = f"dtype={dtype!r}: a model loads as one of torch.float32, torch.bfloat16, torch.float16, torch.float64"
    with pytest.raises(UserError, match=f"^{re.escape(expected)}$"):
        load_pretrained(tmp_path, dtype=dtype)


@pytest.mark.parametrize(
    ("offsets", "problem"),
    [
        ({"a": [0, 32], "b": [0, 32]}, "tensor 'b' overlaps 'a' (offsets 0..32)"),
        ({"a": [0, 16], "b": [32, 64]}, "tensor 'b' starts 16 bytes after the previous one (offsets 32..64)"),
    ],
)
def test_a_header_whose_tensors_share_or_skip_bytes_is_refused_as_safetensors_does(tmp_path, offsets, problem):
    """Two tensors over the same bytes (or a hole between them) passed: the byte count of each and the end
    of the data were right, so both loaded the same values. The safetensors library refuses the file."""
    import struct

    from safetensors import SafetensorError, safe_open

    from minigrpo.models.safetensors_io import CorruptCheckpointError, read_header

    size = max(end for _, end in offsets.values())
    header = {
        k: {"dtype": "F32", "shape": [(end - start) // 4], "data_offsets": [start, end]}
        for k, (start, end) in offsets.items()
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(size))
    with pytest.raises(SafetensorError):
        safe_open(str(path), "pt")
    with pytest.raises(CorruptCheckpointError) as info:
        read_header(path)
    assert str(info.value) == f"{path}: {problem}: corrupt header"


@pytest.mark.parametrize("where", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/shard.safetensors"])
def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(tmp_path, where):
    """The index's weight_map names files beside it; a path out of the folder was read as weights."""
    folder = tmp_path / "model"
    loading.save_pretrained(tiny_model(seed=2), None, folder, max_shard_bytes=60_000)
    index = folder / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    first = next(iter(content["weight_map"]))
    content["weight_map"][first] = where
    index.write_text(json.dumps(content))
    with pytest.raises(loading.CorruptCheckpointError, match="file names in its folder") as caught:
        loading.load_pretrained(folder)
    assert "\n" not in str(caught.value) and where in str(caught.value)
