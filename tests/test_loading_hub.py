"""Model sources as users name them: hub repos whose tokenizer ships only as slow files (refused as the
same folder on disk is, before the weights download), GGUF files with an upper-case suffix, and
safetensors weights in quantized formats (FP8, MX scales, FP4) named as such, not as a corrupt file."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers.hub import fake_hub
from helpers.tiny import tiny_checkpoint, tiny_run_checkpoint

from minigrpo.models import loading
from minigrpo.models.loading import ModelNotFoundError, check_model_source, load_pretrained
from minigrpo.models.safetensors_io import CheckpointError, CorruptCheckpointError, iter_tensors, read_header

SLOW_FILES = {
    "tokenizer.model": ["tokenizer.model"],  # SentencePiece (Llama 2, Mistral, Phi-3)
    "vocab.json + merges.txt": ["vocab.json", "merges.txt"],  # byte-level BPE (GPT-2 style)
}


def _slow_tokenizer_repo(remote: Path, files: list[str]) -> Path:
    """A tiny checkpoint whose tokenizer is only slow-tokenizer files."""
    tiny_checkpoint(remote)
    for name in files:
        (remote / name).write_bytes(b"\x0a\x05slow")  # never parsed: its presence is what counts
    return remote


@pytest.mark.parametrize("files", list(SLOW_FILES.values()), ids=list(SLOW_FILES))
@pytest.mark.parametrize("required", [False, True])
def test_a_hub_repo_with_a_slow_tokenizer_only_is_refused_as_the_local_folder_is(
    monkeypatch, tmp_path, files, required
):
    """Such a repo's tokenizer files were never fetched, so it loaded with no tokenizer (or, required, was
    told to copy its base model's tokenizer, after the weights downloaded), while the same folder on disk
    is refused naming the files. Now the hub refusal is the local one, before any weight is fetched."""
    remote, snapshot = _slow_tokenizer_repo(tmp_path / "remote", files), tmp_path / "snapshot"
    with pytest.raises(ModelNotFoundError) as local:
        load_pretrained(remote, require_tokenizer=required)
    calls = fake_hub(monkeypatch, remote, snapshot)
    with pytest.raises(ModelNotFoundError) as hub:
        load_pretrained("someone/slow-tokenizer", require_tokenizer=required)
    expected = (
        f"has no tokenizer.json (it has {', '.join(files)}): minigrpo reads fast tokenizers only; "
        "save the tokenizer with transformers' save_pretrained to write tokenizer.json"
    )
    assert str(local.value) == f"{remote} {expected}"
    assert str(hub.value) == f"'someone/slow-tokenizer' on the Hugging Face Hub {expected}"
    assert len(calls) == 1 and not list(snapshot.glob("*.safetensors"))  # refused before the weights


def test_a_slow_tokenizer_repo_loads_when_no_tokenizer_is_read(monkeypatch, tmp_path):
    """load_tokenizer=False reads no tokenizer: the repo loads (as the local folder does), weights equal."""
    remote, snapshot = _slow_tokenizer_repo(tmp_path / "remote", ["tokenizer.model"]), tmp_path / "snapshot"
    local, _ = load_pretrained(remote, load_tokenizer=False)
    fake_hub(monkeypatch, remote, snapshot)
    model, tokenizer = load_pretrained("someone/slow-tokenizer", load_tokenizer=False)
    assert tokenizer is None
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), local.parameters(), strict=True))


def test_a_hub_repo_without_a_tokenizer_when_one_is_required_names_the_repo_before_its_weights(monkeypatch, tmp_path):
    """The message told the user to copy the base model's tokenizer "into this folder" (the hub cache's
    snapshot), after the weights downloaded. It names the repo now, before any weight is fetched; not
    required, the repo loads with no tokenizer (a weights-only repo, as a weights-only folder)."""
    remote, snapshot = tiny_checkpoint(tmp_path / "remote"), tmp_path / "snapshot"
    calls = fake_hub(monkeypatch, remote, snapshot)
    with pytest.raises(ModelNotFoundError) as info:
        load_pretrained("someone/weights-only", require_tokenizer=True)
    assert str(info.value) == (
        "'someone/weights-only' on the Hugging Face Hub has no tokenizer: tokenizer.json is missing (and "
        "tokenizer_config.json, special_tokens_map.json); pick a repo that ships its tokenizer, or save this "
        "model with its base model's tokenizer to a folder"
    )
    assert len(calls) == 1 and not list(snapshot.glob("*.safetensors"))
    model, tokenizer = load_pretrained("someone/weights-only")
    assert tokenizer is None and model.args.n_layers == 2


def test_a_hub_repo_with_both_tokenizers_loads_its_fast_one(monkeypatch, tmp_path):
    """A repo shipping tokenizer.json beside tokenizer.model (most Llama 2 / Mistral repos) is not
    refused: the fast tokenizer loads, and encodes as the local folder's does."""
    remote, snapshot = tiny_run_checkpoint(tmp_path / "remote"), tmp_path / "snapshot"
    (remote / "tokenizer.model").write_bytes(b"\x0a\x05slow")
    fake_hub(monkeypatch, remote, snapshot)
    _, tokenizer = load_pretrained("someone/both", require_tokenizer=True)
    assert (snapshot / "tokenizer.model").is_file()
    assert tokenizer.encode("repeat 7") == load_pretrained(remote)[1].encode("repeat 7")


