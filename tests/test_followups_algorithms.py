"""The critic's score-head checks, the count caps of the env and ppo sections, evaluation's dtype check on
the CPU, and merged LoRA adapters refused at the forward under activation offload."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers.tiny import tiny_model, tiny_run_checkpoint, write_copy_task
from test_ppo import sequence_classification_checkpoint

from minigrpo import eval as evaluation
from minigrpo.algorithms.value_model import check_value_path
from minigrpo.config import ConfigError, LoRACfg, load_config
from minigrpo.errors import UserError, one_line
from minigrpo.lora import apply_lora, lora_parameters, merge_lora, unmerge_lora

# ================================================================================================
# ppo.value_path: the score head is read before the label count


def _edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_a_value_path_whose_config_names_no_labels_says_which_key_to_set(tmp_path):
    """A one-row score head under a config.json without num_labels (transformers then counts 2): the
    message names the head's rows and the key to set, not 'num_labels=2' the file never wrote."""
    folder = tmp_path / "rm"
    sequence_classification_checkpoint(folder)
    _edit_config(folder, num_labels=None)
    with pytest.raises(UserError) as info:
        check_value_path(str(folder))
    message = str(info.value)
    assert message.startswith(f"ppo.value_path={str(folder)!r}: ")
    assert "score head (score.weight) has 1 row(s) but config.json gives 2 labels" in message
    assert message.endswith("set num_labels to 1 in config.json")
    _edit_config(folder, num_labels=1)  # fixed as the message says: checked without a word
    check_value_path(str(folder))


def test_a_two_label_value_path_is_still_refused_as_no_value_head(tmp_path):
    """A head of two rows with num_labels=2 agrees with its config: refused for having two labels."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "rm"
    sequence_classification_checkpoint(folder)
    weights = load_file(folder / "model.safetensors")
    weights["score.weight"] = torch.zeros(2, weights["score.weight"].shape[1])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    _edit_config(folder, num_labels=2)
    with pytest.raises(UserError, match=r"num_labels=2: a value head gives one number \(num_labels=1\)$"):
        check_value_path(str(folder))


# ================================================================================================
# counts no run can use


def _config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, list(overrides))
    return one_line(str(info.value))


CAP = "must be <= 2147483647, got {} (no run can use a larger count)"
TOOLS = "env.kind=gsm8k_tools"
PPO = ("algorithm=ppo", "grpo.group_size=1")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ((TOOLS, "env.max_turns=4294967296"), "env.max_turns"),
        ((TOOLS, "env.sandbox.memory_mb=4294967296"), "env.sandbox.memory_mb"),
        ((TOOLS, "env.sandbox.max_output_chars=4294967296"), "env.sandbox.max_output_chars"),
        ((*PPO, "ppo.epochs=4294967296"), "ppo.epochs"),
        ((*PPO, "ppo.mini_batches=4294967296"), "ppo.mini_batches"),  # not "must divide the 8 rows"
    ],
)
def test_counts_past_int32_are_refused_in_the_env_and_ppo_sections(overrides, key):
    assert _config_error(*overrides) == f"invalid config: {key} {CAP.format(4294967296)}"


def test_an_episode_budget_past_int32_is_refused_and_says_where_it_came_from():
    """Set by the user, or derived (sampler.max_new_tokens * env.max_turns): one error naming both keys;
    with env off the derived value is never read, so the same settings load."""
    assert _config_error(TOOLS, "env.max_episode_tokens=4294967296") == (
        f"invalid config: env.max_episode_tokens {CAP.format(4294967296)}: set env.max_episode_tokens, "
        "or lower env.max_turns"
    )
    assert _config_error(TOOLS, "sampler.max_new_tokens=1073741824") == (
        "invalid config: env.max_episode_tokens must be <= 2147483647, got 4294967296 = sampler.max_new_tokens * "
        "env.max_turns (1073741824 * 4) (no run can use a larger count): set env.max_episode_tokens, or lower "
        "env.max_turns"
    )
    assert load_config(None, ["sampler.max_new_tokens=1073741824"]).env.kind is None  # env off: fine
    cfg = load_config(None, [TOOLS, "sampler.max_new_tokens=1073741824", "env.max_turns=1"])
    assert cfg.env.max_episode_tokens == 1073741824
    cfg = load_config(None, [TOOLS, "env.max_turns=2147483647", "env.max_episode_tokens=4096"])
    assert cfg.env.max_turns == 2147483647


# ================================================================================================
# evaluation: float16 on the CPU


def test_eval_warns_for_float16_on_the_cpu_before_weights_load(tmp_path, monkeypatch):
    """As training does (build.check_dtype): the warning comes before any weight is read."""
    checkpoint = tiny_run_checkpoint(tmp_path / "model")
    write_copy_task(tmp_path / "rows.jsonl", n=4)

    def no_loading(*args, **kwargs):
        raise RuntimeError("weights loading")

    monkeypatch.setattr(evaluation, "load_pretrained", no_loading)
    settings = ["run.device=cpu", "sampler.max_new_tokens=2", "data.source=jsonl", "data.eval_split=null"]
    argv = ["--checkpoint", str(checkpoint), "--split", "train", "--num", "2", "--set", *settings]
    argv.append(f"data.path={tmp_path / 'rows.jsonl'}")
    messages = {}
    for dtype in ("float16", "float32"):
        with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError, match="weights loading"):
            warnings.simplefilter("always")
            evaluation._main([*argv, f"run.dtype={dtype}"])
        messages[dtype] = [str(w.message) for w in caught if "run.dtype" in str(w.message)]
    assert messages == {
        "float16": [
            "run.dtype=float16 on the CPU (run.device=cpu) is several times slower than float32: CPUs convert each "
            "float16 operation; use run.dtype=float32 (auto on the CPU) or bfloat16"
        ],
        "float32": [],
    }


# ================================================================================================
# merged adapters under activation offload


def _lora_model():
    model = tiny_model(1, num_hidden_layers=2)
    apply_lora(model, LoRACfg(enabled=True, r=4))
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    model.train()
    model.gradient_checkpointing = True
    return model


@pytest.mark.parametrize("offload", [False, True])
def test_merged_adapters_are_refused_at_the_forward_with_or_without_offload(offload):
    """The offloaded block's forward runs without autograd: the error used to wait for the backward's
    recompute, after the whole forward (and a loss) had run."""
    model = _lora_model()
    model.activation_offload = offload
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged and would get no gradient: unmerge_lora"):
        model(ids)
    with torch.no_grad():  # scoring without gradients stays allowed, in train mode too
        model(ids)
    unmerge_lora(model)  # the guard goes with the merge: the model trains again
    model(ids).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))


def test_offloaded_gradients_after_a_merge_and_unmerge_equal_plain_backprop():
    """merge then unmerge leaves nothing behind: offloaded gradients equal plain ones (fp32, 1e-6)."""
    model = _lora_model()
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    merge_lora(model)
    unmerge_lora(model)
    grads = {}
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        model.activation_offload = offload
        model(ids).float().pow(2).mean().backward()
        grads[offload] = [p.grad.clone() for p in lora_parameters(model)]
    worst = max((a - b).abs().max().item() for a, b in zip(grads[False], grads[True]))
    assert worst <= 1e-6, worst
