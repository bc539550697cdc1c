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


def _transformers_forward_fails(config: dict, tmp_path) -> bool:
    """Whether transformers' model built from `config` fails to build or to run one forward."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    (tmp_path / "config.json").write_text(json.dumps(config))
    try:
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))(torch.tensor([[3, 4, 5]]))
    except Exception:
        return True
    return False


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_max_window_layers_null_is_read_only_where_it_counts(model_type):
    """Qwen reads max_window_layers only to type the layers of a window that is on when layer_types does
    not. Off (use_sliding_window false, as Qwen2.5 ships), or with layer_types given, a null was refused
    ("must be an integer >= 0"); every layer now attends as written there (transformers 5.25's typed config
    refuses any null, read or not; 4.x built these configs). With the window on and nothing else typing the
    layers, a null is still refused, the message saying why."""
    config = {**BASE, "model_type": model_type, "head_dim": 16, "max_window_layers": None, "sliding_window": 4}
    assert ModelArgs.from_hf_config(config).layer_windows == (None, None)
    typed = {**config, "use_sliding_window": True, "layer_types": ["sliding_attention", "full_attention"]}
    assert ModelArgs.from_hf_config(typed).layer_windows == (4, None)
    no_window = {**config, "use_sliding_window": True, "sliding_window": None}
    assert ModelArgs.from_hf_config(no_window).layer_windows == (None, None)
    with pytest.raises(ModelConfigError) as info:
        ModelArgs.from_hf_config({**config, "use_sliding_window": True})
    assert str(info.value) == (
        "config key 'max_window_layers' must be an integer >= 0, got None (it types the layers: use_sliding_window "
        "is true and there is no 'layer_types')"
    )
    with pytest.raises(ModelConfigError, match=r"^config key 'max_window_layers' must be an integer >= 0, got '1'$"):
        ModelArgs.from_hf_config({**config, "max_window_layers": "1"})
    on = {**config, "use_sliding_window": True, "max_window_layers": 1}
    assert ModelArgs.from_hf_config(on).layer_windows == (None, 4)


SCALINGS = {
    "linear": dict(factor=2.0),
    "dynamic": dict(factor=2.0),
    "llama3": dict(factor=2.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16),
    "yarn": dict(factor=2.0, original_max_position_embeddings=32),
    "longrope": dict(short_factor=[1.0] * 4, long_factor=[2.0] * 4, original_max_position_embeddings=16),
}


@pytest.mark.parametrize("where", ["top level", "rope_scaling"])
@pytest.mark.parametrize("rope_type", sorted(SCALINGS))
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_partial_rotary_with_scaled_rope_is_refused_outside_phi3(model_type, rope_type, where, tmp_path):
    """Outside Phi-3, transformers ignores partial_rotary_factor under default RoPE (the whole head turns:
    test_model_vs_hf's qwen2-partial-ignored), but its scaled variants compute R/2 = 4 frequencies for
    8-pair heads and the forward fails. The factor was dropped here, silently rotating the whole head with
    frequencies for another dimension: it is refused naming the key."""
    scaling = {"rope_type": rope_type, **SCALINGS[rope_type]}
    config = {**BASE, "model_type": model_type, "head_dim": 16, "rope_scaling": scaling}
    if where == "top level":
        config["partial_rotary_factor"] = 0.5
    else:
        scaling["partial_rotary_factor"] = 0.5
    assert _transformers_forward_fails(config, tmp_path)
    with pytest.raises(ModelConfigError) as info:
        ModelArgs.from_hf_config(config)
    assert str(info.value) == (
        f"config key 'partial_rotary_factor' (0.5) with rope scaling type {rope_type!r} cannot be built for "
        f"model_type {model_type!r} (transformers fails on it; only default RoPE ignores it): remove it or set 1.0"
    )
    whole = ModelArgs.from_hf_config({**config, "partial_rotary_factor": 1.0, "rope_scaling": SCALED[rope_type]})
    assert whole.rotary_dim == 16
    default = ModelArgs.from_hf_config({**config, "rope_scaling": None, "partial_rotary_factor": 0.5})
    assert default.rotary_dim == 16 and not _transformers_forward_fails({**config, "rope_scaling": None}, tmp_path)


SCALED = {name: {"rope_type": name, **params} for name, params in SCALINGS.items()}
SCALED["longrope"] = {**SCALED["longrope"], "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}


@pytest.mark.parametrize(
    ("model_type", "key"),
    [
        ("llama", "attention_dropout"),
        ("mistral", "attention_dropout"),
        ("qwen2", "attention_dropout"),
        ("qwen3", "attention_dropout"),
        ("phi3", "attention_dropout"),
        ("phi3", "resid_pdrop"),
    ],
)
def test_a_nonzero_dropout_rate_is_refused(model_type, key, tmp_path):
    """transformers applies these rates in train mode (its train-mode logits differ from eval-mode ones);
    the model here has no dropout, so a nonzero rate trained silently without it. It is refused naming
    the key; 0 and null pass. Phi-3's embd_pdrop is never applied by transformers (train-mode logits
    equal eval-mode ones) and is read as it reads it: not at all."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {**BASE, "model_type": model_type, "head_dim": 16}
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**config, key: 0.5})).train()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    torch.manual_seed(0)
    assert (hf(ids).logits - hf.eval()(ids).logits).abs().max() > 1e-3
    with pytest.raises(ModelConfigError) as info:
        ModelArgs.from_hf_config({**config, key: 0.5})
    assert str(info.value) == (
        f"config key {key!r} is 0.5: dropout is not implemented (training would silently run without it); "
        "set it to 0.0 in config.json"
    )
    with pytest.raises(ModelConfigError, match=rf"^config key '{key}' must be a number, got '0.1'$"):
        ModelArgs.from_hf_config({**config, key: "0.1"})
    for rate in (0, 0.0, None):
        ModelArgs.from_hf_config({**config, key: rate})
    if model_type == "phi3":
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**config, "embd_pdrop": 0.5})).train()
        assert torch.equal(hf(ids).logits, hf.eval()(ids).logits)
        ModelArgs.from_hf_config({**config, "embd_pdrop": 0.5})