# ----------------------------------------------------------------------------------------------
# GGUF files named with an upper-case suffix


def test_an_upper_case_gguf_suffix_loads_as_a_gguf_file(tmp_path):
    """ "model.Q8_0.GGUF" was taken for a folder ("is no model: expected a model folder ... or .gguf") and
    a missing one for a hub repo id: the suffix counts in any case now."""
    from test_gguf_export import bpe_tokenizer, family_model

    from minigrpo.export import save_gguf

    lower = save_gguf(family_model("llama"), bpe_tokenizer(), tmp_path / "tiny.f16.gguf", "f16")
    upper = tmp_path / "TINY.F16.GGUF"
    shutil.copy(lower, upper)
    check_model_source(upper)
    model, tokenizer = load_pretrained(upper)
    expected, expected_tokenizer = load_pretrained(lower)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), expected.parameters(), strict=True))
    assert tokenizer.encode("123 caf") == expected_tokenizer.encode("123 caf")
    missing = "absent.Q4_K_M.GGUF"  # a file name, never a hub repo id
    with pytest.raises(ModelNotFoundError, match=f"^no such file or directory: {re.escape(missing)}"):
        load_pretrained(missing)


# ----------------------------------------------------------------------------------------------
# weights in quantized safetensors formats


def _write_raw_safetensors(path: Path, entries: dict[str, tuple[str, list[int], int]]) -> None:
    """A safetensors file whose header gives each tensor (dtype name, shape, byte count), zero data."""
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


@pytest.mark.parametrize(
    ("dtype", "torch_dtype", "shape", "nbytes"),
    [
        ("F8_E8M0", "float8_e8m0fnu", [4, 8], 32),
        ("F4", "float4_e2m1fn_x2", [4, 8], 16),  # two values a byte: the shape counts values
    ],
)
def test_a_quantized_dtype_header_is_read_as_the_safetensors_library_writes_it(
    tmp_path, dtype, torch_dtype, shape, nbytes
):
    """F8_E8M0 (MX block scales) and F4 headers were "bad header entry" (a corrupt file): they parse now,
    their byte counts checked (F4 packs two values a byte), and reading such a tensor names its format."""
    from safetensors.torch import save_file as reference_save

    if getattr(torch, torch_dtype, None) is None:
        pytest.skip(f"torch has no {torch_dtype}")
    path = tmp_path / "q.safetensors"
    reference_save({"w": torch.zeros(nbytes, dtype=torch.uint8).view(getattr(torch, torch_dtype))}, str(path))
    header = read_header(path)
    assert header["w"]["dtype"] == dtype and header["w"]["shape"] == [nbytes * 8 // (4 if dtype == "F4" else 8)]
    _write_raw_safetensors(path, {"w": (dtype, shape, nbytes)})
    assert read_header(path)["w"]["shape"] == shape
    with pytest.raises(CheckpointError, match=f"tensor 'w' is {dtype}, a quantized format minigrpo does not load"):
        next(iter_tensors(path))
    _write_raw_safetensors(path, {"w": (dtype, shape, nbytes + 1)})  # one byte more than the shape needs
    with pytest.raises(CorruptCheckpointError, match="has the wrong byte count"):
        read_header(path)


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2", "F8_E8M0", "F4"])
def test_a_weight_in_a_quantized_format_is_named_before_the_weights_load(tmp_path, monkeypatch, dtype):
    """An FP8 / MX / FP4 weight: F8_E4M3 was "not floating point", F8_E8M0 and F4 a corrupt header. One
    line now names the file, the tensor and its format, a CheckpointError but no CorruptCheckpointError,
    from the header alone (check_model_source and load_pretrained)."""
    folder = tiny_checkpoint(tmp_path)
    shapes = {name: list(t.shape) for name, t in iter_tensors(folder / "model.safetensors")}
    bits = 4 if dtype == "F4" else 8
    entries = {name: ("F32", shape, 4 * _numel(shape)) for name, shape in shapes.items()}
    entries["model.norm.weight"] = (dtype, shapes["model.norm.weight"], _numel(shapes["model.norm.weight"]) * bits // 8)
    _write_raw_safetensors(folder / "model.safetensors", entries)
    monkeypatch.setattr(loading, "iter_tensors", lambda *a, **k: pytest.fail("a weight was read"))
    expected = (
        f"{folder / 'model.safetensors'}: tensor 'model.norm.weight' is {dtype}, a quantized format minigrpo does "
        "not load: load the model's 16-bit original (F32, F16 or BF16 weights)"
    )
    for load in (check_model_source, load_pretrained):
        with pytest.raises(CheckpointError) as info:
            load(folder, require_tokenizer=False)
        assert str(info.value) == expected and not isinstance(info.value, CorruptCheckpointError)


def test_a_dtype_name_the_format_does_not_have_is_named_and_a_non_string_one_is_corrupt(tmp_path):
    path = tmp_path / "odd.safetensors"
    _write_raw_safetensors(path, {"w": ("Q4_K", [4], 4)})
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    assert str(info.value) == f"{path}: tensor 'w' has dtype 'Q4_K', which minigrpo does not know"
    assert not isinstance(info.value, CorruptCheckpointError)
    _write_raw_safetensors(path, {"w": (7, [4], 4)})
    with pytest.raises(CorruptCheckpointError, match="bad header entry for 'w'"):
        read_header(path)


def _numel(shape: list[int]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n
