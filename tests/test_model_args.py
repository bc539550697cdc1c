"""config.json parsing (models/args.py) where transformers (test-only oracle) refuses a config: ours
refuses it too, with one line naming the key, before any weight is read."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from test_model_vs_hf import BASE as HF_BASE  # noqa: E402

from minigrpo.models.args import ModelArgs, ModelConfigError, UnsupportedModelError  # noqa: E402

BASE = {**HF_BASE, "rope_theta": 10000.0}  # pad_token_id 0: Phi-3's default (32000) lies past this vocabulary
LONGROPE = dict(short_factor=[1.0] * 8, long_factor=[2.0] * 8)  # Dh 16: 8 rotary pairs


def _transformers_refuses(config: dict, tmp_path) -> bool:
    """Whether transformers' AutoConfig + model build refuses `config` (any exception)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    (tmp_path / "config.json").write_text(json.dumps(config))
    try:
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    except Exception:
        return True
    return False


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "llama3"])
def test_phi3_refuses_the_rope_types_transformers_phi3_refuses(rope_type, key, tmp_path):
    """transformers' Phi-3 builds default and LongRoPE (su, yarn: its early names) only; a linear or
    dynamic scaling was once read here and applied as for Llama."""
    scaling = dict(rope_type=rope_type, factor=2.0, low_freq_factor=1.0, high_freq_factor=4.0)
    config = {**BASE, "model_type": "phi3", key: scaling}
    assert _transformers_refuses(config, tmp_path)
    with pytest.raises(UnsupportedModelError) as info:
        ModelArgs.from_hf_config(config)
    assert str(info.value) == (
        f"unsupported rope scaling type {rope_type!r} (config key {key!r}) for model_type 'phi3'; "
        "supported: default, longrope (su and yarn read as longrope)"
    )
    llama = ModelArgs.from_hf_config({**config, "model_type": "llama"})  # Llama reads all three
    assert llama.rope_type == rope_type


@pytest.mark.parametrize("name", ["su", "yarn", "longrope"])
def test_phi3_reads_its_longrope_names(name, tmp_path):
    config = {**BASE, "model_type": "phi3", "original_max_position_embeddings": 16, "rope_scaling": {**LONGROPE}}
    config["rope_scaling"]["type"] = name
    assert not _transformers_refuses(config, tmp_path)
    assert ModelArgs.from_hf_config(config).rope_type == "longrope"


def test_yarn_without_a_factor_is_refused(tmp_path):
    """transformers needs `factor` for YaRN (a KeyError); it was once derived here from the lengths."""
    config = {**BASE, "model_type": "llama", "rope_scaling": dict(type="yarn", original_max_position_embeddings=16)}
    assert _transformers_refuses(config, tmp_path)
    with pytest.raises(ModelConfigError, match=r"^rope scaling type 'yarn' needs \['factor'\] in config.json$"):
        ModelArgs.from_hf_config(config)


def test_rope_parameters_and_rope_scaling_that_disagree_are_refused(tmp_path):
    """A recent config.json (rope_parameters, rope_theta inside) with an older rope_scaling added, as
    the YaRN recipes say: transformers then reads rope_scaling alone and drops rope_parameters'
    rope_theta (10000 instead of 1e6). The two were once merged here, giving other logits. Either
    reading is a guess: the error names the key they disagree on."""
    params = dict(rope_type="default", rope_theta=1e6)
    scaling = dict(type="yarn", factor=4.0, original_max_position_embeddings=16)
    config = {**BASE, "model_type": "qwen2", "rope_parameters": params, "rope_scaling": scaling}
    del config["rope_theta"]
    from transformers import Qwen2Config

    assert Qwen2Config.from_dict(config).rope_parameters["rope_theta"] == 10000.0  # not 1e6
    with pytest.raises(ModelConfigError) as info:
        ModelArgs.from_hf_config(config)
    assert str(info.value) == (
        "config keys 'rope_parameters' and 'rope_scaling' disagree on 'factor' (None vs 4.0); keep one of the two"
    )
    # the same scaling under both keys (old `type`, new `rope_type`) is one reading
    same = {**config, "rope_parameters": {**scaling, "rope_type": "yarn", "type": None}}
    args = ModelArgs.from_hf_config(same)
    assert (args.rope_type, args.rope_theta, args.rope_params["factor"]) == ("yarn", 10000.0, 4.0)


@pytest.mark.parametrize(
    ("sizes", "key"),
    [(dict(hidden_size=36), "'hidden_size' / 'num_attention_heads'"), (dict(head_dim=9), "'head_dim'")],
)
def test_an_odd_head_size_rotated_whole_is_refused(sizes, key, tmp_path):
    """RoPE turns channel pairs: a head of 9 channels rotated whole cannot be (transformers refuses it);
    Phi-3 rotating part of a head may leave an odd count (both build it)."""
    config = {**BASE, "model_type": "llama", **sizes}
    assert _transformers_refuses(config, tmp_path)
    with pytest.raises(ModelConfigError) as info:
        ModelArgs.from_hf_config(config)
    assert str(info.value) == f"config key {key} gives an odd head size 9: RoPE rotates channel pairs"
    partial = {**BASE, "model_type": "phi3", "partial_rotary_factor": 0.3125}  # 5 of 16 channels
    assert not _transformers_refuses(partial, tmp_path)
    assert ModelArgs.from_hf_config(partial).rotary_dim == 5
