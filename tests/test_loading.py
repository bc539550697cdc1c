"""Loading: bad input fails with a message naming the culprit; memory stays near one copy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers.tiny import tiny_checkpoint, tiny_model

from minigrpo.models.args import ModelArgs, UnsupportedModelError
from minigrpo.models.loading import CheckpointError, load_pretrained
from minigrpo.models.safetensors_io import CorruptCheckpointError, iter_tensors, save_file


def test_round_trip_is_exact(tmp_path):
    model = tiny_model(seed=3)
    tiny_checkpoint(tmp_path, seed=3)
    loaded, _ = load_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())


def test_dtype_conversion_on_load(tmp_path):
    tiny_checkpoint(tmp_path)
    loaded, _ = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.rotary.inv_freq.dtype == torch.float32  # angles stay exact


def test_missing_path():
    with pytest.raises(FileNotFoundError, match=r"no such file or directory: \./nowhere/at-all"):
        load_pretrained("./nowhere/at-all")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no config.json in {tmp_path}"):
        load_pretrained(tmp_path)


def test_unsupported_model_type(tmp_path):
    tiny_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(UnsupportedModelError, match="unsupported model_type 'gpt_neox'"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_scaling(key):
    cfg = {**tiny_model().args.hf_config, key: {"rope_type": "dynamic", "factor": 2.0}}
    with pytest.raises(UnsupportedModelError, match="unsupported rope scaling type 'dynamic'"):
        ModelArgs.from_hf_config(cfg)


def _rewrite_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = dict(iter_tensors(path))
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor(tmp_path):
    tiny_checkpoint(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        load_pretrained(tmp_path)


def test_extra_tensor(tmp_path):
    tiny_checkpoint(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.mlp.extra.weight' in .*model"):
        load_pretrained(tmp_path)


def test_shape_mismatch(tmp_path):
    tiny_checkpoint(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch for 'model.norm.weight'.*\[63\].*\[64\]"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, damage):
    tiny_checkpoint(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors"):
        load_pretrained(tmp_path)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline mode")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"'someone/some-model' is not a local path.*offline mode"):
        load_pretrained("someone/some-model")


def test_hub_download_asks_only_for_needed_files(monkeypatch, tmp_path):
    import huggingface_hub

    tiny_checkpoint(tmp_path)
    seen = {}

    def fake(repo_id, revision=None, allow_patterns=None):
        seen.update(repo_id=repo_id, revision=revision, patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    model, _ = load_pretrained("org/tiny", revision="abc")
    assert seen["repo_id"] == "org/tiny" and seen["revision"] == "abc"
    assert "*.safetensors" in seen["patterns"] and not any("bin" in p or "pth" in p for p in seen["patterns"])
    assert model.args.n_layers == 2


def test_peak_memory_is_about_one_copy(tmp_path):
    """Loading an ~80 MB checkpoint raises the process's peak RSS by at most 1.3x its size."""
    tiny_checkpoint(tmp_path, hidden_size=512, intermediate_size=2048, num_hidden_layers=4, vocab_size=4096)
    size = (tmp_path / "model.safetensors").stat().st_size
    code = f"""
from minigrpo.models.loading import load_pretrained
def rss(key):
    return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith(key))
model, _ = load_pretrained({str(tmp_path)!r})  # warm-up: one-time lazy initialisation inside torch
del model
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
base = rss('VmRSS')
model, _ = load_pretrained({str(tmp_path)!r})
print(rss('VmHWM') - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0 and "clear_refs" in out.stderr:
        pytest.skip("this kernel does not allow resetting the peak RSS")
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.strip().splitlines()[-1])
    assert 0.5 * size <= extra <= 1.3 * size, f"peak grew by {extra / size:.2f}x the checkpoint size ({size} B)"