@pytest.mark.parametrize(
    ("rope_type", "key", "value", "need"),
    [
        ("yarn", "beta_fast", "32", "a number >= 0 (0: the default) or null"),
        ("yarn", "beta_slow", -1, "a number >= 0 (0: the default) or null"),
        ("yarn", "mscale", "1", "a number >= 0 (0: the default) or null"),
        ("yarn", "mscale_all_dim", [1.0], "a number >= 0 (0: the default) or null"),
        ("yarn", "attention_factor", "1.2", "a positive number or null"),
        ("yarn", "truncate", "false", "true or false"),
        ("longrope", "attention_factor", "1.2", "a positive number or null"),
    ],
)
def test_scaling_keys_of_the_wrong_type_are_refused(rope_type, key, value, need):
    """A string among yarn's optional keys (or longrope's) passed the config and failed later inside
    rotary.py with a TypeError (or, for truncate "false", counted as true): one line naming the key."""
    from minigrpo.models.transformer import Transformer

    scaling = {**SCALED[rope_type], key: value}
    config = {**BASE, "model_type": "llama", "rope_scaling": scaling}
    with pytest.raises(ModelConfigError) as info:
        ModelArgs.from_hf_config(config)
    assert str(info.value) == f"rope scaling key {key!r} must be {need}, got {value!r}"
    fine = {**config, "rope_scaling": {**scaling, key: None if key != "truncate" else False}}
    Transformer(ModelArgs.from_hf_config(fine))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_a_null_max_position_embeddings_is_refused(model_type, tmp_path):
    """Every family's transformers config types it as an integer and refuses null; read as None here, the
    prompt checks and the reward model crashed later with TypeErrors."""
    config = {**BASE, "model_type": model_type, "head_dim": 16, "max_position_embeddings": None}
    assert _transformers_refuses(config, tmp_path)
    with pytest.raises(ModelConfigError) as info:
        ModelArgs.from_hf_config(config)
    assert str(info.value) == "config key 'max_position_embeddings' must be a positive integer, got None"


def test_the_phi4_preset_pads_with_its_own_pad_token_not_the_phi3_default():
    """phi-4's vocabulary is not Phi-3's: id 32000 is an ordinary token there, whose embedding row must
    learn; the pad (no gradient from lookups) is <|dummy_85|> = 100349, inside the 100352 rows."""
    from minigrpo.models.presets import preset_config

    args = ModelArgs.from_hf_config(preset_config("phi-4"))
    assert args.embedding_padding_idx == 100349
    assert args.embedding_padding_idx < args.vocab_size
